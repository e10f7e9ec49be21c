"""Engine-native paged caches and the request references into them.

KV layouts (per full-attention or sliding layer):

- ``blocks_first``: ``[num_blocks, 2, block_size, kv_heads, head_dim]`` (FlashInfer style);
- ``kv_first``: ``[2, num_blocks, block_size, kv_heads, head_dim]`` (vLLM FlashAttention style);
- ``split``: a ``(k, v)`` pair of ``[num_blocks, block_size, kv_heads, head_dim]``; needed when K and
  V head dims differ.

MLA layers are ``[num_blocks, block_size, kv_lora_rank + rope_dim]``; linear layers keep a pool per
state tensor, ``[num_slots, *state_shape]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Sequence

import torch

from kvlink.errors import ConfigError, IncompatibleLayoutError
from kvlink.serde.layout import TORCH_DTYPES, SegmentKind
from kvlink.spec import CacheSpec


class KVLayout(str, Enum):
    BLOCKS_FIRST = "blocks_first"
    KV_FIRST = "kv_first"
    SPLIT = "split"


def _expect(t: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise IncompatibleLayoutError(f"{what}: expected {tuple(shape)} {dtype}, got {tuple(t.shape)} {t.dtype}")


def _block_rows(plane: torch.Tensor, what: str) -> torch.Tensor:
    """View [num_blocks, block_size, *token] as [num_blocks, block_size * token_elems]."""
    expected = 1
    for size, stride in reversed(list(zip(plane.shape[1:], plane.stride()[1:]))):
        if size != 1 and stride != expected:
            raise IncompatibleLayoutError(f"{what}: each block must be contiguous (strides {plane.stride()})")
        expected *= size
    return plane.view(plane.shape[0], -1)  # a view, never a copy: writes must reach the cache


@dataclass
class PagedCache:
    """An engine's cache tensors for one spec, by layer index; validated on construction."""

    spec: CacheSpec
    block_size: int
    kv: Mapping[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    conv: Mapping[int, torch.Tensor] = field(default_factory=dict)
    recurrent: Mapping[int, torch.Tensor] = field(default_factory=dict)
    layout: KVLayout = KVLayout.BLOCKS_FIRST

    def __post_init__(self) -> None:
        self.layout = KVLayout(self.layout)
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        self._planes: dict[int, list[tuple[SegmentKind, torch.Tensor]]] = {}
        self._states: dict[int, list[tuple[SegmentKind, torch.Tensor]]] = {}
        self.num_blocks = self.num_slots = 0
        for i, layer in enumerate(self.spec.layers):
            if layer.kind == "linear":
                self._states[i] = self._check_states(i, layer)
            else:
                self._planes[i] = self._check_planes(i, layer)
        tensors = [t for group in (*self._planes.values(), *self._states.values()) for _, t in group]
        self.device = tensors[0].device
        if any(t.device != self.device for t in tensors):
            raise IncompatibleLayoutError("all cache tensors must be on one device")

    def _check_planes(self, i: int, layer) -> list[tuple[SegmentKind, torch.Tensor]]:
        if i not in self.kv:
            raise IncompatibleLayoutError(f"layer {i} ({layer.kind}): no KV tensor given")
        dtype = TORCH_DTYPES[layer.dtype]
        t = self.kv[i]
        if isinstance(t, tuple):
            nb = t[0].shape[0] if t else 0
        else:
            nb = t.shape[1] if self.layout is KVLayout.KV_FIRST and layer.kind != "mla" else t.shape[0]
        self.num_blocks = self.num_blocks or nb  # every layer must then agree (checked by _expect)
        nb, bs, what = self.num_blocks, self.block_size, f"layer {i} ({layer.kind})"
        if layer.kind == "mla":
            _expect(t, (nb, bs, layer.latent_dim), dtype, what)
            return [(SegmentKind.LATENT, _block_rows(t, what))]
        h, dk, dv = layer.kv_heads, layer.head_dim, layer.v_dim
        if self.layout is KVLayout.SPLIT:
            if not isinstance(t, tuple) or len(t) != 2:
                raise IncompatibleLayoutError(f"{what}: split layout needs a (k, v) pair")
            _expect(t[0], (nb, bs, h, dk), dtype, what + " k")
            _expect(t[1], (nb, bs, h, dv), dtype, what + " v")
            k, v = t
        else:
            if dk != dv:
                raise IncompatibleLayoutError(f"{what}: K and V head dims differ ({dk}, {dv}); use the split layout")
            if self.layout is KVLayout.BLOCKS_FIRST:
                _expect(t, (nb, 2, bs, h, dk), dtype, what)
                k, v = t[:, 0], t[:, 1]
            else:
                _expect(t, (2, nb, bs, h, dk), dtype, what)
                k, v = t[0], t[1]
        return [(SegmentKind.K, _block_rows(k, what + " k")), (SegmentKind.V, _block_rows(v, what + " v"))]

    def _check_states(self, i: int, layer) -> list[tuple[SegmentKind, torch.Tensor]]:
        out = []
        for name, shape, dtype in layer.states:
            pool = (self.conv if name == "conv" else self.recurrent).get(i)
            what = f"layer {i} {name} state"
            if pool is None:
                raise IncompatibleLayoutError(f"{what}: no state pool given")
            self.num_slots = self.num_slots or pool.shape[0]
            _expect(pool, (self.num_slots, *shape), TORCH_DTYPES[dtype], what)
            if not pool[0].is_contiguous():
                raise IncompatibleLayoutError(f"{what}: each slot must be contiguous")
            out.append((SegmentKind.CONV if name == "conv" else SegmentKind.RECURRENT, pool))
        return out

    def planes(self, layer: int) -> list[tuple[SegmentKind, torch.Tensor]]:
        """Block-row views ``[num_blocks, block_size * token_elems]`` of an attention layer."""
        return self._planes[layer]

    def states(self, layer: int) -> list[tuple[SegmentKind, torch.Tensor]]:
        """State pools ``[num_slots, *shape]`` of a linear layer."""
        return self._states[layer]

    @classmethod
    def allocate(cls, spec: CacheSpec, num_blocks: int, block_size: int, num_slots: int = 1,
                 layout: KVLayout | str = KVLayout.BLOCKS_FIRST, device: str | torch.device = "cpu",
                 fill: str = "empty") -> "PagedCache":
        """Allocate a cache for ``spec`` (tests, benchmarks, demos). ``fill``: empty, zeros or randn."""
        layout = KVLayout(layout)
        if any(l.kind in ("full", "sliding") and l.head_dim != l.v_dim for l in spec.layers):
            layout = KVLayout.SPLIT  # one tensor cannot hold K and V of different head dims

        def new(shape, dtype_name):
            dtype = TORCH_DTYPES[dtype_name]
            if fill == "randn":
                return torch.randn(shape, device=device).to(dtype)
            return (torch.zeros if fill == "zeros" else torch.empty)(shape, dtype=dtype, device=device)

        kv, conv, rec = {}, {}, {}
        for i, layer in enumerate(spec.layers):
            if layer.kind == "mla":
                kv[i] = new((num_blocks, block_size, layer.latent_dim), layer.dtype)
            elif layer.kind in ("full", "sliding"):
                h, dk, dv = layer.kv_heads, layer.head_dim, layer.v_dim
                if layout is KVLayout.SPLIT:
                    kv[i] = (new((num_blocks, block_size, h, dk), layer.dtype), new((num_blocks, block_size, h, dv), layer.dtype))
                elif layout is KVLayout.BLOCKS_FIRST:
                    kv[i] = new((num_blocks, 2, block_size, h, dk), layer.dtype)
                else:
                    kv[i] = new((2, num_blocks, block_size, h, dk), layer.dtype)
            else:
                for name, shape, dtype in layer.states:
                    (conv if name == "conv" else rec)[i] = new((num_slots, *shape), dtype)
        return cls(spec, block_size, kv, conv, rec, layout)


@dataclass(frozen=True)
class CacheRef:
    """Where one request's cache lives: block ids covering tokens [0, num_tokens), and a state slot.

    ``token_start`` (a multiple of the block size) is the first token a payload carries; tokens
    before it are the prefix the receiver already holds.
    """

    block_ids: Sequence[int] | torch.Tensor
    num_tokens: int
    state_slot: int | None = None
    token_start: int = 0

    def block_ids_checked(self, cache: PagedCache) -> tuple[torch.Tensor, list[int]]:
        """Validated block ids covering [0, num_tokens): on the cache's device, and as a host list.

        Checked on the host so that a CUDA cache needs no device round trip.
        """
        ids = torch.as_tensor(self.block_ids, dtype=torch.int64).reshape(-1).cpu()
        bs = cache.block_size
        if not cache.num_blocks:  # a spec without attention layers has no blocks to address
            return ids[:0].to(cache.device), []
        need = math.ceil(self.num_tokens / bs)
        if self.num_tokens < 0 or ids.numel() < need:
            raise ConfigError(f"{ids.numel()} blocks cannot hold {self.num_tokens} tokens of block size {bs}")
        if not 0 <= self.token_start <= self.num_tokens or self.token_start % bs:
            raise ConfigError(f"token_start {self.token_start} must be a multiple of {bs} within [0, {self.num_tokens}]")
        ids = ids[:need]
        if need and (int(ids.min()) < 0 or int(ids.max()) >= cache.num_blocks):
            raise ConfigError(f"block id out of range [0, {cache.num_blocks})")
        if torch.unique(ids).numel() != ids.numel():
            raise ConfigError("block ids repeat")
        return ids.to(cache.device), ids.tolist()

    def slot(self, cache: PagedCache) -> int:
        if cache.num_slots == 0:
            return -1
        if self.state_slot is None or not 0 <= self.state_slot < cache.num_slots:
            raise ConfigError(f"state_slot {self.state_slot} out of range [0, {cache.num_slots})")
        return self.state_slot
