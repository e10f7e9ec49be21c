"""Declarative cache layouts.

A :class:`CacheSpec` is an ordered list of :class:`Layer` s. A layer is a list of named components:

- :class:`TokenTensor`: one row of ``shape`` per token (K, V, an MLA latent, indexer keys, ...),
  each with its dtype and a window kind: ``full`` (every token), ``sliding`` (the last ``size``
  tokens) or ``chunked`` (the tokens of the current chunk of ``size``);
- :class:`StateTensor`: a fixed-shape tensor per request (conv state, SSM / recurrent state,
  compressor buffer, counter), each with its own shape and dtype.

A layer may hold both kinds (attention and an SSM in one layer) or nothing (an MLP-only layer).
:func:`FullAttention`, :func:`SlidingWindow`, :func:`MLA` and :func:`LinearAttention` build the
common layers. Derived figures (bytes per token, fixed state per request, totals) and one canonical
fingerprint, which peers compare before accepting data: it covers the name and every component
(name, shape, dtype, window), whichever route built the spec. This module is a leaf.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
from dataclasses import dataclass

from kvlink.errors import SpecError

DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
               "int32": 4, "int64": 8, "bool": 1}
WINDOWS = ("full", "sliding", "chunked")
MAX_DIMS = 5  # per token or per state; the wire format carries one more (tokens)
MAX_COMPONENTS = 255


def _check_dtype(dtype: str, what: str) -> None:
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or dict is unhashable: no TypeError
        raise SpecError(f"{what}: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")


def _check_shape(shape: tuple, what: str) -> None:
    if len(shape) > MAX_DIMS:
        raise SpecError(f"{what}: at most {MAX_DIMS} dims, got {shape}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise SpecError(f"{what}: dims must be positive ints, got {shape}")


def _tuple(value, what: str) -> tuple:
    """``value`` as a tuple; a bare int or a lone component is a SpecError, not a TypeError."""
    try:
        return tuple(value)
    except TypeError:
        raise SpecError(f"{what}: expected a sequence, got {type(value).__name__}") from None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 64 or not name.isascii() or not name.isprintable():
        raise SpecError(f"component names are 1..64 printable ASCII characters, got {name!r}")


@dataclass(frozen=True)
class TokenTensor:
    """A per-token component: one ``shape`` row of ``dtype`` per token.

    ``window``: ``"full"`` keeps every token; ``"sliding"`` the last ``size`` tokens;
    ``"chunked"`` the tokens since the last multiple of ``size`` (chunked-local attention).
    Raises :class:`SpecError` for a bad name, shape, dtype (of any type), window or size.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    window: str = "full"
    size: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _tuple(self.shape, f"token tensor {self.name!r} shape"))
        _check_name(self.name)
        _check_shape(self.shape, f"token tensor {self.name!r}")
        _check_dtype(self.dtype, f"token tensor {self.name!r}")
        if self.window not in WINDOWS:
            raise SpecError(f"token tensor {self.name!r}: window must be one of {WINDOWS}, got {self.window!r}")
        # bool is refused: size=True would fingerprint as `true`, unlike the same layout with size=1
        if (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0
                or (self.window == "full") != (self.size == 0)):
            raise SpecError(f"token tensor {self.name!r}: a {self.window} window needs "
                            f"{'size 0' if self.window == 'full' else 'a positive size'}, got {self.size!r}")

    @property
    def is_state(self) -> bool:
        return False

    @property
    def bytes_per_token(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def live_start(self, token_end: int) -> int:
        """The first token still live when the sequence ends at ``token_end``."""
        if self.window == "sliding":
            return max(0, token_end - self.size)
        if self.window == "chunked":
            return token_end // self.size * self.size
        return 0

    @property
    def max_live(self) -> int:
        """Most tokens live at once for a windowed tensor (0 for ``full``: unbounded)."""
        return {"full": 0, "sliding": self.size, "chunked": self.size - 1}[self.window]

    def canon(self) -> list:
        return ["token", self.name, list(self.shape), self.dtype, self.window, self.size]


@dataclass(frozen=True)
class StateTensor:
    """A fixed-shape per-request component (conv or recurrent state, buffer, counter).

    Raises :class:`SpecError` for a bad name, shape or dtype (of any type)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _tuple(self.shape, f"state tensor {self.name!r} shape"))
        _check_name(self.name)
        if not self.shape:
            raise SpecError(f"state tensor {self.name!r}: needs at least one dim (use (1,) for a scalar)")
        _check_shape(self.shape, f"state tensor {self.name!r}")
        _check_dtype(self.dtype, f"state tensor {self.name!r}")

    @property
    def is_state(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def canon(self) -> list:
        return ["state", self.name, list(self.shape), self.dtype]


Component = TokenTensor | StateTensor


@dataclass(frozen=True)
class Layer:
    """One layer's components: token tensors first, then states. ``variant`` is informative only
    (e.g. "kda", "mamba2"); it is not part of the fingerprint."""

    tokens: tuple[TokenTensor, ...] = ()
    states: tuple[StateTensor, ...] = ()
    variant: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _tuple(self.tokens, "a layer's tokens"))
        object.__setattr__(self, "states", _tuple(self.states, "a layer's states"))
        if any(not isinstance(t, TokenTensor) for t in self.tokens) or any(
                not isinstance(s, StateTensor) for s in self.states):
            raise SpecError("a layer's tokens are TokenTensor and its states StateTensor")
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise SpecError(f"component names repeat within a layer: {names}")
        if len(names) > MAX_COMPONENTS:
            raise SpecError(f"at most {MAX_COMPONENTS} components per layer")

    @property
    def components(self) -> tuple[Component, ...]:
        """Token tensors then states; a component's wire index is its position here."""
        return self.tokens + self.states

    @property
    def kind(self) -> str:
        """A one-word description: none, linear (states only), full, mla, sliding, chunked, hybrid."""
        if not self.tokens:
            return "linear" if self.states else "none"
        if self.states:
            return "hybrid"
        if len(self.tokens) == 1 and self.tokens[0].name == "latent" and self.tokens[0].window == "full":
            return "mla"
        windows = {t.window for t in self.tokens}
        return "full" if "full" in windows else sorted(windows)[0]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token of the full-window token tensors."""
        return sum(t.bytes_per_token for t in self.tokens if t.window == "full")

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def window_bytes(self, tokens: int) -> int:
        """Bytes of the windowed token tensors live after ``tokens`` tokens."""
        return sum((tokens - t.live_start(tokens)) * t.bytes_per_token for t in self.tokens if t.window != "full")

    def canon(self) -> list:
        return [c.canon() for c in self.components]


def FullAttention(kv_heads: int, head_dim: int, v_head_dim: int | None = None, dtype: str = "bfloat16") -> Layer:
    """GQA/MHA layer: per token, ``kv_heads x head_dim`` keys and ``kv_heads x v_head_dim`` values."""
    return _attention(kv_heads, head_dim, v_head_dim, dtype, "full", 0)


def SlidingWindow(kv_heads: int, head_dim: int, v_head_dim: int | None = None, dtype: str = "bfloat16",
                  window: int = 0) -> Layer:
    """GQA layer that attends to the last ``window`` tokens only: only that window is live."""
    return _attention(kv_heads, head_dim, v_head_dim, dtype, "sliding", window)


def _attention(kv_heads, head_dim, v_head_dim, dtype, window, size) -> Layer:
    v = head_dim if v_head_dim is None else v_head_dim
    return Layer((TokenTensor("k", (kv_heads, head_dim), dtype, window, size),
                  TokenTensor("v", (kv_heads, v), dtype, window, size)))


def MLA(kv_lora_rank: int, rope_dim: int, dtype: str = "bfloat16") -> Layer:
    """Multi-head latent attention: one latent of ``kv_lora_rank + rope_dim`` values per token."""
    if not all(isinstance(d, int) and d > 0 for d in (kv_lora_rank, rope_dim)):
        raise SpecError(f"MLA needs positive kv_lora_rank and rope_dim, got {kv_lora_rank}, {rope_dim}")
    return Layer((TokenTensor("latent", (kv_lora_rank + rope_dim,), dtype),))


def LinearAttention(recurrent_shape: tuple[int, ...], recurrent_dtype: str = "float32",
                    conv_shape: tuple[int, ...] | None = None, conv_dtype: str = "bfloat16",
                    variant: str = "linear") -> Layer:
    """Linear-attention / SSM layer: an optional short-conv state, e.g. ``(channels, kernel - 1)``,
    then a recurrent state, e.g. ``(heads, d_k, d_v)``, each with its own dtype."""
    states = [] if conv_shape is None else [StateTensor("conv", conv_shape, conv_dtype)]
    return Layer((), (*states, StateTensor("recurrent", recurrent_shape, recurrent_dtype)), variant)


# (layer, component index) of each group a pool entry or payload may carry on its own.
GROUPS = ("full", "window", "state")


@dataclass(frozen=True)
class CacheSpec:
    """An ordered list of layers plus the model name; the unit peers agree on."""

    name: str
    layers: tuple[Layer, ...]
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _tuple(self.layers, "a cache spec's layers"))
        if not isinstance(self.name, str):  # to_dict/from_dict would turn it into a str: another fingerprint
            raise SpecError(f"a cache spec's name is a str, got {type(self.name).__name__}")
        if not self.layers:
            raise SpecError("a cache spec needs at least one layer")
        if len(self.layers) > 65535:
            raise SpecError("at most 65535 layers")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise SpecError(f"layer {i}: expected a Layer, got {type(layer).__name__}")
        if not any(layer.components for layer in self.layers):
            raise SpecError(f"{self.name}: no layer holds anything")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_indices(self, *kinds: str) -> list[int]:
        """Layers whose :attr:`Layer.kind` is one of ``kinds``."""
        return [i for i, layer in enumerate(self.layers) if layer.kind in kinds]

    def group(self, name: str) -> list[tuple[int, int]]:
        """``(layer, component)`` pairs of a group: ``full`` (full-window token tensors), ``window``
        (sliding or chunked token tensors) or ``state``."""
        if name not in GROUPS:
            raise SpecError(f"unknown component group {name!r}; expected one of {GROUPS}")
        return [(i, c) for i, layer in enumerate(self.layers) for c, comp in enumerate(layer.components)
                if group_of(comp) == name]

    @property
    def window_tokens(self) -> int:
        """Most tokens any windowed tensor keeps live (0 without windowed tensors)."""
        return max((t.max_live for layer in self.layers for t in layer.tokens if t.window != "full"), default=0)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per token over the full-window token tensors (one logical copy)."""
        return sum(layer.bytes_per_token for layer in self.layers)

    @property
    def state_bytes(self) -> int:
        """Bytes of the fixed-shape states of one request."""
        return sum(layer.state_bytes for layer in self.layers)

    def window_bytes(self, tokens: int) -> int:
        return sum(layer.window_bytes(tokens) for layer in self.layers)

    @property
    def fixed_state_bytes(self) -> int:
        """Bytes per request that do not grow with length: states plus full windows."""
        return self.state_bytes + sum(t.max_live * t.bytes_per_token for layer in self.layers
                                      for t in layer.tokens if t.window != "full")

    def bytes_at(self, tokens: int) -> int:
        """Total cache bytes of one request of ``tokens`` tokens. Raises :class:`SpecError` unless
        ``tokens`` is an int >= 0."""
        try:
            count = operator.index(tokens)  # ints and numpy ints; "3" or 3.0 would raise TypeError below
        except TypeError:
            count = -1
        if count < 0 or isinstance(tokens, bool):
            raise SpecError(f"tokens must be an int >= 0, got {tokens!r}")
        tokens = count
        return self.kv_bytes_per_token * tokens + self.window_bytes(tokens) + self.state_bytes

    def to_dict(self) -> dict:
        """A JSON-able description; :meth:`from_dict` rebuilds the same spec."""
        return {"name": self.name, "notes": self.notes, "layers": [
            {"tokens": [[t.name, list(t.shape), t.dtype, t.window, t.size] for t in layer.tokens],
             "states": [[s.name, list(s.shape), s.dtype] for s in layer.states], "variant": layer.variant}
            for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        """Inverse of :meth:`to_dict`. Raises :class:`SpecError` for anything malformed."""
        try:
            layers = tuple(Layer(tuple(TokenTensor(n, tuple(s), d, w, z) for n, s, d, w, z in raw.get("tokens", ())),
                                 tuple(StateTensor(n, tuple(s), d) for n, s, d in raw.get("states", ())),
                                 str(raw.get("variant", ""))) for raw in data["layers"])
            return cls(name=str(data["name"]), layers=layers, notes=str(data.get("notes", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"malformed spec dict: {exc!r}") from exc

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """16 bytes identifying the name and every component (not notes or variants). Computed once
        per spec: packing reads it for every layer."""
        canon = {"name": self.name, "layers": [layer.canon() for layer in self.layers]}
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"kvlink-spec-v2\0" + blob).digest()[:16]

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


def group_of(comp: Component) -> str:
    """The group (:data:`GROUPS`) a component travels in."""
    if comp.is_state:
        return "state"
    return "full" if comp.window == "full" else "window"
