"""What a payload holds for each layer: one segment per component, with dtype and shape for a token range.

Packer and unpacker both derive their expectations from here, so a payload is checked against the
destination's spec segment by segment before any byte is written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvlink.errors import SpecError
from kvlink.spec import GROUPS, CacheSpec, group_of

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8, "uint8": torch.uint8,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# Wire codes of dtypes; never renumber.
DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3, "float8_e4m3fn": 4, "float8_e5m2": 5, "int8": 6, "uint8": 7,
               "int32": 8, "int64": 9, "bool": 10}
DTYPE_BY_CODE = {code: name for name, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class SegmentLayout:
    """One expected segment: component ``component`` of ``layer``. Token segments cover tokens
    [token_start, token_start + shape[0]); state segments hold the state at ``token_start``."""

    layer: int
    component: int
    label: str  # the component's name in the spec
    is_state: bool
    dtype: str
    shape: tuple[int, ...]
    token_start: int

    @functools.cached_property  # layouts are remembered and asked for their size per segment
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @functools.cached_property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.label}"


def layer_segments(spec: CacheSpec, layer: int, token_start: int, token_end: int,
                   group: str | None = None) -> list[SegmentLayout]:
    """Segments of ``layer`` for a payload covering tokens [token_start, token_end), in component order.

    Windowed token tensors hold only what is live at ``token_end``; states hold their value at
    ``token_end``. ``group`` (``full``, ``window``, ``state``) keeps only that group's components.
    """
    if not 0 <= layer < spec.num_layers:
        raise SpecError(f"layer {layer} out of range for {spec.name} ({spec.num_layers} layers)")
    if not 0 <= token_start <= token_end < 1 << 32:  # segment token starts are u32 on the wire
        raise SpecError(f"bad token range [{token_start}, {token_end})")
    if group is not None and group not in GROUPS:
        raise SpecError(f"unknown component group {group!r}; expected one of {GROUPS}")
    out = []
    for index, comp in enumerate(spec.layers[layer].components):
        if group is not None and group != group_of(comp):
            continue
        if comp.is_state:
            out.append(SegmentLayout(layer, index, comp.name, True, comp.dtype, comp.shape, token_end))
            continue
        start = max(token_start, comp.live_start(token_end))
        out.append(SegmentLayout(layer, index, comp.name, False, comp.dtype, (token_end - start, *comp.shape), start))
    return out


_CACHE: dict = {}
_CACHE_MAX = 1 << 14


def payload_segments(spec: CacheSpec, layers, token_start: int, token_end: int,
                     group: str | None = None) -> list[SegmentLayout]:
    """Segments of ``layers`` in order. Remembered per (spec, layers, range, group): an engine
    packs and restores the same pool block ranges request after request, and a model of ~100
    layers has hundreds of segments per entry."""
    layers = tuple(layers)
    key = (spec.fingerprint, layers, token_start, token_end, group)
    hit = _CACHE.get(key)  # the fingerprint covers every component: all that segments depend on
    if hit is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()  # bounded; refilled by the next calls
        hit = _CACHE[key] = tuple(seg for layer in layers
                                  for seg in layer_segments(spec, layer, token_start, token_end, group))
    return list(hit)
