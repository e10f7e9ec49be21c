"""vLLM's registered KV caches as a kvlink spec and paged cache, in place (no copy, no re-layout).

What ``register_kv_caches`` hands a connector, per layer name:

- attention, CPU backend: ``[num_blocks, kv_heads, block_size, 2 * head_dim]``; inside each block
  and head, K is stored transposed (``[head_dim, block_size]``) and V as rows (``[block_size,
  head_dim]``): kvlink reads both through strided views. The interior depends on the kernel's ISA,
  so it is checked against vLLM's own ``cpu_attn_reshape_and_cache`` once per shape
  (:func:`check_cpu_interior`); an interior that differs is refused, not guessed.
- attention, CUDA FlashAttention (NHD): ``[2, num_blocks, block_size, kv_heads, head_dim]``, which
  is kvlink's ``kv_first`` layout.
- linear attention / Mamba (hybrid allocator): a list of state views ``[num_blocks, *shape]`` over
  the raw pages; a request's state lives in the page its group's block list ends with.

The spec is built from those tensors themselves, so both servers of a model build the same one
(fingerprint ``vllm:<model_type>`` + every layer's shapes), checked at the transport handshake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlink.errors import IncompatibleLayoutError
from kvlink.serde import PagedCache
from kvlink.serde.layout import TORCH_DTYPES
from kvlink.spec import CacheSpec, Layer, StateTensor, TokenTensor

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _dtype_name(dtype: torch.dtype, what: str) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise IncompatibleLayoutError(f"{what}: dtype {dtype} is not one kvlink carries") from None


@dataclass
class VllmLayout:
    """The kvlink view of one vLLM worker's cache.

    ``layer_index``: vLLM layer name -> kvlink layer; ``layer_group``: kvlink layer -> the
    transfer group index whose block list addresses it; ``attention_group``: the one group of the
    token layers (None for a state-only model); ``kernel_ratio``: kernel blocks per scheduler block.
    """

    spec: CacheSpec
    paged: PagedCache
    layer_index: dict[str, int]
    layer_group: dict[int, int]
    attention_group: int | None
    kernel_ratio: int = 1

    def token_blocks(self, group_blocks: tuple[list[int], ...] | list[list[int]]) -> list[int]:
        """Kernel block ids of the token layers, from a request's per-group scheduler block lists."""
        if self.attention_group is None:
            return []
        ids = group_blocks[self.attention_group]
        r = self.kernel_ratio
        return [b * r + i for b in ids for i in range(r)] if r > 1 else list(ids)

    def state_slots(self, group_blocks: tuple[list[int], ...] | list[list[int]]) -> dict[int, int]:
        """Per state layer, the page holding the request's running state: its group's last block."""
        slots = {}
        for layer, group in self.layer_group.items():
            if self.spec.layers[layer].states:
                blocks = group_blocks[group]
                if not blocks:
                    raise IncompatibleLayoutError(f"layer {layer}: the request holds no state page in group {group}")
                slots[layer] = int(blocks[-1])
        return slots


