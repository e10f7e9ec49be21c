"""Where the tensors of a transformers cache live, and how to read and restore them.

A cache layer object holds per-token tensors (``keys``/``values`` ``[batch, heads, tokens, dim]``,
``indexer_keys`` ``[batch, tokens, dim]``) and fixed-shape states (``conv_states[i]``,
``recurrent_states[i]`` ``[batch, ...]``); a few caches keep states beside their layers
(``MiniMaxCache.linear_cache[layer]``). Two models keep no ``Cache`` at all: RWKV returns its
state as a list of five ``[batch, hidden, layers]`` tensors (layer dim last) and xLSTM an
``xLSTMCache`` whose ``rnn_state[layer]`` is ``(C, n, m)``; RecurrentGemma keeps part of its state
on its modules (:data:`MODULE_STATES`, read when the model is given). Each tensor becomes one named component
of a kvlink :class:`~kvlink.spec.Layer`. :func:`inventory` lists every tensor an object holds, so
that a tensor kvlink does not know is refused by name instead of dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlink.errors import IncompatibleLayoutError

# Per-token attributes of a layer object: attribute -> (component name, dim of the tokens).
TOKEN_ATTRS = {"keys": ("k", 2), "values": ("v", 2), "indexer_keys": ("indexer_k", 1),
               "idx_keys": ("idx_k", 2)}  # idx_keys: MiniMax-M3's sparse-attention index keys [batch, 1, tokens, dim]
# Per-state dicts of a layer object (index -> tensor or None): attribute -> component name prefix.
STATE_DICTS = {"conv_states": "conv", "recurrent_states": "recurrent"}
# Per-layer state lists held by the cache object itself: attribute -> component name.
CACHE_STATE_LISTS = {"linear_cache": "linear"}
# Tensors that are not request data: derived from the config, checked rather than carried.
DERIVED_ATTRS = {"_sliding_window_tensor"}
# RWKV's ``state`` list, in modeling_rwkv's order: token-shift inputs of the feed-forward and the
# attention (model dtype), then the WKV numerator, denominator and running max (float32).
RWKV_STATES = ("ffn_shift", "att_shift", "wkv_num", "wkv_den", "wkv_max")
# xLSTM's ``rnn_state[layer]``: the mLSTM matrix memory, normaliser and max-stabiliser.
XLSTM_STATES = ("C", "n", "m")
# xLSTMCache attributes that hold tensors: ``seqlen_offset`` is the token count (rebuilt, not carried).
XLSTM_ATTRS = {"rnn_state", "seqlen_offset"}
# States a model keeps on its decoder layers' modules, not in the cache (RecurrentGemma's recurrent
# blocks): component name -> attribute path from the decoder layer. Read and restored only when
# the caller passes the model (its decoder layers: :func:`decoder_layers`).
MODULE_STATES = {"conv1d": ("temporal_block", "conv1d_state"),
                 "rg_lru": ("temporal_block", "rg_lru", "recurrent_states")}


def decoder_layers(model) -> list:
    """The decoder layer modules of ``model`` (``model.model.layers`` or ``model.layers``); [] for
    None. Raises :class:`IncompatibleLayoutError` for a model with neither."""
    if model is None:
        return []
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise IncompatibleLayoutError(f"{type(model).__name__}: no decoder layers (model.model.layers) holding states")


def module_owner(module, name: str):
    """``(object, attribute)`` holding module state ``name`` under decoder layer ``module``, or None."""
    path = MODULE_STATES[name]
    for attr in path[:-1]:
        module = getattr(module, attr, None)
        if module is None:
            return None
    return (module, path[-1]) if hasattr(module, path[-1]) else None


def cache_form(cache) -> str | None:
    """``"layers"`` (a transformers Cache), ``"rwkv"`` (a list of tensors, as RWKV returns its
    state), ``"xlstm"`` (an object with an ``rnn_state`` dict), or None."""
    if isinstance(getattr(cache, "layers", None), (list, tuple)):
        return "layers"
    if isinstance(cache, (list, tuple)) and cache and all(isinstance(t, torch.Tensor) for t in cache):
        return "rwkv"
    if isinstance(getattr(cache, "rnn_state", None), dict):
        return "xlstm"
    return None


def num_cache_layers(cache) -> int:
    """How many layers ``cache`` (any :func:`cache_form`) holds."""
    form = cache_form(cache)
    if form == "rwkv":
        return cache[0].shape[-1] if cache[0].dim() == 3 else 0
    if form == "xlstm":
        return len(cache.rnn_state)
    return len(cache.layers)


@dataclass(frozen=True)
class Slot:
    """One carried tensor: ``where`` is ``"layer"`` (an attribute of the layer object, with
    ``key`` the dict index of a state), ``"cache"`` (a per-layer list on the cache object),
    ``"rwkv"`` (``cache[key][..., layer]``), ``"xlstm"`` (``cache.rnn_state[layer][key]``) or
    ``"module"`` (:data:`MODULE_STATES` ``[name]`` on decoder layer ``modules[layer]``)."""

    name: str
    attr: str
    key: int | None = None
    token_dim: int | None = None  # None: a state
    where: str = "layer"

    def read(self, cache, layer: int, modules: list = ()) -> torch.Tensor | None:
        if self.where == "module":
            found = module_owner(modules[layer], self.name) if layer < len(modules) else None
            value = getattr(*found, None) if found else None
            return value if isinstance(value, torch.Tensor) else None
        if self.where == "rwkv":  # a view: writing it writes the state
            return cache[self.key][..., layer]
        if self.where == "xlstm":
            return cache.rnn_state[layer][self.key]
        if self.where == "cache":
            items = getattr(cache, self.attr, [])
            value = items[layer] if layer < len(items) else None
            return value if isinstance(value, torch.Tensor) else None
        value = getattr(cache.layers[layer], self.attr, None)
        if self.key is not None:
            value = value.get(self.key) if isinstance(value, dict) else None
        return value if isinstance(value, torch.Tensor) else None


def _state_name(prefix: str, key: int, count: int) -> str:
    return prefix if count == 1 else f"{prefix}{key}"


def slots(cache, layer: int, modules: list = ()) -> list[Slot]:
    """The tensors layer ``layer`` of ``cache`` holds now (token tensors first, then states; then
    the states decoder layer ``modules[layer]`` holds, when the model's layers are given)."""
    form = cache_form(cache)
    if form == "rwkv":
        return [Slot(name, "state", i, where="rwkv") for i, name in enumerate(RWKV_STATES)
                if i < len(cache) and cache[i].dim() == 3 and layer < cache[i].shape[-1]]
    if form == "xlstm":
        entry = cache.rnn_state.get(layer)
        if not (isinstance(entry, (list, tuple)) and len(entry) == len(XLSTM_STATES)):
            return []
        return [Slot(name, "rnn_state", i, where="xlstm") for i, name in enumerate(XLSTM_STATES)
                if isinstance(entry[i], torch.Tensor) and entry[i].dim() >= 2]
    obj = cache.layers[layer] if layer < len(cache.layers) else None
    tokens, states = [], []
    if obj is not None:
        for attr, (name, dim) in TOKEN_ATTRS.items():
            t = getattr(obj, attr, None)
            if isinstance(t, torch.Tensor) and t.dim() > dim:
                tokens.append(Slot(name, attr, token_dim=dim))
        for attr, prefix in STATE_DICTS.items():
            held = getattr(obj, attr, None)
            if isinstance(held, dict):
                for key in sorted(k for k, v in held.items() if isinstance(v, torch.Tensor)):
                    states.append(Slot(_state_name(prefix, key, len(held)), attr, key))
    for attr, name in CACHE_STATE_LISTS.items():
        items = getattr(cache, attr, None)
        if isinstance(items, list) and layer < len(items) and isinstance(items[layer], torch.Tensor):
            states.append(Slot(name, attr, where="cache"))
    if layer < len(modules):
        for name in MODULE_STATES:
            found = module_owner(modules[layer], name)
            if found and isinstance(getattr(*found), torch.Tensor):
                states.append(Slot(name, ".".join(MODULE_STATES[name]), where="module"))
    return tokens + states


def slot_for(cache, layer: int, name: str) -> Slot:
    """Where component ``name`` of layer ``layer`` lives in ``cache``: the inverse of :func:`slots`'
    naming. Raises :class:`IncompatibleLayoutError` for a name no cache form holds."""
    for attr, (token_name, dim) in TOKEN_ATTRS.items():
        if name == token_name:
            return Slot(name, attr, token_dim=dim)
    for attr, cname in CACHE_STATE_LISTS.items():
        if name == cname:
            return Slot(name, attr, where="cache")
    if name in MODULE_STATES:
        return Slot(name, ".".join(MODULE_STATES[name]), where="module")
    if name in RWKV_STATES and cache_form(cache) == "rwkv":
        return Slot(name, "state", RWKV_STATES.index(name), where="rwkv")
    if name in XLSTM_STATES and cache_form(cache) == "xlstm":
        return Slot(name, "rnn_state", XLSTM_STATES.index(name), where="xlstm")
    for attr, prefix in STATE_DICTS.items():
        if name == prefix:
            return Slot(name, attr, 0)
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return Slot(name, attr, int(name[len(prefix):]))
    raise IncompatibleLayoutError(f"layer {layer} {name}: not a component a transformers cache holds")


def check_is_cache(cache) -> str:
    """The :func:`cache_form` of ``cache``. Raises :class:`IncompatibleLayoutError` unless it is a
    transformers ``Cache`` (an object with a ``layers`` list), an RWKV state list or an xLSTM
    cache, e.g. for ``None`` or a legacy tuple of tuples."""
    form = cache_form(cache)
    if form is None:
        raise IncompatibleLayoutError(f"not a transformers Cache (a {type(cache).__name__} with no layers list)")
    return form


def inventory(cache, num_layers: int, modules: list = ()) -> None:
    """Refuse a cache holding a tensor kvlink would not carry.

    Raises :class:`IncompatibleLayoutError` naming the object and attribute: ``cache`` is not a
    transformers Cache; a tensor (or a list, tuple or dict holding tensors) that is neither a known
    per-token tensor, a known state, nor a config-derived constant; a known attribute holding
    tensors in a form :func:`slots` does not read (keys with too few dims, a state that is a tuple
    of tensors, a ``linear_cache`` entry that is a list); an RWKV state that is not five
    ``[batch, hidden, layers]`` tensors; an xLSTM cache whose ``rnn_state`` is not ``(C, n, m)``
    per layer or that holds another tensor; or cache layers (or ``modules``, the model's decoder
    layers) beyond ``num_layers``.
    """
    form = check_is_cache(cache)
    if form == "rwkv":
        _check_rwkv(cache)
    elif form == "xlstm":
        _check_xlstm(cache)
    count = num_cache_layers(cache)
    if count > num_layers:
        raise IncompatibleLayoutError(f"{type(cache).__name__} holds {count} layers, the model {num_layers}")
    if len(modules) > num_layers:
        raise IncompatibleLayoutError(f"the model given has {len(modules)} decoder layers, the spec {num_layers}")
    if form != "layers":
        return
    known_cache = set(CACHE_STATE_LISTS) | {"layers"}
    _refuse_unknown(cache, known_cache, type(cache).__name__)
    known_layer = set(TOKEN_ATTRS) | set(STATE_DICTS) | DERIVED_ATTRS
    for i, obj in enumerate(cache.layers):
        _refuse_unknown(obj, known_layer, f"layer {i} ({type(obj).__name__})")
        for attr, prefix in STATE_DICTS.items():
            held = getattr(obj, attr, None)
            if isinstance(held, dict) and any(not isinstance(k, int) for k in held):
                raise IncompatibleLayoutError(f"layer {i} ({type(obj).__name__}).{attr}: non-integer state keys")
    for attr in CACHE_STATE_LISTS:
        items = getattr(cache, attr, None)
        if isinstance(items, list) and len(items) > num_layers:
            raise IncompatibleLayoutError(f"{type(cache).__name__}.{attr} has {len(items)} entries for {num_layers} layers")
    for i in range(len(cache.layers)):
        _refuse_unread(cache, i, modules)


def _check_rwkv(state) -> None:
    if len(state) != len(RWKV_STATES):
        raise IncompatibleLayoutError(f"an RWKV state is a list of {len(RWKV_STATES)} tensors, got {len(state)}; "
                                      "kvlink cannot carry it")
    for i, t in enumerate(state):
        if t.dim() != 3 or (t.shape[0], t.shape[2]) != (state[0].shape[0], state[0].shape[-1]):
            raise IncompatibleLayoutError(f"RWKV state[{i}] ({RWKV_STATES[i]}): shape {tuple(t.shape)}, not [batch, "
                                          "hidden, layers] like state[0]; kvlink cannot carry it")


def _check_xlstm(cache) -> None:
    what = type(cache).__name__
    _refuse_unknown(cache, XLSTM_ATTRS, what)
    offset = getattr(cache, "seqlen_offset", None)
    if not (isinstance(offset, torch.Tensor) and offset.numel() == 1):
        raise IncompatibleLayoutError(f"{what}.seqlen_offset: not a one-element tensor (the token count)")
    states = cache.rnn_state
    if any(type(k) is not int for k in states) or set(states) != set(range(len(states))):
        raise IncompatibleLayoutError(f"{what}.rnn_state: keys {list(states)[:8]}, not layers 0..{len(states) - 1}")
    batch = None
    for layer, entry in states.items():
        ok = isinstance(entry, (list, tuple)) and len(entry) == len(XLSTM_STATES) and all(
            isinstance(t, torch.Tensor) and t.dim() >= 2 for t in entry)
        if ok and batch is None:
            batch = entry[0].shape[0]
        if not ok or any(t.shape[0] != batch for t in entry):
            raise IncompatibleLayoutError(f"{what}.rnn_state[{layer}]: a {type(entry).__name__}, not (C, n, m) "
                                          "tensors [batch, ...] of one batch; kvlink cannot carry it")


def check_length(cache, num_tokens: int) -> None:
    """An xLSTM cache counts its tokens (``seqlen_offset``): refuse one that disagrees with the
    request's ``num_tokens`` (:class:`IncompatibleLayoutError`). Other forms keep no count."""
    if cache_form(cache) == "xlstm" and int(cache.seqlen_offset.reshape(-1)[0]) != num_tokens:
        raise IncompatibleLayoutError(f"{type(cache).__name__} has seen {int(cache.seqlen_offset.reshape(-1)[0])} "
                                      f"tokens, the request {num_tokens}")


def _refuse_unread(cache, layer: int, modules: list = ()) -> None:
    """A known attribute holding tensors that :func:`slots` does not read would be dropped: refuse.

    Checked per entry (a state dict's index, a ``linear_cache`` layer), so that one readable
    entry does not hide an unreadable one beside it."""
    read = {(s.where, s.attr, s.key) for s in slots(cache, layer, modules)}
    obj = cache.layers[layer]
    what = f"layer {layer} ({type(obj).__name__})"
    for attr, (_, dim) in TOKEN_ATTRS.items():
        value = getattr(obj, attr, None)
        if _holds_tensor(value) and ("layer", attr, None) not in read:
            form = f"a {value.dim()}-dim tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
            raise IncompatibleLayoutError(f"{what}.{attr}: {form}, not [batch, ..., tokens, ...] with tokens at dim "
                                          f"{dim}; kvlink cannot carry it")
    for attr in STATE_DICTS:
        held = getattr(obj, attr, None)
        entries = held.items() if isinstance(held, dict) else [(None, held)]
        for key, value in entries:
            if _holds_tensor(value) and ("layer", attr, key) not in read:
                raise IncompatibleLayoutError(f"{what}.{attr}[{key}]: a {type(value).__name__} holding tensors, not "
                                              "a tensor; kvlink cannot carry it")
    for attr in CACHE_STATE_LISTS:
        items = getattr(cache, attr, None)
        if not isinstance(items, list) and _holds_tensor(items):
            raise IncompatibleLayoutError(f"{type(cache).__name__}.{attr}: a {type(items).__name__}, not a list of "
                                          "per-layer tensors; kvlink cannot carry it")
        value = items[layer] if isinstance(items, list) and layer < len(items) else None
        if _holds_tensor(value) and ("cache", attr, None) not in read:
            raise IncompatibleLayoutError(f"{type(cache).__name__}.{attr}[{layer}]: a {type(value).__name__} holding "
                                          "tensors, not a tensor; kvlink cannot carry it")


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _refuse_unknown(obj, known: set[str], what: str) -> None:
    for attr, value in vars(obj).items():
        if attr not in known and _holds_tensor(value):
            raise IncompatibleLayoutError(f"{what}.{attr}: holds a tensor kvlink does not know how to carry")


def token_rows(t: torch.Tensor, token_dim: int, row: int) -> torch.Tensor:
    """``[tokens, *per-token shape]`` of batch row ``row`` (a view when possible)."""
    return t[row].movedim(token_dim - 1, 0)


def from_token_rows(rows: torch.Tensor, token_dim: int) -> torch.Tensor:
    """Inverse of :func:`token_rows` for a batch stacked on dim 0: ``[batch, tokens, ...]`` in."""
    return rows.movedim(1, token_dim).contiguous()
