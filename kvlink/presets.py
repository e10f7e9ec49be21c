"""Cache layouts of public models, from their configuration files.

Figures are checked against ``cache-layouts.md`` (the shared reference) in ``tests/unit/test_presets.py``.
Where a public config was not available, the preset's ``notes`` say what was assumed.
"""

from __future__ import annotations

from typing import Callable

from kvlink.errors import SpecError
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow


def _pattern(num_layers: int, is_full: Callable[[int], bool], full, other) -> tuple:
    return tuple(full if is_full(i) else other for i in range(num_layers))


def kimi_linear_48b_a3b() -> CacheSpec:
    # MLA at 1-based layers 4,8,...,24 and 27; KDA elsewhere. KDA: 32 heads x 128 x 128 fp32 state;
    # short convs for q, k and v (4,096 channels each, kernel 4 -> 3 taps kept), stored concatenated.
    full = {3, 7, 11, 15, 19, 23, 26}
    return CacheSpec(
        "kimi-linear-48b-a3b",
        _pattern(27, lambda i: i in full, MLA(kv_lora_rank=512, rope_dim=64),
                 LinearAttention((32, 128, 128), "float32", (3 * 4096, 3), "bfloat16", variant="kda")),
        notes="conv state: q, k, v short convs concatenated along channels",
    )


def _qwen_gated_deltanet(name: str, layers: int, value_heads: int, notes: str = "") -> CacheSpec:
    # Every 4th layer gated full attention (2 kv heads x 256); Gated DeltaNet with 16 key heads,
    # ``value_heads`` value heads, d_k = d_v = 128, conv kernel 4 (3 taps kept) over q, k and v channels.
    return CacheSpec(
        name,
        _pattern(layers, lambda i: i % 4 == 3, FullAttention(kv_heads=2, head_dim=256),
                 LinearAttention((value_heads, 128, 128), "float32", (2 * 16 * 128 + value_heads * 128, 3), "bfloat16",
                                 variant="gated_deltanet")),
        notes=notes,
    )


def qwen3_next_80b_a3b() -> CacheSpec:
    return _qwen_gated_deltanet("qwen3-next-80b-a3b", 48, value_heads=32)


def qwen3_5_397b_a17b() -> CacheSpec:
    return _qwen_gated_deltanet("qwen3.5-397b-a17b", 60, value_heads=64, notes="mamba_ssm_dtype float32")


def mimo_v2_flash() -> CacheSpec:
    # Layer 0 and every l with (l+1) % 6 == 0 are full GQA (4 kv heads); the rest sliding window 128
    # with 8 kv heads. K head dim 192, V head dim 128.
    return CacheSpec(
        "mimo-v2-flash",
        _pattern(48, lambda i: i == 0 or (i + 1) % 6 == 0, FullAttention(4, 192, v_head_dim=128),
                 SlidingWindow(8, 192, v_head_dim=128, window=128)),
    )


def ring_2_5_1t() -> CacheSpec:
    return CacheSpec(
        "ring-2.5-1t",
        _pattern(80, lambda i: i % 8 == 7, MLA(kv_lora_rank=512, rope_dim=64),
                 LinearAttention((64, 128, 128), "float32", None, variant="lightning")),
        notes="assumed: 80 layers in groups of 8 (1 MLA : 7 Lightning), 64 state heads, fp32 state, no conv",
    )


def _dense(name: str, layers: int, kv_heads: int, head_dim: int, notes: str = "") -> CacheSpec:
    return CacheSpec(name, tuple(FullAttention(kv_heads, head_dim) for _ in range(layers)), notes=notes)


PRESETS: dict[str, Callable[[], CacheSpec]] = {
    "kimi-linear-48b-a3b": kimi_linear_48b_a3b,
    "qwen3-next-80b-a3b": qwen3_next_80b_a3b,
    "qwen3.5-397b-a17b": qwen3_5_397b_a17b,
    "mimo-v2-flash": mimo_v2_flash,
    "ring-2.5-1t": ring_2_5_1t,
    "minimax-m2.5": lambda: _dense("minimax-m2.5", 62, 8, 128, notes="assumed: MiniMax-M2's layout"),
    "qwen3-235b-a22b": lambda: _dense("qwen3-235b-a22b", 94, 4, 128),
    "deepseek-v3": lambda: CacheSpec("deepseek-v3", tuple(MLA(512, 64) for _ in range(61))),
    "llama-3-70b": lambda: _dense("llama-3-70b", 80, 8, 128),
}


def get_preset(name: str) -> CacheSpec:
    """Return the preset called ``name``. Raises :class:`SpecError` for unknown names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise SpecError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
