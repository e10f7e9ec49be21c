"""Engine-native paged caches and the request references into them.

KV layouts (a layer's ``k`` and ``v`` token tensors):

- ``blocks_first``: ``[num_blocks, 2, block_size, kv_heads, head_dim]`` (FlashInfer style);
- ``kv_first``: ``[2, num_blocks, block_size, kv_heads, head_dim]`` (vLLM FlashAttention style);
- ``split``: a ``(k, v)`` pair of ``[num_blocks, block_size, kv_heads, head_dim]``; needed when K and
  V head dims differ.

Other token tensors (an MLA latent, indexer keys) are ``[num_blocks, block_size, *shape]``; states
keep a pool per tensor, ``[num_slots, *state_shape]``.

A token tensor may be any strided view of that shape (an engine's own block interior, e.g. vLLM's
CPU cache with K transposed per block and head): contiguous blocks are copied as rows, other views
element-wise through the view, never by reshaping the engine's tensor.
"""

from __future__ import annotations

import operator
from collections import abc
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Mapping, Sequence

import torch

from kvlink.errors import ConfigError, IncompatibleLayoutError
from kvlink.serde.layout import TORCH_DTYPES
from kvlink.spec import CacheSpec


class KVLayout(str, Enum):
    BLOCKS_FIRST = "blocks_first"
    KV_FIRST = "kv_first"
    SPLIT = "split"


def _layout(value) -> KVLayout:
    """``value`` as a :class:`KVLayout`; anything else is a :class:`ConfigError`."""
    try:
        return KVLayout(value)
    except ValueError:
        raise ConfigError(f"unknown KV layout {value!r}; expected one of {[v.value for v in KVLayout]}") from None


def _index(value, what: str) -> int:
    """``value`` as an int (ints, numpy ints); a bool, float or str is a :class:`ConfigError`."""
    try:
        if not isinstance(value, bool):
            return operator.index(value)
    except TypeError:
        pass
    raise ConfigError(f"{what} must be an int, got {value!r}")


