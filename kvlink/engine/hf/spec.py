"""The kvlink spec of a transformers model's cache: from its config alone, or from a filled cache.

:func:`spec_from_config` builds the model on PyTorch's ``meta`` device (no memory, no weights, no
compute) and runs a three-token prefill there: the cache transformers fills is the one it fills for
real, so every layer's tensors, shapes and dtypes come from the model's own code rather than from
per-model guesses about config fields. :func:`spec_from_cache` reads the same off a real cache.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.fx.experimental._config  # noqa: F401  (the meta nonzero switch)

from kvlink.errors import IncompatibleLayoutError, SpecError
from kvlink.engine.hf.layers import (MODULE_STATES, STATE_DICTS, Slot, cache_form, check_is_cache, decoder_layers, inventory,
                                     module_owner, num_cache_layers, slots)
from kvlink.serde.layout import DTYPE_NAMES
from kvlink.spec import CacheSpec, Layer, StateTensor, TokenTensor

TRACE_TOKENS = 3


def text_config(config):
    """The decoder's text config. Raises :class:`SpecError` for anything that is not a transformers
    ``PretrainedConfig`` (e.g. a plain dict)."""
    get = getattr(config, "get_text_config", None)
    if not callable(get):
        raise SpecError(f"not a transformers PretrainedConfig: a {type(config).__name__}")
    return get(decoder=True)


def default_name(config) -> str:
    """``hf:<text model_type>``: the spec name both :func:`spec_from_config` and
    :func:`spec_from_cache` give a model's layout, so that both routes fingerprint alike."""
    return f"hf:{getattr(text_config(config), 'model_type', type(config).__name__)}"


def num_layers(config) -> int:
    text = text_config(config)
    for field in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(text, field, None), int):
            return getattr(text, field)
    raise SpecError(f"{type(config).__name__} has no num_hidden_layers")


def default_dtype(config) -> torch.dtype:
    """The model's dtype from its config (``dtype``), float32 when it names none."""
    dtype = getattr(config, "dtype", None) or getattr(text_config(config), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def trace_cache(config, dtype: torch.dtype | None = None):
    """A cache as the model fills it on a prefill of :data:`TRACE_TOKENS` tokens, on the meta device:
    a transformers Cache, RWKV's ``state`` list or an ``xLSTMCache`` (see :func:`~kvlink.engine.hf.layers.cache_form`).

    Raises :class:`SpecError` when the model cannot be built or run there (the message names
    the model type and the failure), or returns none of these."""
    return _trace(config, dtype)[0]


# The cache class each traced config's model builds, by the config's JSON: what an adapter needs
# from a trace, so a process that built its spec from the config does not trace again when it
# first builds a cache (on the first request's path: ~0.2-0.5 s for a small model on 2 cores).
_CACHE_CLASSES: dict[str, type] = {}
_MAX_CACHE_CLASSES = 64
_CACHE_CLASSES_LOCK = threading.Lock()  # adapters of several engines may trace at once


def _config_key(config) -> str | None:
    try:
        return config.to_json_string(use_diff=False)
    except Exception:  # not a PretrainedConfig, or one that cannot be written: no memo
        return None


def traced_cache_class(config, dtype: torch.dtype | None = None) -> type:
    """The class of :func:`trace_cache`'s cache, traced at most once per config (as it is now)
    and process. Raises as :func:`trace_cache`."""
    key = _config_key(config)
    cls = _CACHE_CLASSES.get(key) if key is not None else None
    return cls if cls is not None else type(trace_cache(config, dtype))


def _trace(config, dtype: torch.dtype | None) -> tuple:
    """``(cache, decoder layers holding module states or [])``: see :func:`trace_cache`. A model that
    keeps states on its modules and returns no cache (RecurrentGemma) is run again with a
    ``DynamicCache`` of its own config for the rest of its state."""
    from transformers import AutoModelForCausalLM, DynamicCache

    dtype = dtype or default_dtype(config)
    model_type = getattr(text_config(config), "model_type", type(config).__name__)
    try:
        # MoE routers call nonzero(), which has no shape on meta tensors; any shape will do, as
        # routing does not change what the cache holds
        with torch.device("meta"), torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
            # batched_mm: the default grouped-mm MoE kernel has no meta implementation in float32
            # a copy: from_config records its choices on the config, which the caller's model shares
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                     experts_implementation="batched_mm")
            ids = torch.zeros(1, TRACE_TOKENS, dtype=torch.long)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                modules = _module_holders(model) if _cache_of(out) is None else []
                if modules:
                    cache = DynamicCache(config=model.config)
                    model(input_ids=ids, cache=cache, use_cache=True)
                    return cache, modules
    except Exception as exc:  # transformers raises anything; the caller gets one typed error
        raise SpecError(f"{model_type}: cannot trace the cache on the meta device "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); build the spec with spec_from_cache "
                        "from a real prefill") from exc
    cache = _cache_of(out)
    if cache_form(cache) is None:
        raise SpecError(f"{model_type}: the model returned no transformers Cache (got {type(cache).__name__}); "
                        "its state is not reachable")
    key = _config_key(config)
    if key is not None:
        with _CACHE_CLASSES_LOCK:
            if len(_CACHE_CLASSES) >= _MAX_CACHE_CLASSES:
                _CACHE_CLASSES.pop(next(iter(_CACHE_CLASSES)))  # the oldest
            _CACHE_CLASSES[key] = type(cache)
    return cache, []


