"""Segment codecs: identifiers, encode and decode.

======  ==============  ========  ==========================================
id      name            lossless  notes
======  ==============  ========  ==========================================
0       none            yes       zero copy: the staging bytes are sent as is
1       lz4             yes
2       zstd            yes       level from :class:`~kvlink.config.CodecConfig`
3       shuffle-lz4     yes       byte-plane shuffle, then lz4
4       shuffle-zstd    yes       byte-plane shuffle, then zstd
5       fp8-e4m3        no        KV only, per-group fp32 scales; never state
======  ==============  ========  ==========================================
"""

from __future__ import annotations

from enum import IntEnum

import torch

from kvlink.codec import fp8, lossless
from kvlink.codec.checksum import checksum
from kvlink.errors import CodecError, ConfigError, UnknownCodec


class Codec(IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2
    SHUFFLE_LZ4 = 3
    SHUFFLE_ZSTD = 4
    FP8_E4M3 = 5

    @property
    def lossy(self) -> bool:
        return self is Codec.FP8_E4M3

    @classmethod
    def parse(cls, name: str | int | "Codec") -> "Codec":
        if isinstance(name, Codec):
            return name
        if isinstance(name, int):
            try:
                return cls(name)
            except ValueError:
                raise UnknownCodec(f"unknown codec id {name}") from None
        try:
            return cls[name.upper().replace("-", "_")]
        except KeyError:
            raise ConfigError(f"unknown codec {name!r}; known: {[c.name.lower().replace('_', '-') for c in cls]}") from None

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


def encode(codec: Codec, raw: torch.Tensor, *, zstd_level: int = 1, fp8_group: int = 128):
    """Encode a contiguous CPU tensor; returns a bytes-like object (a view of ``raw`` for NONE)."""
    data = lossless.as_byte_tensor(raw)
    if codec is Codec.NONE:
        return memoryview(data.numpy())
    if codec is Codec.FP8_E4M3:
        return memoryview(fp8.fp8_encode(raw, fp8_group).numpy())
    if codec in (Codec.SHUFFLE_LZ4, Codec.SHUFFLE_ZSTD):
        data = lossless.shuffle(data, raw.element_size())
    buf = memoryview(data.numpy())
    if codec in (Codec.LZ4, Codec.SHUFFLE_LZ4):
        return lossless.lz4_compress(buf)
    if codec in (Codec.ZSTD, Codec.SHUFFLE_ZSTD):
        return lossless.zstd_compress(buf, zstd_level)
    raise UnknownCodec(f"cannot encode with codec {codec!r}")


def decode(codec: Codec, data, dtype: torch.dtype, numel: int, *, fp8_group: int = 128) -> torch.Tensor:
    """Decode ``data`` into a flat tensor of ``numel`` values of ``dtype``.

    For NONE the result views ``data`` (no copy). Raises :class:`CodecError` when the encoded bytes
    do not decode to exactly ``numel`` values, or ``numel``/``fp8_group`` is invalid; the output
    size is never taken from the input (no decoder writes or allocates more than ``numel`` values,
    whatever a frame declares), and :class:`UnknownCodec` for a codec id it cannot decode.
    """
    if numel < 0:
        raise CodecError(f"cannot decode {numel} values")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw_nbytes = numel * itemsize
    if codec is Codec.NONE:
        if memoryview(data).nbytes != raw_nbytes:
            raise CodecError(f"raw segment holds {memoryview(data).nbytes} bytes, expected {raw_nbytes}")
        return lossless.as_byte_tensor(data).view(dtype)
    if codec is Codec.FP8_E4M3:
        return fp8.fp8_decode(lossless.as_byte_tensor(data), dtype, numel, fp8_group)
    if codec in (Codec.LZ4, Codec.SHUFFLE_LZ4):
        out = lossless.lz4_decompress(data, raw_nbytes)
    elif codec in (Codec.ZSTD, Codec.SHUFFLE_ZSTD):
        out = lossless.zstd_decompress(data, raw_nbytes)
    else:
        raise UnknownCodec(f"cannot decode codec {codec!r}")
    flat = lossless.as_byte_tensor(out)
    if codec in (Codec.SHUFFLE_LZ4, Codec.SHUFFLE_ZSTD):
        flat = lossless.unshuffle(flat, itemsize)
    return flat.view(dtype)


def encoded_bound(codec: Codec, raw_nbytes: int, numel: int, fp8_group: int = 128) -> int:
    """Upper bound of an encoded segment's size, used to reject oversized lengths early."""
    if codec is Codec.NONE:
        return raw_nbytes
    if codec is Codec.FP8_E4M3:
        return fp8.encoded_nbytes(numel, fp8_group)
    # lz4 worst case is n + n/255 + 16; zstd's is smaller than that plus its frame header.
    return raw_nbytes + raw_nbytes // 255 + 1024


__all__ = ["Codec", "encode", "decode", "encoded_bound", "checksum"]
