"""Lossy fp8 (e4m3) quantisation with one fp32 scale per group of values. KV only, off by default.

Encoded layout: ``[num_groups x float32 scale][numel x float8_e4m3fn]``; the last group may be short.
Each value is stored as ``round_e4m3(x / scale)`` with ``scale = amax(group) / 448``, so the error
of a value is at most half an e4m3 step at its magnitude: relative error <= 2**-4 for values above
``scale * 2**-6`` and absolute error <= ``scale * 2**-10`` below that (see docs/codecs.md).
"""

from __future__ import annotations

import math

import torch

from kvlink.errors import CodecError

E4M3_MAX = 448.0
LOSSY_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def encoded_nbytes(numel: int, group: int) -> int:
    return math.ceil(numel / group) * 4 + numel


def fp8_encode(values: torch.Tensor, group: int) -> torch.Tensor:
    """Quantise a floating tensor; returns the encoded uint8 tensor."""
    if values.dtype not in LOSSY_SOURCE_DTYPES:
        raise CodecError(f"fp8 encodes bf16/fp16/fp32 only, got {values.dtype}")
    flat = values.reshape(-1).float()
    numel = flat.numel()
    groups = math.ceil(numel / group)
    padded = torch.zeros(groups * group, dtype=torch.float32)
    padded[:numel] = flat
    padded = padded.view(groups, group)
    amax = padded.abs().amax(dim=1)
    if not torch.isfinite(amax).all():
        raise CodecError("fp8 cannot encode inf or nan")
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (padded / scale[:, None]).to(torch.float8_e4m3fn).view(-1)[:numel]
    out = torch.empty(encoded_nbytes(numel, group), dtype=torch.uint8)
    out[: groups * 4].view(torch.float32).copy_(scale)
    out[groups * 4 :].view(torch.float8_e4m3fn).copy_(q)
    return out


def fp8_decode(data: torch.Tensor, dtype: torch.dtype, numel: int, group: int) -> torch.Tensor:
    """Dequantise ``data`` (uint8) into a new tensor of ``numel`` values of ``dtype``.

    Raises :class:`CodecError` unless ``group`` is positive and ``data`` holds exactly
    ``encoded_nbytes(numel, group)`` bytes, checked before anything is allocated: the output (and
    the fp32 temporaries, a fixed multiple of it) is sized by ``numel``, never by the input.
    """
    if group < 1 or numel < 0:
        raise CodecError(f"fp8 group {group} / length {numel} invalid")
    if data.numel() != encoded_nbytes(numel, group):
        raise CodecError(f"fp8 segment holds {data.numel()} bytes, expected {encoded_nbytes(numel, group)}")
    groups = math.ceil(numel / group)
    scale = data[: groups * 4].clone().view(torch.float32)
    q = data[groups * 4 :].view(torch.float8_e4m3fn).float()
    padded = torch.zeros(groups * group, dtype=torch.float32)
    padded[:numel] = q
    return (padded.view(groups, group) * scale[:, None]).view(-1)[:numel].to(dtype)
