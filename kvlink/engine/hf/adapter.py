"""Copies a transformers cache to and from a kvlink :class:`~kvlink.serde.PagedCache`, every tensor.

Export compares what the cache object holds with what the spec carries, tensor by tensor, and
refuses (naming the layer and component) rather than drop anything. Rebuilding restores the
tensors and the bookkeeping transformers needs to continue without a re-prefill: sliding layers'
``cumulative_length``, linear layers' ``has_previous_state`` and conv kernel sizes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvlink.engine.hf.layers import Slot, from_token_rows, inventory, slots, token_rows
from kvlink.engine.hf.spec import num_layers, trace_cache, window_of
from kvlink.errors import ConfigError, IncompatibleLayoutError, SpecError
from kvlink.serde.layout import TORCH_DTYPES
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.tokens import copy_tokens
from kvlink.spec import CacheSpec


class HFCacheAdapter:
    """Moves requests between transformers caches of ``config``'s model and paged caches of ``spec``.

    ``export`` / ``export_layer`` (cheap enough for a forward hook, as each layer finishes) write
    one batch row of a filled cache into a request's blocks and state slot; ``build_cache``
    makes a new cache (of the class the model itself builds) holding one request per batch row.
    ``cache_factory`` (no arguments, returns an empty cache) overrides that class; without it the
    class is found by tracing the model once, falling back to ``DynamicCache(config=...)``.
    Raises :class:`IncompatibleLayoutError` when the config and spec disagree on the layer count.
    """

    def __init__(self, spec: CacheSpec, config, cache_factory=None):
        self.spec = spec
        self.config = config
        self.num_layers = num_layers(config)
        if self.num_layers != spec.num_layers:
            raise IncompatibleLayoutError(f"config has {self.num_layers} layers, spec {spec.num_layers}")
        self._cache_factory = cache_factory

    # -- export ----------------------------------------------------------------------------------
    def export(self, cache, paged: PagedCache, ref: CacheRef, row: int = 0) -> None:
        """Write batch row ``row`` of ``cache`` (every layer) into ``ref``'s blocks and slot.

        Raises :class:`IncompatibleLayoutError` when the cache holds anything the spec does not
        carry (or lacks something it does), and :class:`ConfigError` for a bad row or reference.
        """
        inventory(cache, self.num_layers)
        for layer in range(self.spec.num_layers):
            self.export_layer(cache, layer, paged, ref, row, checked=True)

    def export_layer(self, cache, layer: int, paged: PagedCache, ref: CacheRef, row: int = 0,
                     checked: bool = False) -> None:
        """Write tokens [ref.token_start, ref.num_tokens) of ``layer`` and its states into ``paged``.

        Raises as :meth:`export`; writes nothing of the layer when it refuses.
        """
        if not checked:
            inventory(cache, self.num_layers)
        spec_layer = self.spec.layers[layer]
        held = slots(cache, layer)
        want = [c.name for c in spec_layer.components]
        if [s.name for s in held] != want:
            raise IncompatibleLayoutError(f"layer {layer}: the cache holds {[s.name for s in held]}, the spec carries "
                                          f"{want}; a tensor would be dropped or missing")
        n = ref.num_tokens
        jobs = []
        for index, (slot, comp) in enumerate(zip(held, spec_layer.components)):
            t = slot.read(cache, layer)
            if not 0 <= row < t.shape[0]:
                raise ConfigError(f"row {row} out of range for a batch of {t.shape[0]}")
            src = t[row] if slot.token_dim is None else token_rows(t, slot.token_dim, row)
            what = f"layer {layer} {comp.name}"
            shape = tuple(src.shape) if slot.token_dim is None else tuple(src.shape[1:])
            if shape != comp.shape or src.dtype != TORCH_DTYPES[comp.dtype]:
                raise IncompatibleLayoutError(f"{what}: the cache has {shape} {src.dtype}, the spec {comp.shape} "
                                              f"{comp.dtype}")
            if slot.token_dim is not None:
                window = window_of(cache.layers[layer])
                if window != (comp.window, comp.size):
                    raise IncompatibleLayoutError(f"{what}: the cache keeps a {window} window, the spec {comp.window} "
                                                  f"{comp.size}")
                expect = n - comp.live_start(n)
                if src.shape[0] != expect:
                    raise IncompatibleLayoutError(f"{what}: the cache holds {src.shape[0]} tokens, "
                                                  f"expected {expect} for a request of {n}")
            jobs.append((index, src))
        ids, ids_host = ref.block_ids_checked(paged)
        slot_index = ref.slot(paged) if spec_layer.states else -1
        for index, src in jobs:
            comp = spec_layer.components[index]
            dst = paged.tensor(layer, index)
            if comp.is_state:
                dst[slot_index].copy_(src)
                continue
            base = n - src.shape[0]  # the first token the layer holds (windows: > 0)
            start = max(ref.token_start, base)
            part = src[start - base:].reshape(n - start, -1).contiguous()
            copy_tokens(dst, ids, ids_host, start, n, paged.block_size, part, False)

    # -- rebuild ---------------------------------------------------------------------------------
    def build_cache(self, paged: PagedCache, refs: CacheRef | Sequence[CacheRef]):
        """A new cache holding ``refs`` (one request per batch row), ready to continue decoding.

        Rows must be the same length (transformers caches are not ragged); raises
        :class:`ConfigError` otherwise or for a bad reference.
        """
        refs = [refs] if isinstance(refs, CacheRef) else list(refs)
        if not refs or len({r.num_tokens for r in refs}) != 1:
            raise ConfigError(f"one or more requests of one length per cache, got {[r.num_tokens for r in refs]}")
        n = refs[0].num_tokens
        cache = self._new_cache()
        for layer, spec_layer in enumerate(self.spec.layers):
            for index, comp in enumerate(spec_layer.components):
                batch = torch.stack([self._read(paged, ref, layer, index, comp) for ref in refs])
                _restore(cache, layer, comp.name, batch, n)
        return cache

    def _read(self, paged: PagedCache, ref: CacheRef, layer: int, index: int, comp) -> torch.Tensor:
        src = paged.tensor(layer, index)
        if comp.is_state:
            return src[ref.slot(paged)].clone()
        n = ref.num_tokens
        start = comp.live_start(n)
        ids, ids_host = ref.block_ids_checked(paged)
        out = torch.empty(n - start, *comp.shape, dtype=src.dtype, device=src.device)
        copy_tokens(src, ids, ids_host, start, n, paged.block_size, out, True)
        return out

    def _new_cache(self):
        if self._cache_factory is None:
            self._cache_factory = self._default_factory()
        cache = self._cache_factory()
        replicate = getattr(cache, "layer_class_to_replicate", None)
        while len(cache.layers) < self.num_layers and replicate is not None:
            cache.layers.append(replicate())
        if len(cache.layers) != self.num_layers:
            raise IncompatibleLayoutError(f"{type(cache).__name__} has {len(cache.layers)} layers, the model "
                                          f"{self.num_layers}")
        return cache

    def _default_factory(self):
        """The cache class the model builds (traced once); transformers' ``DynamicCache`` when the
        model cannot be traced and the spec needs nothing a ``DynamicCache`` lacks."""
        try:
            cls = type(trace_cache(self.config, TORCH_DTYPES.get(self._model_dtype() or "")))
        except SpecError:
            if any(_slot_for(None, i, c.name).where == "cache" for i, layer in enumerate(self.spec.layers)
                   for c in layer.components):
                raise
            from transformers import DynamicCache as cls
        return lambda: _construct(cls, self.config)

    def _model_dtype(self) -> str | None:
        dtypes = [t.dtype for layer in self.spec.layers for t in layer.tokens]
        return dtypes[0] if dtypes else None


def _construct(cls, config):
    try:
        return cls(config=config)
    except TypeError:  # caches such as MiniMaxCache take no config
        return cls()


def _restore(cache, layer: int, name: str, batch: torch.Tensor, n: int) -> None:
    """Put one component back where transformers keeps it, with the bookkeeping around it."""
    obj = cache.layers[layer]
    slot = _slot_for(cache, layer, name)
    if slot.where == "cache":
        if hasattr(cache, "set_linear_cache"):
            cache.set_linear_cache(layer, batch)
        else:
            getattr(cache, slot.attr)[layer] = batch
        return
    if slot.token_dim is not None:
        value = from_token_rows(batch, slot.token_dim)
        if slot.attr == "indexer_keys":
            obj.lazy_initialization_indexer(value)
            obj.indexer_keys = value
            return
        if slot.attr in ("keys", "values") and not getattr(obj, "is_initialized", False):
            obj.lazy_initialization(value, value)  # sets device and dtype; keys and values replaced below
        setattr(obj, slot.attr, value)
        if getattr(obj, "is_sliding", False):
            obj.cumulative_length = n
        return
    kwarg = {"conv_states": "conv_states", "recurrent_states": "recurrent_states"}[slot.attr]
    obj.lazy_initialization(**{kwarg: batch, "state_idx": slot.key})
    getattr(obj, slot.attr)[slot.key].copy_(batch)
    obj.has_previous_state[slot.key] = True


def _slot_for(cache, layer: int, name: str) -> Slot:
    from kvlink.engine.hf.layers import CACHE_STATE_LISTS, STATE_DICTS, TOKEN_ATTRS

    for attr, (token_name, dim) in TOKEN_ATTRS.items():
        if name == token_name:
            return Slot(name, attr, token_dim=dim)
    for attr, cname in CACHE_STATE_LISTS.items():
        if name == cname:
            return Slot(name, attr, where="cache")
    for attr, prefix in STATE_DICTS.items():
        if name == prefix:
            return Slot(name, attr, 0)
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return Slot(name, attr, int(name[len(prefix):]))
    raise IncompatibleLayoutError(f"layer {layer} {name}: not a component a transformers cache holds")
