"""xxh3-64 checksums of segments of a device buffer, computed on the device.

The digests equal :func:`kvlink.codec.checksum` of the same bytes (the payload checksum), so a
payload packed from a GPU cache is hashed where its bytes are, and the host does not hash it
again. Kernels: :mod:`kvlink.ops.triton_xxh3`; reference: :func:`kvlink.ops.reference.xxh3_segments`.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from kvlink.config import triton_interpret_enabled
from kvlink.errors import BackendUnavailable, ConfigError
from kvlink.ops import triton_xxh3

MIN_LEN = triton_xxh3.MIN_LEN  # shorter segments take xxh3's short paths: hash them on the host
MAX_SEGMENTS = 1 << 17  # per call: what the kernels' segment search covers

_CONSTANTS: dict[torch.device, torch.Tensor] = {}


def available(device_type: str) -> bool:
    """Whether :func:`queue_xxh3` runs on tensors of ``device_type``: CUDA with Triton, or CPU
    under ``TRITON_INTERPRET=1`` (how CI runs the kernels)."""
    if not triton_xxh3.available():
        return False
    return device_type == "cuda" or (device_type == "cpu" and triton_interpret_enabled())


def _constants(device: torch.device) -> torch.Tensor:
    table = _CONSTANTS.get(device)
    if table is None:
        table = _CONSTANTS[device] = torch.tensor(triton_xxh3.CONSTANTS, dtype=torch.int64, device=device)
    return table


def queue_xxh3(data: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """Queue, on ``data``'s device and current stream, the xxh3-64 of ``data[o:o + n]`` for each
    offset ``o`` and length ``n``; returns an int64 tensor on that device whose entries are the
    digests' bit patterns (``int(d) & (2**64 - 1)``; :func:`to_ints`), valid once the stream has
    run the kernels.

    ``data``: a contiguous 1-D uint8 tensor starting 8-byte aligned; offsets multiples of 8;
    lengths at least :data:`MIN_LEN`. Raises :class:`ConfigError` for anything else,
    :class:`BackendUnavailable` where the kernels cannot run (:func:`available`, or they fail to
    build or launch), and ``torch.cuda.OutOfMemoryError`` when the device has no room for the
    block sums (1/16 of the bytes hashed).
    """
    if not available(data.device.type):
        raise BackendUnavailable(f"device hashing needs Triton and a CUDA tensor (or TRITON_INTERPRET=1), "
                                 f"got a {data.device.type} tensor")
    if data.dim() != 1 or data.dtype != torch.uint8 or not data.is_contiguous():
        raise ConfigError(f"data must be a contiguous 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
    if data.data_ptr() % 8:
        raise ConfigError("data must start 8-byte aligned")
    if len(offsets) != len(lengths) or len(offsets) > MAX_SEGMENTS:
        raise ConfigError(f"{len(offsets)} offsets for {len(lengths)} lengths (at most {MAX_SEGMENTS})")
    rows, row = [], 0
    for off, n in zip(offsets, lengths):
        if off % 8 or off < 0 or off + n > data.numel():
            raise ConfigError(f"segment [{off}, {off + n}) is misaligned or outside {data.numel()} bytes")
        if n < MIN_LEN:
            raise ConfigError(f"segment of {n} bytes: device hashing starts at {MIN_LEN}")
        rows.append(row)
        row += (n - 1) // triton_xxh3.BLOCK + 1
    out = torch.empty(len(offsets), dtype=torch.int64, device=data.device)
    if not offsets:
        return out
    params = torch.tensor([list(offsets), list(lengths), rows], dtype=torch.int64).to(data.device, non_blocking=True)
    sums = torch.empty((row, 8), dtype=torch.int64, device=data.device)
    on_device = torch.cuda.device(data.device) if data.device.type == "cuda" else contextlib.nullcontext()
    with on_device:  # Triton launches on the current device's stream: make it the data's
        try:
            triton_xxh3.launch(data, params, _constants(data.device), sums, out)
        except Exception as exc:  # e.g. a kernel this device's architecture or toolchain cannot build
            raise BackendUnavailable(f"the device xxh3 kernels cannot run on {data.device}: {exc}") from exc
    return out


def to_ints(digests: torch.Tensor) -> list[int]:
    """Digests from :func:`queue_xxh3` as Python ints (waits for the device)."""
    return [d & 0xFFFF_FFFF_FFFF_FFFF for d in digests.cpu().tolist()]
