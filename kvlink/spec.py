"""Declarative cache layouts.

A :class:`CacheSpec` is an ordered list of layers, each one of:

- :class:`FullAttention`: GQA/MHA, K and V per token (K and V head dims may differ);
- :class:`MLA`: one compressed latent per token (``kv_lora_rank + rope_dim`` values);
- :class:`SlidingWindow`: GQA limited to the last ``window`` tokens;
- :class:`LinearAttention`: a fixed-size request state: an optional short-conv state plus a
  recurrent (SSM / delta-rule / lightning) state, each with its own dtype.

Derived figures (bytes per token, fixed state per request, totals) and a stable fingerprint that
peers compare before accepting data. This module is a leaf: it imports nothing heavy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Union

from kvlink.errors import SpecError

DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_SIZES:
        raise SpecError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise SpecError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class FullAttention:
    """GQA/MHA layer: per token, ``kv_heads x head_dim`` keys and ``kv_heads x v_head_dim`` values."""

    kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    dtype: str = "bfloat16"
    kind: str = field(default="full", init=False)

    def __post_init__(self) -> None:
        _check_positive(kv_heads=self.kv_heads, head_dim=self.head_dim, v_head_dim=self.v_dim)
        _check_dtype(self.dtype)

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.head_dim

    @property
    def token_planes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Per-token tensors of this layer: (name, shape of one token)."""
        return (("k", (self.kv_heads, self.head_dim)), ("v", (self.kv_heads, self.v_dim)))

    @property
    def bytes_per_token(self) -> int:
        return self.kv_heads * (self.head_dim + self.v_dim) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SlidingWindow(FullAttention):
    """GQA layer that attends to the last ``window`` tokens only: only that window is live."""

    window: int = 0
    kind: str = field(default="sliding", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(window=self.window)


@dataclass(frozen=True)
class MLA:
    """Multi-head latent attention: one latent of ``kv_lora_rank + rope_dim`` values per token."""

    kv_lora_rank: int
    rope_dim: int
    dtype: str = "bfloat16"
    kind: str = field(default="mla", init=False)

    def __post_init__(self) -> None:
        _check_positive(kv_lora_rank=self.kv_lora_rank, rope_dim=self.rope_dim)
        _check_dtype(self.dtype)

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def token_planes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return (("latent", (self.latent_dim,)),)

    @property
    def bytes_per_token(self) -> int:
        return self.latent_dim * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class LinearAttention:
    """Linear-attention / SSM layer with a fixed-size state per request.

    ``conv_shape`` (optional) is the short-conv state of one request, e.g. ``(channels, kernel - 1)``;
    ``recurrent_shape`` the recurrent state, e.g. ``(heads, d_k, d_v)``. ``variant`` is informative
    ("kda", "gated_deltanet", "lightning", "mamba2").
    """

    recurrent_shape: tuple[int, ...]
    recurrent_dtype: str = "float32"
    conv_shape: tuple[int, ...] | None = None
    conv_dtype: str = "bfloat16"
    variant: str = "linear"
    kind: str = field(default="linear", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recurrent_shape", tuple(self.recurrent_shape))
        if self.conv_shape is not None:
            object.__setattr__(self, "conv_shape", tuple(self.conv_shape))
        for shape in (self.recurrent_shape, self.conv_shape or (1,)):
            if not shape or len(shape) > 5:
                raise SpecError(f"state shapes need 1..5 dims, got {shape}")
            _check_positive(**{f"dim{i}": d for i, d in enumerate(shape)})
        _check_dtype(self.recurrent_dtype)
        _check_dtype(self.conv_dtype)

    @property
    def states(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """The request-level tensors of this layer: (name, shape, dtype)."""
        out = []
        if self.conv_shape is not None:
            out.append(("conv", self.conv_shape, self.conv_dtype))
        out.append(("recurrent", self.recurrent_shape, self.recurrent_dtype))
        return tuple(out)

    @property
    def state_bytes(self) -> int:
        return sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, shape, dtype in self.states)


Layer = Union[FullAttention, SlidingWindow, MLA, LinearAttention]


@dataclass(frozen=True)
class CacheSpec:
    """An ordered list of layers plus the model name; the unit peers agree on."""

    name: str
    layers: tuple[Layer, ...]
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise SpecError("a cache spec needs at least one layer")
        if len(self.layers) > 65535:
            raise SpecError("at most 65535 layers")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, (FullAttention, MLA, LinearAttention)):
                raise SpecError(f"layer {i}: unsupported layer type {type(layer).__name__}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_indices(self, *kinds: str) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.kind in kinds]

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token over the full-attention and MLA layers (one logical copy)."""
        return sum(layer.bytes_per_token for layer in self.layers if layer.kind in ("full", "mla"))

    @property
    def linear_state_bytes(self) -> int:
        return sum(layer.state_bytes for layer in self.layers if layer.kind == "linear")

    def sliding_bytes(self, tokens: int) -> int:
        return sum(min(tokens, l.window) * l.bytes_per_token for l in self.layers if l.kind == "sliding")

    @property
    def fixed_state_bytes(self) -> int:
        """Bytes per request that do not grow with length: linear states plus full sliding windows."""
        return self.linear_state_bytes + self.sliding_bytes(1 << 62)

    def bytes_at(self, tokens: int) -> int:
        """Total cache bytes of one request of ``tokens`` tokens."""
        if tokens < 0:
            raise SpecError(f"tokens must be >= 0, got {tokens}")
        return self.kv_bytes_per_token * tokens + self.sliding_bytes(tokens) + self.linear_state_bytes

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": [asdict(l) for l in self.layers], "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        builders = {"full": FullAttention, "sliding": SlidingWindow, "mla": MLA, "linear": LinearAttention}
        layers = []
        try:
            for raw in data["layers"]:
                raw = dict(raw)
                kind = raw.pop("kind")
                layers.append(builders[kind](**raw))
            return cls(name=data["name"], layers=tuple(layers), notes=data.get("notes", ""))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed spec dict: {exc!r}") from exc

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """16 bytes identifying name, layer kinds, shapes and dtypes (not the notes). Computed once
        per spec (every field is immutable): packing reads it for every layer, and recomputing it
        (an ``asdict`` of all layers) made packing a many-layer model quadratic in its layers."""
        canon = {"name": self.name, "layers": [asdict(l) for l in self.layers]}
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"kvlink-spec-v1\0" + blob).digest()[:16]

    def summary(self, token_counts: list[int]) -> dict:
        """Figures ``kvlink spec`` prints."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
        return {
            "name": self.name,
            "layers": self.num_layers,
            "layer_kinds": counts,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "fixed_state_bytes": self.fixed_state_bytes,
            "totals": {str(t): self.bytes_at(t) for t in token_counts},
            "fingerprint": self.fingerprint.hex(),
            "notes": self.notes,
        }