def _cpu_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a CPU-backend layer as ``[num_blocks, block_size, kv_heads, head_dim]`` views."""
    nb, heads, bs, two_hd = t.shape
    hd = two_hd // 2
    halves = t.view(nb, heads, 2, bs * hd)
    k = halves[:, :, 0].view(nb, heads, hd, bs).permute(0, 3, 1, 2)
    v = halves[:, :, 1].view(nb, heads, bs, hd).permute(0, 2, 1, 3)
    return k, v


_CHECKED_INTERIORS: set = set()


def check_cpu_interior(heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> None:
    """Write known keys and values with vLLM's own CPU cache kernel and read them back through
    :func:`_cpu_views`; raises :class:`IncompatibleLayoutError` naming the ISA when they differ."""
    key = (heads, block_size, head_dim, dtype)
    if key in _CHECKED_INTERIORS:
        return
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_dim)
    cache = torch.zeros(2, heads, block_size, 2 * head_dim, dtype=dtype)
    k_cache, v_cache = cache.view(2, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(block_size, heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(block_size, heads, head_dim, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(keys, values, k_cache, v_cache, torch.arange(block_size, 2 * block_size), isa)
    k, v = _cpu_views(cache)
    if not (torch.equal(k[1], keys) and torch.equal(v[1], values)):
        raise IncompatibleLayoutError(f"vLLM's CPU attention cache for ISA {isa!r} ({dtype}, block {block_size}, "
                                      f"head_dim {head_dim}) is not laid out as kvlink reads it (K transposed, V rows "
                                      "per block and head); kvlink cannot carry it")
    _CHECKED_INTERIORS.add(key)


def _spec_kind(spec) -> str:
    """'attention' or 'state' for a vLLM KVCacheSpec (by class, without importing vLLM)."""
    names = {cls.__name__ for cls in type(spec).__mro__}
    if "AttentionSpec" in names and "MambaSpec" not in names:
        if "FullAttentionSpec" not in names or "SlidingWindowSpec" in names or "ChunkedLocalAttentionSpec" in names:
            raise IncompatibleLayoutError(f"{type(spec).__name__}: kvlink's vLLM connector carries full attention "
                                          "and Mamba-style state groups only")
        return "attention"
    if "MambaSpec" in names:
        return "state"
    raise IncompatibleLayoutError(f"{type(spec).__name__}: a KV-cache group kind kvlink's vLLM connector does not carry")


def build_layout(kv_caches: dict, groups: list[tuple[list[str], object]], model_type: str) -> VllmLayout:
    """The kvlink spec and paged cache over ``kv_caches`` (``register_kv_caches``' argument).

    ``groups``: the transfer groups as ``(layer names, KVCacheSpec)``. Raises
    :class:`IncompatibleLayoutError` for a layer, group or interior kvlink cannot carry (a
    sliding-window group, token layers in two groups, an unknown tensor form or dtype).
    """
    group_of = {}
    kinds = {}
    for g, (names, spec) in enumerate(groups):
        kinds[g] = _spec_kind(spec)
        for name in names:
            group_of[name] = g
    attention_groups = sorted({g for g, k in kinds.items() if k == "attention"})
    if len(attention_groups) > 1:
        raise IncompatibleLayoutError(f"token layers in {len(attention_groups)} KV-cache groups (block tables); "
                                      "kvlink's vLLM connector carries one")
    attention_group = attention_groups[0] if attention_groups else None
    missing = sorted(set(kv_caches) - set(group_of))
    if missing:
        raise IncompatibleLayoutError(f"layers {missing[:3]} belong to no transfer group")
    layers, tensors, layer_index, layer_group = [], {}, {}, {}
    block_size = ratio = None
    for i, name in enumerate(kv_caches):
        t, g = kv_caches[name], group_of[name]
        layer_index[name], layer_group[i] = i, g
        what = f"vLLM layer {name}"
        if kinds[g] == "attention":
            if not isinstance(t, torch.Tensor):
                raise IncompatibleLayoutError(f"{what}: expected one cache tensor, got {type(t).__name__}")
            dtype = _dtype_name(t.dtype, what)
            if t.device.type == "cpu" and t.dim() == 4:
                nb, heads, bs, two_hd = t.shape
                check_cpu_interior(heads, bs, two_hd // 2, t.dtype)
                k, v = _cpu_views(t)
            elif t.dim() == 5 and t.shape[0] == 2:  # FlashAttention NHD: kv_first
                k, v = t[0], t[1]
            else:
                raise IncompatibleLayoutError(f"{what}: cache shape {tuple(t.shape)} on {t.device.type} is not a "
                                              "layout kvlink's vLLM connector knows")
            bs = k.shape[1]
            if block_size not in (None, bs):
                raise IncompatibleLayoutError(f"{what}: block size {bs}, other layers {block_size}")
            block_size = bs
            group_bs = int(getattr(groups[g][1], "block_size", bs))
            if group_bs % bs:
                raise IncompatibleLayoutError(f"{what}: scheduler block {group_bs} is not a multiple of kernel block {bs}")
            ratio = group_bs // bs
            shape = tuple(k.shape[2:])
            layers.append(Layer(tokens=(TokenTensor("k", shape, dtype), TokenTensor("v", shape, dtype)),
                                variant="vllm-attention"))
            tensors[(i, "k")], tensors[(i, "v")] = k, v
        else:
            parts = list(t) if isinstance(t, (list, tuple)) else [t]
            if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
                raise IncompatibleLayoutError(f"{what}: expected state tensors, got {type(t).__name__}")
            names_ = ["conv", "recurrent"] if len(parts) == 2 else [f"state{j}" for j in range(len(parts))]
            states = []
            for sname, p in zip(names_, parts):
                states.append(StateTensor(sname, tuple(p.shape[1:]), _dtype_name(p.dtype, f"{what} {sname}")))
                tensors[(i, sname)] = p
            layers.append(Layer(states=tuple(states), variant="vllm-state"))
    spec = CacheSpec(f"vllm:{model_type}", tuple(layers))
    paged = PagedCache(spec, block_size or 1, tensors=tensors)
    return VllmLayout(spec, paged, layer_index, layer_group, attention_group, ratio or 1)
