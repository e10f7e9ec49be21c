"""Copies a transformers cache to and from a kvlink :class:`~kvlink.serde.PagedCache`, every tensor.

Export compares what the cache object holds with what the spec carries, tensor by tensor, and
refuses (naming the layer and component) rather than drop anything. Rebuilding restores the
tensors and the bookkeeping transformers needs to continue without a re-prefill: sliding layers'
``cumulative_length``, linear layers' ``has_previous_state`` and conv kernel sizes. RWKV's state
list and xLSTM's ``xLSTMCache`` (no transformers Cache) are carried and rebuilt as the model makes them;
RecurrentGemma's states, kept on its modules, are read from and restored into the ``model=`` given.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvlink.engine.hf.layers import (MODULE_STATES, RWKV_STATES, XLSTM_STATES, cache_form, check_length,
                                     decoder_layers, from_token_rows, inventory, module_owner, num_cache_layers,
                                     slot_for, slots, token_rows)
from kvlink.engine.hf.spec import num_layers, text_config, traced_cache_class, window_of
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
    class is found by tracing the model once, falling back to ``DynamicCache(config=...)``. For
    RWKV (a list of five state tensors; continue with ``state=``) and xLSTM (an ``xLSTMCache``;
    continue with ``cache=``) ``build_cache`` makes the state itself, or ``cache_factory`` returns
    one already sized for the batch. A model keeping states on its modules (RecurrentGemma: its
    spec has ``conv1d`` / ``rg_lru`` states) needs ``model=`` in ``export`` and ``build_cache``:
    they are read from, and restored into, that model's decoder layers.
    Raises :class:`IncompatibleLayoutError` when the config and spec disagree on the layer count,
    :class:`SpecError` for a ``config`` that is not a transformers config, and
    :class:`ConfigError` for a ``spec`` that is not a :class:`CacheSpec`.
    """

    def __init__(self, spec: CacheSpec, config, cache_factory=None):
        if not isinstance(spec, CacheSpec):
            raise ConfigError(f"expected a CacheSpec, got {type(spec).__name__}")
        self.spec = spec
        self.config = config
        self.num_layers = num_layers(config)
        if self.num_layers != spec.num_layers:
            raise IncompatibleLayoutError(f"config has {self.num_layers} layers, spec {spec.num_layers}")
        self._cache_factory = cache_factory

    # -- export ----------------------------------------------------------------------------------
    def export(self, cache, paged: PagedCache, ref: CacheRef, row: int = 0, model=None) -> None:
        """Write batch row ``row`` of ``cache`` (every layer) into ``ref``'s blocks and slot;
        ``model``: the model that filled it, for states it keeps on its modules.

        Every layer is checked before any is written: when it refuses, ``paged`` is untouched.
        Raises :class:`IncompatibleLayoutError` when ``cache`` is not a transformers Cache, holds
        anything the spec does not carry (or lacks something it does), counts other tokens than
        ``ref`` (an xLSTM cache's ``seqlen_offset``), or ``paged`` was built for another layout;
        :class:`ConfigError` for a bad row, ``paged`` or reference.
        """
        target = self._check_target(paged, ref)
        modules = decoder_layers(model)
        inventory(cache, self.num_layers, modules)
        check_length(cache, ref.num_tokens)
        jobs = [self._layer_jobs(cache, layer, paged, ref, row, modules) for layer in range(self.spec.num_layers)]
        for layer, layer_jobs in enumerate(jobs):
            self._write(paged, ref, layer, layer_jobs, target)

    def export_layer(self, cache, layer: int, paged: PagedCache, ref: CacheRef, row: int = 0,
                     checked: bool = False, model=None) -> None:
        """Write tokens [ref.token_start, ref.num_tokens) of ``layer`` and its states into ``paged``.

        ``checked``: the caller already ran :func:`inventory` on ``cache``. Raises as
        :meth:`export`, and :class:`ConfigError` for a layer out of range; writes nothing of the
        layer when it refuses.
        """
        target = self._check_target(paged, ref)
        modules = decoder_layers(model)
        if not checked:
            inventory(cache, self.num_layers, modules)
            check_length(cache, ref.num_tokens)
        self._write(paged, ref, layer, self._layer_jobs(cache, layer, paged, ref, row, modules), target)

    def _check_target(self, paged: PagedCache, ref: CacheRef) -> tuple:
        """``paged`` and ``ref`` are of the right types, ``paged`` of the adapter's layout
        (else :class:`IncompatibleLayoutError`) and ``ref`` fits it (else :class:`ConfigError`):
        ``(block ids, host block ids, state slot or -1)``."""
        if not isinstance(paged, PagedCache):
            raise ConfigError(f"expected a PagedCache, got {type(paged).__name__}")
        if not isinstance(ref, CacheRef):
            raise ConfigError(f"expected a CacheRef, got {type(ref).__name__}")
        if paged.spec is not self.spec and [layer.canon() for layer in paged.spec.layers] != [
                layer.canon() for layer in self.spec.layers]:
            raise IncompatibleLayoutError(f"the paged cache was built for another layout ({paged.spec.name}) than "
                                          f"the adapter's ({self.spec.name})")
        ids, ids_host = ref.block_ids_checked(paged)
        return ids, ids_host, ref.slot(paged) if any(layer.states for layer in self.spec.layers) else -1

    def _layer_jobs(self, cache, layer: int, paged: PagedCache, ref: CacheRef, row: int, modules: list) -> list:
        """Every check of one layer's export, writing nothing: ``[(component index, source)]``.

        Raises :class:`ConfigError` for a layer or row out of range, and
        :class:`IncompatibleLayoutError` for anything the spec, ``paged`` and the cache disagree on.
        """
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.spec.num_layers:
            raise ConfigError(f"layer {layer!r} out of range [0, {self.spec.num_layers})")
        if not isinstance(row, int) or isinstance(row, bool):
            raise ConfigError(f"row must be an int, got {row!r}")
        spec_layer = self.spec.layers[layer]
        held = slots(cache, layer, modules)
        want = [c.name for c in spec_layer.components]
        if [s.name for s in held] != want:
            hint = " (states kept on the model's modules need model=)" if not modules and set(want) & set(
                MODULE_STATES) else ""
            raise IncompatibleLayoutError(f"layer {layer}: the cache holds {[s.name for s in held]}, the spec carries "
                                          f"{want}; a tensor would be dropped or missing{hint}")
        n = ref.num_tokens
        jobs = []
        for index, (slot, comp) in enumerate(zip(held, spec_layer.components)):
            t = slot.read(cache, layer, modules)
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
        return jobs

    def _write(self, paged: PagedCache, ref: CacheRef, layer: int, jobs: list, target: tuple) -> None:
        """Copy checked ``jobs`` of ``layer`` (see :meth:`_layer_jobs`) into ``paged``."""
        spec_layer = self.spec.layers[layer]
        n = ref.num_tokens
        ids, ids_host, slot_index = target
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
    def build_cache(self, paged: PagedCache, refs: CacheRef | Sequence[CacheRef], model=None):
        """A new cache holding ``refs`` (one request per batch row), ready to continue decoding.
        ``model``: the model that will continue, for states it keeps on its modules (restored into
        its decoder layers: one model serves one such batch at a time).

        Rows must be the same length (transformers caches are not ragged); raises
        :class:`ConfigError` otherwise, for a ``paged`` that is not a PagedCache or for a bad
        reference. Raises :class:`IncompatibleLayoutError`, before writing anything, when a layer
        object of the new cache cannot hold what the spec carries as the spec carries it (e.g. a
        ``cache_factory`` whose full-attention layer would get a sliding window's tokens, or a
        plain attention layer a linear-attention state, or an RWKV / xLSTM state of other shapes
        than the spec's or the config's), naming the layer and component.
        """
        try:
            refs = [refs] if isinstance(refs, CacheRef) else list(refs)
        except TypeError:
            raise ConfigError(f"expected a CacheRef or a sequence of them, got {type(refs).__name__}") from None
        targets = [self._check_target(paged, ref) for ref in refs]
        if not refs or len({r.num_tokens for r in refs}) != 1:
            raise ConfigError(f"one or more requests of one length per cache, got {[r.num_tokens for r in refs]}")
        n = refs[0].num_tokens
        form = spec_form(self.spec)
        modules = decoder_layers(model)
        if form == "layers":
            cache = self._new_cache()
            _check_layer_objects(cache, self.spec, modules)
        else:
            cache = self._new_state(form, len(refs), paged)
        for layer, spec_layer in enumerate(self.spec.layers):
            for index, comp in enumerate(spec_layer.components):
                _restore(cache, layer, comp.name, self._gather(paged, targets, n, layer, index, comp), n, modules)
        if form == "xlstm":
            cache.seqlen_offset.fill_(n)
            cache.rnn_state_initial = False  # as the model leaves it after a prefill
        return cache

    def _new_state(self, form: str, batch: int, paged: PagedCache):
        """An RWKV state list or an ``xLSTMCache`` for ``batch`` rows, checked against the spec."""
        comps = self.spec.layers[0].components
        device = paged.tensor(0, 0).device
        if self._cache_factory is not None:
            cache = self._cache_factory()
        elif form == "rwkv":  # as RwkvModel.forward makes it: [batch, hidden, layers] per state
            cache = [torch.zeros(batch, *c.shape, self.num_layers, dtype=TORCH_DTYPES[c.dtype], device=device)
                     for c in comps]
            hidden = getattr(text_config(self.config), "hidden_size", None)
            if any(c.shape != (hidden,) for c in comps):
                raise IncompatibleLayoutError(f"the spec's RWKV states are {[c.shape for c in comps]}, the config's "
                                              f"hidden_size {hidden}")
        else:  # as xLSTMModel.forward makes it
            from transformers.models.xlstm.modeling_xlstm import xLSTMCache

            try:
                cache = xLSTMCache(self.config, batch, dtype=TORCH_DTYPES[comps[0].dtype], device=device)
            except (AttributeError, TypeError, ValueError) as exc:
                raise IncompatibleLayoutError(f"cannot build an xLSTMCache from the config: {exc}") from exc
        _check_state_target(cache, form, self.spec, batch)
        return cache

    def _gather(self, paged: PagedCache, targets: list, n: int, layer: int, index: int, comp) -> torch.Tensor:
        """Component ``index`` of ``layer`` for every request (``targets``: see :meth:`_check_target`),
        one batch row each, copied once out of ``paged``: ``[batch, *state shape]`` or
        ``[batch, live tokens, *token shape]``."""
        src = paged.tensor(layer, index)
        start = 0 if comp.is_state else comp.live_start(n)
        shape = comp.shape if comp.is_state else (n - start, *comp.shape)
        out = torch.empty(len(targets), *shape, dtype=src.dtype, device=src.device)
        for i, (ids, ids_host, slot) in enumerate(targets):
            # out[i], not iterating ``out``: unbind's views refuse in-place writes outside no_grad
            if comp.is_state:
                out[i].copy_(src[slot])
            else:
                copy_tokens(src, ids, ids_host, start, n, paged.block_size, out[i], True)
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
            cls = traced_cache_class(self.config, TORCH_DTYPES.get(self._model_dtype() or ""))
        except SpecError:
            if any(slot_for(None, i, c.name).where == "cache" for i, layer in enumerate(self.spec.layers)
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


def _check_layer_objects(cache, spec: CacheSpec, modules: list = ()) -> None:
    """Refuse a cache whose layer objects cannot take what ``spec`` carries, as it carries it.

    Raises :class:`IncompatibleLayoutError` naming the layer and component: a token tensor for a
    layer object without it, or with another window (a sliding window's last W-1 tokens in a full
    layer would continue silently wrong); a state for a layer object without that state index; a
    cache-level state for a cache that keeps none; a module state for a model (``modules``) without it."""
    for layer, spec_layer in enumerate(spec.layers):
        obj = cache.layers[layer]
        for comp in spec_layer.components:
            slot = slot_for(cache, layer, comp.name)
            what = f"layer {layer} {comp.name}: the new cache's {type(obj).__name__}"
            if slot.where == "module":
                if layer >= len(modules) or module_owner(modules[layer], comp.name) is None:
                    raise IncompatibleLayoutError(f"layer {layer} {comp.name}: a state the model keeps on its modules; "
                                                  "pass model= (the model that continues, with that state)")
            elif slot.where == "cache":
                items = getattr(cache, slot.attr, None)
                if not callable(getattr(cache, "set_linear_cache", None)) and not (
                        isinstance(items, list) and layer < len(items)):
                    raise IncompatibleLayoutError(f"layer {layer} {comp.name}: {type(cache).__name__} keeps no "
                                                  f"{slot.attr} (the model's own cache class does)")
            elif slot.token_dim is not None:
                init = "lazy_initialization_indexer" if slot.attr == "indexer_keys" else "lazy_initialization"
                if not hasattr(obj, slot.attr) or not callable(getattr(obj, init, None)):
                    raise IncompatibleLayoutError(f"{what} keeps no {slot.attr}")
                window = window_of(obj)
                if window != (comp.window, comp.size):
                    raise IncompatibleLayoutError(f"{what} keeps a {window[0]} {window[1]} window, the spec carries a "
                                                  f"{comp.window} {comp.size} one")
            else:
                held = getattr(obj, slot.attr, None)
                if not (isinstance(held, dict) and slot.key in held
                        and callable(getattr(obj, "lazy_initialization", None))
                        and isinstance(getattr(obj, "has_previous_state", None), dict)):
                    raise IncompatibleLayoutError(f"{what} has no {slot.attr}[{slot.key}] state")


def spec_form(spec: CacheSpec) -> str:
    """``"rwkv"`` or ``"xlstm"`` when every layer carries exactly that model's states (the
    :func:`~kvlink.engine.hf.layers.cache_form` the spec was read from), else ``"layers"``."""
    names = {tuple(c.name for c in layer.components) for layer in spec.layers}
    for form, states in (("rwkv", RWKV_STATES), ("xlstm", XLSTM_STATES)):
        if names == {states} and all(not layer.tokens for layer in spec.layers):
            return form
    return "layers"


def _check_state_target(cache, form: str, spec: CacheSpec, batch: int) -> None:
    """Refuse a new RWKV / xLSTM state that cannot take what ``spec`` carries: another form, layer
    count, or a state of another shape or dtype (:class:`IncompatibleLayoutError`, naming it)."""
    if cache_form(cache) != form:
        raise IncompatibleLayoutError(f"the new cache is a {type(cache).__name__}, not the {form} state the spec "
                                      "carries")
    inventory(cache, spec.num_layers)
    if num_cache_layers(cache) != spec.num_layers:
        raise IncompatibleLayoutError(f"the new {type(cache).__name__} holds {num_cache_layers(cache)} layers, the "
                                      f"spec {spec.num_layers}")
    for layer, spec_layer in enumerate(spec.layers):
        for slot, comp in zip(slots(cache, layer), spec_layer.components):
            t = slot.read(cache, layer)
            want = (batch, *comp.shape)
            if tuple(t.shape) != want or t.dtype != TORCH_DTYPES[comp.dtype]:
                raise IncompatibleLayoutError(f"layer {layer} {comp.name}: the new {type(cache).__name__} holds "
                                              f"{tuple(t.shape)} {t.dtype}, the spec carries {want} {comp.dtype}")


def _restore(cache, layer: int, name: str, batch: torch.Tensor, n: int, modules: list = ()) -> None:
    """Put one component back where transformers keeps it, with the bookkeeping around it."""
    slot = slot_for(cache, layer, name)
    if slot.where == "module":
        setattr(*module_owner(modules[layer], name), batch)
        return
    if slot.where in ("rwkv", "xlstm"):
        slot.read(cache, layer).copy_(batch)
        return
    obj = cache.layers[layer]
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
    obj.lazy_initialization(**{slot.attr: batch, "state_idx": slot.key})  # conv_states= or recurrent_states=
    getattr(obj, slot.attr)[slot.key].copy_(batch)
    obj.has_previous_state[slot.key] = True
