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


# An lz4 block expands at most ~255x (a match length byte of 255 costs one input byte), so a claim
# beyond this is refused before the output is allocated.
LZ4_MAX_RATIO = 255
LZ4_MAX_RAW = 0x7E000000  # LZ4_MAX_INPUT_SIZE: the block format cannot describe more


def lz4_decompress(data, raw_nbytes: int) -> bytearray:
    """Decode an lz4 block into exactly ``raw_nbytes`` bytes; the output buffer is ``raw_nbytes``
    long and lz4 refuses to write past it. Raises :class:`CodecError` on any other outcome."""
    view = memoryview(data).cast("B")
    if not 0 <= raw_nbytes <= min(LZ4_MAX_RAW, LZ4_MAX_RATIO * view.nbytes + 64):
        raise CodecError(f"lz4 block of {view.nbytes} bytes cannot hold {raw_nbytes} raw bytes")
    if raw_nbytes == 0:
        if view.tobytes() not in (b"", b"\x00"):  # lz4 encodes empty input as one zero token
            raise CodecError(f"lz4 block of {view.nbytes} bytes for an empty segment")
        return bytearray()
    try:
        out = lz4.block.decompress(view, uncompressed_size=raw_nbytes, return_bytearray=True)
    except (lz4.block.LZ4BlockError, ValueError, OverflowError, MemoryError) as exc:
        raise CodecError(f"lz4 decode failed: {exc}") from exc
    if len(out) != raw_nbytes:
        raise CodecError(f"lz4 decoded {len(out)} bytes, expected {raw_nbytes}")
    return out


_local = threading.local()  # zstd (de)compressor objects must not be shared between threads
ZSTD_MIN_WINDOW = 1 << 20  # windows up to this are always allowed (zstd's own minimum is 1 KiB)


def zstd_compress(data, level: int) -> bytes:
    cache = _local.__dict__.setdefault("compressors", {})
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp.compress(memoryview(data))


def _zstd_decompressor(raw_nbytes: int) -> zstandard.ZstdDecompressor:
    # A frame may ask for a window (decoder memory) up to 2 GiB; no honest frame of raw_nbytes
    # needs more than the next power of two, so zstd itself refuses anything beyond that.
    limit = max(ZSTD_MIN_WINDOW, 1 << max(raw_nbytes - 1, 1).bit_length())
    cache = _local.__dict__.setdefault("decompressors", {})
    dctx = cache.get(limit)
    if dctx is None:
        dctx = cache[limit] = zstandard.ZstdDecompressor(max_window_size=limit)
    return dctx


def zstd_decompress(data, raw_nbytes: int) -> torch.Tensor:
    """Decode zstd frames into a new uint8 tensor of exactly ``raw_nbytes``.

    Never allocates from the frame: python-zstandard's one-shot ``decompress`` sizes its output by
    the frame's declared content size and ignores ``max_output_size``, so a 32 KiB frame declaring
    1 GiB would allocate 1 GiB. Here a declared size other than ``raw_nbytes`` is refused up front,
    the frames stream into a buffer of exactly ``raw_nbytes``, and any byte beyond it, a short
    result, trailing garbage or an oversized window raises :class:`CodecError`.
    """
    view = memoryview(data).cast("B")
    try:
        params = zstandard.get_frame_parameters(view)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame header: {exc}") from exc
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, raw_nbytes):
        raise CodecError(f"zstd frame declares {params.content_size} bytes, segment holds {raw_nbytes}")
    try:
        out = torch.empty(raw_nbytes, dtype=torch.uint8)
    except RuntimeError as exc:  # torch's allocation failure
        raise CodecError(f"cannot allocate {raw_nbytes} bytes to decode into: {exc}") from exc
    dest = memoryview(out.numpy()) if raw_nbytes else memoryview(bytearray())
    filled = 0
    try:
        with _zstd_decompressor(raw_nbytes).stream_reader(view, read_across_frames=True, closefd=False) as reader:
            while filled < raw_nbytes:
                got = reader.readinto(dest[filled:])
                if got == 0:
                    break
                filled += got
            extra = reader.read(1)  # decodes at most one more byte: an overflow costs nothing
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd decode failed: {exc}") from exc
    if filled != raw_nbytes or extra:
        raise CodecError(f"zstd decoded {'more than ' if extra else ''}{filled} bytes, expected {raw_nbytes}")
    return out