def _tensor(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise IncompatibleLayoutError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _expect(t: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise IncompatibleLayoutError(f"{what}: expected {tuple(shape)} {dtype}, got {tuple(t.shape)} {t.dtype}")


def _block_rows(plane: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, *token] as block rows [num_blocks, block_size * token_elems] when
    each block is contiguous; else the strided plane itself (copied through the view)."""
    expected = 1
    for size, stride in reversed(list(zip(plane.shape[1:], plane.stride()[1:]))):
        if size != 1 and stride != expected:
            return plane
        expected *= size
    return plane.view(plane.shape[0], -1)  # a view, never a copy: writes must reach the cache


@dataclass
class PagedCache:
    """An engine's cache tensors for one spec, by layer index; validated on construction.

    Each token tensor of a layer is ``[num_blocks, block_size, *shape]`` (each block contiguous),
    each state a pool ``[num_slots, *shape]``. Where they come from, by component name:

    - ``tensors[(layer, name)]``: any component;
    - ``kv[layer]``: ``k`` and ``v`` together in ``layout`` (a pair for ``split``), or the one
      token tensor of a single-tensor layer (an MLA latent);
    - ``conv[layer]`` / ``recurrent[layer]``: states named ``conv`` / ``recurrent``.

    A tensor given for no component, or a component without a tensor, is an
    :class:`IncompatibleLayoutError`, as is anything but a tensor where one is expected, any
    shape, dtype or device mismatch, or a tensor with no blocks (no slots). A ``spec`` that is
    not a :class:`CacheSpec`, an unknown ``layout`` or a ``block_size`` that is not a positive int
    is a :class:`ConfigError`.
    """

    spec: CacheSpec
    block_size: int
    kv: Mapping[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    conv: Mapping[int, torch.Tensor] = field(default_factory=dict)
    recurrent: Mapping[int, torch.Tensor] = field(default_factory=dict)
    layout: KVLayout = KVLayout.BLOCKS_FIRST
    tensors: Mapping[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, CacheSpec):
            raise ConfigError(f"expected a CacheSpec, got {type(self.spec).__name__}")
        self.layout = _layout(self.layout)
        self.block_size = _index(self.block_size, "block_size")
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        self._planes: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._states: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._by_component: dict[tuple[int, int], torch.Tensor] = {}
        self.entry_plans: dict = {}  # payload layouts worked out once (kvlink.serde.entry_plan)
        self.num_blocks = self.num_slots = 0
        used: set = set()
        for i, layer in enumerate(self.spec.layers):
            given = self._token_sources(i, layer, used)
            self._planes[i] = [(c, self._check_plane(i, t, given[t.name])) for c, t in enumerate(layer.tokens)]
            base = len(layer.tokens)
            self._states[i] = [(base + c, self._check_state(i, s, used)) for c, s in enumerate(layer.states)]
            for c, t in (*self._planes[i], *self._states[i]):
                self._by_component[(i, c)] = t
        unused = [f"kv[{k}]" for k in self.kv if ("kv", k) not in used]
        unused += [f"{src}[{k}]" for src in ("conv", "recurrent") for k in getattr(self, src) if (src, k) not in used]
        unused += [f"tensors[{k!r}]" for k in self.tensors if ("tensors", k) not in used]
        if unused:
            raise IncompatibleLayoutError(f"{', '.join(unused[:5])}: given for no component of {self.spec.name}")
        tensors = list(self._by_component.values())
        self.device = tensors[0].device if tensors else torch.device("cpu")
        if any(t.device != self.device for t in tensors):
            raise IncompatibleLayoutError("all cache tensors must be on one device")

    def _token_sources(self, i: int, layer, used: set) -> dict[str, torch.Tensor]:
        """``{token tensor name: [num_blocks, block_size, *shape] tensor}`` for layer ``i``."""
        given = {}
        for t in layer.tokens:
            if (i, t.name) in self.tensors:
                given[t.name] = self.tensors[(i, t.name)]
                used.add(("tensors", (i, t.name)))
        rest = [t for t in layer.tokens if t.name not in given]
        if i in self.kv and rest:
            used.add(("kv", i))
            what, t = f"layer {i} ({layer.kind})", self.kv[i]
            names = sorted(r.name for r in rest)
            if names == ["k", "v"]:
                given.update(zip(("k", "v"), self._split_kv(t, layer, what)))
            elif len(rest) == 1 and not isinstance(t, tuple):
                given[rest[0].name] = t
            else:
                raise IncompatibleLayoutError(f"{what}: kv[{i}] cannot hold components {names}; pass tensors[(layer, name)]")
        missing = [t.name for t in layer.tokens if t.name not in given]
        if missing:
            raise IncompatibleLayoutError(f"layer {i} ({layer.kind}): no tensor given for {missing}")
        return given

    def _split_kv(self, t, layer, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        k_spec, v_spec = (next(x for x in layer.tokens if x.name == n) for n in ("k", "v"))
        if self.layout is KVLayout.SPLIT:
            if not isinstance(t, tuple) or len(t) != 2:
                raise IncompatibleLayoutError(f"{what}: split layout needs a (k, v) pair")
            return t
        if isinstance(t, tuple):
            raise IncompatibleLayoutError(f"{what}: a (k, v) pair needs layout='split'")
        t = _tensor(t, f"{what} kv")
        if k_spec.shape != v_spec.shape or k_spec.dtype != v_spec.dtype:
            raise IncompatibleLayoutError(f"{what}: K and V differ ({k_spec.shape}, {v_spec.shape}); use the split layout")
        if self.layout is KVLayout.BLOCKS_FIRST:
            if t.dim() < 2 or t.shape[1] != 2:
                raise IncompatibleLayoutError(f"{what}: blocks_first KV is [num_blocks, 2, block_size, ...], got {tuple(t.shape)}")
            return t[:, 0], t[:, 1]
        if t.dim() < 1 or t.shape[0] != 2:
            raise IncompatibleLayoutError(f"{what}: kv_first KV is [2, num_blocks, block_size, ...], got {tuple(t.shape)}")
        return t[0], t[1]

    def _check_plane(self, i: int, comp, t: torch.Tensor) -> torch.Tensor:
        what = f"layer {i} {comp.name}"
        t = _tensor(t, what)
        if t.dim() < 1 or t.shape[0] == 0:  # no blocks: nothing to address (and no block-row view)
            raise IncompatibleLayoutError(f"{what}: expected [num_blocks >= 1, block_size, ...], got {tuple(t.shape)}")
        self.num_blocks = self.num_blocks or t.shape[0]  # every tensor must then agree (checked by _expect)
        _expect(t, (self.num_blocks, self.block_size, *comp.shape), TORCH_DTYPES[comp.dtype], what)
        return _block_rows(t)

    def _check_state(self, i: int, comp, used: set) -> torch.Tensor:
        what = f"layer {i} {comp.name} state"
        if (i, comp.name) in self.tensors:
            pool = self.tensors[(i, comp.name)]
            used.add(("tensors", (i, comp.name)))
        elif comp.name in ("conv", "recurrent") and i in getattr(self, comp.name):
            pool = getattr(self, comp.name)[i]
            used.add((comp.name, i))
        else:
            raise IncompatibleLayoutError(f"{what}: no state pool given")
        pool = _tensor(pool, what)
        if pool.dim() < 1 or pool.shape[0] == 0:  # 0 slots would also make the other pools' count unchecked
            raise IncompatibleLayoutError(f"{what}: expected [num_slots >= 1, ...], got {tuple(pool.shape)}")
        self.num_slots = self.num_slots or pool.shape[0]
        _expect(pool, (self.num_slots, *comp.shape), TORCH_DTYPES[comp.dtype], what)
        if not pool[0].is_contiguous():
            raise IncompatibleLayoutError(f"{what}: each slot must be contiguous")
        return pool

    def planes(self, layer: int) -> list[tuple[int, torch.Tensor]]:
        """``(component, rows)`` of a layer's token tensors: block-row views ``[num_blocks, block_size * token_elems]``
        (or the strided ``[num_blocks, block_size, *shape]`` plane when blocks are not contiguous).

        Raises :class:`IncompatibleLayoutError` for a layer the spec does not have."""
        return self._lookup(self._planes, layer)

    def states(self, layer: int) -> list[tuple[int, torch.Tensor]]:
        """``(component, pool)`` of a layer's states: pools ``[num_slots, *shape]``.

        Raises :class:`IncompatibleLayoutError` for a layer the spec does not have."""
        return self._lookup(self._states, layer)

    def tensor(self, layer: int, component: int) -> torch.Tensor:
        """Block rows of a token tensor, or the slot pool of a state, by component index.

        Raises :class:`IncompatibleLayoutError` for a (layer, component) the spec does not have:
        asking for it means the caller's layout is not this cache's."""
        return self._lookup(self._by_component, (layer, component))

    def _lookup(self, table: dict, key):
        try:
            return table[key]
        except (KeyError, TypeError):  # TypeError: an unhashable key
            raise IncompatibleLayoutError(f"{self.spec.name} has no layer/component {key!r}") from None

    @classmethod
    def allocate(cls, spec: CacheSpec, num_blocks: int, block_size: int, num_slots: int = 1,
                 layout: KVLayout | str = KVLayout.BLOCKS_FIRST, device: str | torch.device = "cpu",
                 fill: str = "empty") -> "PagedCache":
        """Allocate a cache for ``spec`` (tests, benchmarks, demos). ``fill``: empty, zeros or randn.
        Raises :class:`ConfigError` for an unknown ``layout`` or a count that is not an int.

        K and V go together in ``layout`` (``split`` when some layer's K and V differ in shape);
        other token tensors and states are given by name."""
        layout = _layout(layout)
        num_blocks, block_size = _index(num_blocks, "num_blocks"), _index(block_size, "block_size")
        num_slots = _index(num_slots, "num_slots")

        def kv_pair(layer):
            names = {t.name: t for t in layer.tokens}
            return (names["k"], names["v"]) if "k" in names and "v" in names else None

        if any((p := kv_pair(l)) and (p[0].shape, p[0].dtype) != (p[1].shape, p[1].dtype) for l in spec.layers):
            layout = KVLayout.SPLIT  # one tensor cannot hold K and V of different shapes

        def new(shape, dtype_name):
            dtype = TORCH_DTYPES[dtype_name]
            if fill == "randn" and dtype.is_floating_point:
                return torch.randn(shape, device=device).to(dtype)
            if fill == "randn":
                return torch.randint(0, 2 if dtype == torch.bool else 100, shape, device=device).to(dtype)
            return (torch.zeros if fill == "zeros" else torch.empty)(shape, dtype=dtype, device=device)

        kv, tensors = {}, {}
        for i, layer in enumerate(spec.layers):
            pair = kv_pair(layer)
            if pair:
                k, v = pair
                if layout is KVLayout.SPLIT:
                    kv[i] = (new((num_blocks, block_size, *k.shape), k.dtype), new((num_blocks, block_size, *v.shape), v.dtype))
                elif layout is KVLayout.BLOCKS_FIRST:
                    kv[i] = new((num_blocks, 2, block_size, *k.shape), k.dtype)
                else:
                    kv[i] = new((2, num_blocks, block_size, *k.shape), k.dtype)
            for t in layer.tokens:
                if not pair or t.name not in ("k", "v"):
                    tensors[(i, t.name)] = new((num_blocks, block_size, *t.shape), t.dtype)
            for s in layer.states:
                tensors[(i, s.name)] = new((num_slots, *s.shape), s.dtype)
        return cls(spec, block_size, kv, layout=layout, tensors=tensors)


@dataclass(frozen=True)
class CacheRef:
    """Where one request's cache lives: block ids covering tokens [0, num_tokens), and a state slot.

    ``token_start`` (a multiple of the block size) is the first token a payload carries; tokens
    before it are the prefix the receiver already holds. ``state_slot`` is one slot for every
    layer, or ``{layer: slot}`` when each layer's state lives elsewhere (vLLM's hybrid allocator
    gives each group of linear-attention layers its own block).
    """

    block_ids: Sequence[int] | torch.Tensor
    num_tokens: int
    state_slot: int | Mapping[int, int] | None = None
    token_start: int = 0

    def span(self, num_tokens: int, token_start: int = 0) -> "CacheRef":
        """The same blocks and slots for tokens ``[token_start, num_tokens)``."""
        return replace(self, num_tokens=num_tokens, token_start=token_start)

    def checked(self, cache: PagedCache) -> "CacheRef":
        """The same reference with its block ids validated for ``cache`` once (as
        :meth:`block_ids_checked` does): its spans then skip converting and checking a long id
        list again and again (a request packed pool block by pool block). Raises as
        :meth:`block_ids_checked`."""
        ids, host = self.block_ids_checked(cache)
        return replace(self, block_ids=CheckedIds(cache, ids, host))

    def block_ids_checked(self, cache: PagedCache) -> tuple[torch.Tensor, list[int]]:
        """Validated block ids covering [0, num_tokens): on the cache's device, and as a host list.

        Checked on the host so that a CUDA cache needs no device round trip. Raises
        :class:`ConfigError` for block ids that are not integers (``["a"]``, ``[0.5]``: never
        truncated), too few or repeated ids, an id out of range, or a bad ``num_tokens`` or
        ``token_start``.
        """
        if isinstance(self.block_ids, CheckedIds) and self.block_ids.cache is cache:
            return self.block_ids.cover(self)
        ids = _block_ids(self.block_ids)
        num_tokens = _index(self.num_tokens, "num_tokens")
        _index(self.token_start, "token_start")
        bs = cache.block_size
        if not cache.num_blocks:  # a spec without attention layers has no blocks to address
            return ids[:0].to(cache.device), []
        need = -(-num_tokens // bs)  # exact for any int (a float ceil rounds huge counts)
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

    def slot(self, cache: PagedCache, layer: int | None = None) -> int:
        """The request's state slot for ``layer`` (-1 when the cache keeps no states). Raises
        :class:`ConfigError` when it is missing (per-layer slots without this layer), not an int
        or out of range."""
        if cache.num_slots == 0:
            return -1
        slot = self.state_slot
        if isinstance(slot, Mapping):
            slot = slot.get(layer)
        slot = None if slot is None else _index(slot, "state_slot")
        if slot is None or not 0 <= slot < cache.num_slots:
            raise ConfigError(f"state_slot {slot if slot is not None else self.state_slot} (layer {layer}) out of range [0, {cache.num_slots})")
        return slot


class CheckedIds(abc.Sequence):
    """Block ids already validated for one cache (:meth:`CacheRef.checked`): a sequence of ints,
    kept as the device tensor and host list that validation returns."""

    def __init__(self, cache: PagedCache, ids: torch.Tensor, host: list[int]):
        self.cache, self.ids, self.host = cache, ids, host

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, i):
        return self.host[i]

    def cover(self, ref: CacheRef) -> tuple[torch.Tensor, list[int]]:
        """:meth:`CacheRef.block_ids_checked` for a span of the validated reference: only the
        token range is checked again (the ids were: range, repeats)."""
        need = self.check(ref)
        return self.ids[:need], self.host[:need]

    def check(self, ref: CacheRef) -> int:
        """The token range checks of :meth:`cover` alone (no list is sliced): the number of
        blocks ``ref`` covers. Raises :class:`ConfigError` as :meth:`cover`."""
        num_tokens, token_start = _index(ref.num_tokens, "num_tokens"), _index(ref.token_start, "token_start")
        bs = self.cache.block_size
        if not self.cache.num_blocks:
            return 0
        need = -(-num_tokens // bs)
        if num_tokens < 0 or need > len(self.host):
            raise ConfigError(f"{len(self.host)} blocks cannot hold {num_tokens} tokens of block size {bs}")
        if not 0 <= token_start <= num_tokens or token_start % bs:
            raise ConfigError(f"token_start {token_start} must be a multiple of {bs} within [0, {num_tokens}]")
        return need


def _block_ids(block_ids) -> torch.Tensor:
    """Block ids as a flat int64 host tensor; non-integer ids are a :class:`ConfigError`."""
    if isinstance(block_ids, CheckedIds):
        block_ids = block_ids.host
    try:
        ids = torch.as_tensor(block_ids)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ConfigError(f"block ids must be integers: {exc}") from None
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise ConfigError(f"block ids must be integers, got {ids.dtype}")
    return ids.reshape(-1).to(device="cpu", dtype=torch.int64)
