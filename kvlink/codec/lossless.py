"""Lossless codecs: lz4 and zstd, each optionally after a byte-plane shuffle.

The shuffle splits 2- or 4-byte elements into byte planes (all first bytes, then all second bytes,
...): bf16 sign/exponent bytes are highly repetitive while mantissa bytes are near random, so the
compressors find far more to work with once the two are apart.
"""

from __future__ import annotations

import threading
import warnings

import lz4.block
import torch
import zstandard

from kvlink.errors import CodecError

# Received and decompressed payloads are read-only buffers that kvlink only ever reads from;
# torch warns on every view of one, which would flood logs on the data path.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def as_byte_tensor(data) -> torch.Tensor:
    """A uint8 tensor viewing ``data`` (bytes-like or tensor) without copying."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).view(torch.uint8)
    view = memoryview(data)
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def shuffle(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Byte-plane shuffle of a uint8 tensor whose length is a multiple of ``itemsize``."""
    if itemsize == 1:
        return data
    # One strided copy per plane runs ~20x faster than transpose().contiguous() on uint8.
    elems = data.numel() // itemsize
    src = data.view(-1, itemsize)
    out = torch.empty(data.numel(), dtype=torch.uint8)
    for k in range(itemsize):
        out[k * elems : (k + 1) * elems].copy_(src[:, k])
    return out


def unshuffle(data: torch.Tensor, itemsize: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`shuffle`; writes into ``out`` (uint8, same length) when given."""
    if out is None:
        out = torch.empty(data.numel(), dtype=torch.uint8)
    if itemsize == 1:
        out.copy_(data)
        return out
    elems = data.numel() // itemsize
    dst = out.view(-1, itemsize)
    for k in range(itemsize):
        dst[:, k].copy_(data[k * elems : (k + 1) * elems])
    return out


def lz4_compress(data) -> bytes:
    return lz4.block.compress(memoryview(data), store_size=False)


def lz4_decompress(data, raw_nbytes: int) -> bytearray:
    try:
        out = lz4.block.decompress(memoryview(data), uncompressed_size=raw_nbytes, return_bytearray=True)
    except lz4.block.LZ4BlockError as exc:
        raise CodecError(f"lz4 decode failed: {exc}") from exc
    if len(out) != raw_nbytes:
        raise CodecError(f"lz4 decoded {len(out)} bytes, expected {raw_nbytes}")
    return out


_local = threading.local()  # zstd (de)compressor objects must not be shared between threads


def zstd_compress(data, level: int) -> bytes:
    cache = _local.__dict__.setdefault("compressors", {})
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp.compress(memoryview(data))


def zstd_decompress(data, raw_nbytes: int) -> bytes:
    try:
        # max_output_size bounds the allocation by the validated raw size, never by the frame.
        if not hasattr(_local, "decompressor"):
            _local.decompressor = zstandard.ZstdDecompressor()
        out = _local.decompressor.decompress(memoryview(data), max_output_size=raw_nbytes)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd decode failed: {exc}") from exc
    if len(out) != raw_nbytes:
        raise CodecError(f"zstd decoded {len(out)} bytes, expected {raw_nbytes}")
    return out
