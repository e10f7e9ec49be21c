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


def inventory(cache, num_layers: int) -> None:
    """Refuse a cache holding a tensor kvlink would not carry.

    Raises :class:`IncompatibleLayoutError` naming the object and attribute: a tensor (or a list,
    tuple or dict holding tensors) that is neither a known per-token tensor, a known state, nor a
    config-derived constant; or cache layers beyond the model's ``num_layers``.
    """
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
