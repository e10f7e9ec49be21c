"""Where the tensors of a transformers cache live, and how to read and restore them.

A cache layer object holds per-token tensors (``keys``/``values`` ``[batch, heads, tokens, dim]``,
``indexer_keys`` ``[batch, tokens, dim]``) and fixed-shape states (``conv_states[i]``,
``recurrent_states[i]`` ``[batch, ...]``); a few caches keep states beside their layers
(``MiniMaxCache.linear_cache[layer]``). Each becomes one named component of a kvlink
:class:`~kvlink.spec.Layer`. :func:`inventory` lists every tensor an object holds, so that a tensor
kvlink does not know is refused by name instead of dropped.
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


@dataclass(frozen=True)
class Slot:
    """One carried tensor: ``where`` is ``"layer"`` (an attribute of the layer object, with
    ``key`` the dict index of a state) or ``"cache"`` (a per-layer list on the cache object)."""

    name: str
    attr: str
    key: int | None = None
    token_dim: int | None = None  # None: a state
    where: str = "layer"

    def read(self, cache, layer: int) -> torch.Tensor | None:
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


def slots(cache, layer: int) -> list[Slot]:
    """The tensors layer ``layer`` of ``cache`` holds now (token tensors first, then states)."""
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
    return tokens + states


def check_is_cache(cache) -> None:
    """Raises :class:`IncompatibleLayoutError` unless ``cache`` looks like a transformers ``Cache``
    (an object with a ``layers`` list), e.g. for ``None`` or a legacy tuple of tuples."""
    if not isinstance(getattr(cache, "layers", None), (list, tuple)):
        raise IncompatibleLayoutError(f"not a transformers Cache (a {type(cache).__name__} with no layers list)")


def inventory(cache, num_layers: int) -> None:
    """Refuse a cache holding a tensor kvlink would not carry.

    Raises :class:`IncompatibleLayoutError` naming the object and attribute: ``cache`` is not a
    transformers Cache; a tensor (or a list, tuple or dict holding tensors) that is neither a known
    per-token tensor, a known state, nor a config-derived constant; a known attribute holding
    tensors in a form :func:`slots` does not read (keys with too few dims, a state that is a tuple
    of tensors, a ``linear_cache`` entry that is a list); or cache layers beyond ``num_layers``.
    """
    check_is_cache(cache)
    if len(cache.layers) > num_layers:
        raise IncompatibleLayoutError(f"{type(cache).__name__} holds {len(cache.layers)} layers, the model {num_layers}")
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
        _refuse_unread(cache, i)


def _refuse_unread(cache, layer: int) -> None:
    """A known attribute holding tensors that :func:`slots` does not read would be dropped: refuse.

    Checked per entry (a state dict's index, a ``linear_cache`` layer), so that one readable
    entry does not hide an unreadable one beside it."""
    read = {(s.where, s.attr, s.key) for s in slots(cache, layer)}
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
