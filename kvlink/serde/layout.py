"""What a payload holds for each layer: segment kinds, dtypes and shapes for a token range.

Packer and unpacker both derive their expectations from here, so a payload is checked against the
destination's spec segment by segment before any byte is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from kvlink.errors import SpecError
from kvlink.spec import CacheSpec

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8": torch.int8, "uint8": torch.uint8,
}
# Wire codes of dtypes; never renumber.
DTYPE_CODES = {"bfloat16": 1, "float16": 2, "float32": 3, "float8_e4m3fn": 4, "float8_e5m2": 5, "int8": 6, "uint8": 7}
DTYPE_BY_CODE = {code: name for name, code in DTYPE_CODES.items()}


class SegmentKind(IntEnum):
    """What a segment holds. Wire codes; never renumber."""

    K = 1
    V = 2
    LATENT = 3
    CONV = 4
    RECURRENT = 5

    @property
    def is_state(self) -> bool:
        return self in (SegmentKind.CONV, SegmentKind.RECURRENT)


_PLANE_KINDS = {"k": SegmentKind.K, "v": SegmentKind.V, "latent": SegmentKind.LATENT}
_STATE_KINDS = {"conv": SegmentKind.CONV, "recurrent": SegmentKind.RECURRENT}


@dataclass(frozen=True)
class SegmentLayout:
    """One expected segment: KV segments cover tokens [token_start, token_start + shape[0])."""

    layer: int
    kind: SegmentKind
    dtype: str
    shape: tuple[int, ...]
    token_start: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.kind.name.lower()}"


def layer_segments(spec: CacheSpec, layer: int, token_start: int, token_end: int) -> list[SegmentLayout]:
    """Segments of ``layer`` for a payload covering tokens [token_start, token_end).

    Sliding-window layers hold only the live window ending at ``token_end``; linear layers hold
    their state at ``token_end`` (conv first, then recurrent).
    """
    if not 0 <= layer < spec.num_layers:
        raise SpecError(f"layer {layer} out of range for {spec.name} ({spec.num_layers} layers)")
    if not 0 <= token_start <= token_end:
        raise SpecError(f"bad token range [{token_start}, {token_end})")
    spec_layer = spec.layers[layer]
    if spec_layer.kind == "linear":
        return [SegmentLayout(layer, _STATE_KINDS[name], dtype, shape, token_end)
                for name, shape, dtype in spec_layer.states]
    start = token_start
    if spec_layer.kind == "sliding":
        start = max(token_start, token_end - spec_layer.window)
    return [SegmentLayout(layer, _PLANE_KINDS[name], spec_layer.dtype, (token_end - start, *shape), start)
            for name, shape in spec_layer.token_planes]


def payload_segments(spec: CacheSpec, layers, token_start: int, token_end: int) -> list[SegmentLayout]:
    return [seg for layer in layers for seg in layer_segments(spec, layer, token_start, token_end)]