def _cache_of(out):
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "state", None)  # RWKV: a list of state tensors


def _module_holders(model) -> list:
    """``model``'s decoder layers when any holds a :data:`MODULE_STATES` tensor, else []."""
    try:
        layers = decoder_layers(model)
    except IncompatibleLayoutError:
        return []
    found = [module_owner(layer, name) for layer in layers for name in MODULE_STATES]
    return layers if any(f and isinstance(getattr(*f), torch.Tensor) for f in found) else []


def spec_from_config(config, dtype: torch.dtype | None = None, name: str | None = None) -> CacheSpec:
    """The cache layout of a transformers model from its config alone (a decode side sizes its
    cache before any prefill). ``dtype``: the model's dtype (default: the config's, else float32).

    Raises :class:`SpecError` when the model cannot be traced or ``config`` is not a transformers
    config, and :class:`IncompatibleLayoutError` when its cache holds a tensor kvlink cannot carry
    (named). A model keeping states on its modules (RecurrentGemma) gets them in its spec: its
    adapter then needs ``model=`` to export and rebuild.
    """
    cache, modules = _trace(config, dtype)
    return _spec(cache, name, None, config, modules)


def spec_from_cache(cache, name: str | None = None, layers: int | None = None, config=None,
                    model=None) -> CacheSpec:
    """The layout of a filled transformers cache (any class transformers builds), read off its
    tensors: one component per tensor, per-token shapes without batch and token dims.

    ``config`` (the model's) names the spec ``hf:<model_type>`` when ``name`` is None, as
    :func:`spec_from_config` does, so both routes give one fingerprint; it also gives ``layers``
    (default: the config's layer count, else the cache's).

    ``model``: the model that filled ``cache``, for the states it keeps on its modules
    (RecurrentGemma). Without it, a state-keeping layer object (``conv_states`` /
    ``recurrent_states``) left empty by the prefill is refused: its state is kept elsewhere.

    Raises :class:`IncompatibleLayoutError` for something that is not a transformers Cache, a
    tensor kvlink cannot carry (named) or a state-keeping layer left empty, and :class:`SpecError` for an empty cache, no ``name``
    and no ``config``, a ``config`` that is not a transformers config, or a bad ``layers``.
    """
    return _spec(cache, name, layers, config, decoder_layers(model))


def _spec(cache, name: str | None, layers: int | None, config, modules: list) -> CacheSpec:
    check_is_cache(cache)
    if name is None:
        if config is None:
            raise SpecError("spec_from_cache needs a name or the model's config (which names it hf:<model_type>)")
        name = default_name(config)
    if layers is None:
        layers = num_layers(config) if config is not None else num_cache_layers(cache)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise SpecError(f"layers must be a non-negative int, got {layers!r}")
    inventory(cache, layers, modules)
    if cache_form(cache) == "layers":
        for i, obj in enumerate(cache.layers):
            if any(isinstance(getattr(obj, a, None), dict) for a in STATE_DICTS) and not slots(cache, i, modules):
                raise IncompatibleLayoutError(f"layer {i} ({type(obj).__name__}) holds no state after the prefill: "
                                              "the model keeps it elsewhere (on its modules: pass model=)")
    return CacheSpec(name, tuple(layer_spec(cache, i, modules) for i in range(layers)),
                     notes=f"from a transformers {type(cache).__name__}")


def layer_spec(cache, i: int, modules: list = ()) -> Layer:
    form = cache_form(cache)
    obj = cache.layers[i] if form == "layers" and i < len(cache.layers) else None
    tokens, states = [], []
    for slot in slots(cache, i, modules):
        t = slot.read(cache, i, modules)
        dtype = _dtype_name(t, i, slot)
        if slot.token_dim is None:
            states.append(StateTensor(slot.name, tuple(t.shape[1:]), dtype))
            continue
        shape = tuple(d for k, d in enumerate(t.shape) if k not in (0, slot.token_dim))
        window, size = window_of(obj)
        tokens.append(TokenTensor(slot.name, shape, dtype, window, size))
    variant = type(obj).__name__ if obj is not None else {"rwkv": "rwkv", "xlstm": "mlstm"}.get(form, "")
    return Layer(tuple(tokens), tuple(states), variant)


def window_of(obj) -> tuple[str, int]:
    """A sliding layer keeps its last ``sliding_window - 1`` tokens (chunked-attention layers too:
    transformers caches them as sliding windows of the chunk size)."""
    if getattr(obj, "is_sliding", False):
        return "sliding", int(obj.sliding_window) - 1
    return "full", 0


def _dtype_name(t: torch.Tensor, layer: int, slot: Slot) -> str:
    try:
        return DTYPE_NAMES[t.dtype]
    except KeyError:
        raise IncompatibleLayoutError(f"layer {layer} {slot.name}: dtype {t.dtype} is not carried") from None
