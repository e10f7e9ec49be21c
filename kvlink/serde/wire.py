"""Wire format v2 of a payload: header, segment table, segment bytes. See docs/wire-format.md.

All integers little-endian. Parsing checks every length against its limit and the buffer before
using it, and never allocates from a length it read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvlink.codec import Codec, checksum, encoded_bound
from kvlink.errors import BadMagic, ChecksumMismatch, LengthError, UnknownCodec, UnsupportedVersion, WireFormatError
from kvlink.serde.layout import DTYPE_BY_CODE, DTYPE_CODES, TORCH_DTYPES

MAGIC = b"KVLK"
VERSION = 2  # v2: segments name a component of their layer (v1 named one of five fixed kinds)
# magic, version, flags, header_len, num_segments, header_checksum, fingerprint, token_start,
# token_end, block_size, reserved, body_len
PREFIX = struct.Struct("<4sHHIIQ16sQQIIQ")
# layer, component, role, dtype, codec, ndim, codec_param, reserved, token_start, shape[6], offset,
# length, raw_nbytes, checksum
ENTRY = struct.Struct("<HHBBBBHHI6IQQQQ")
ROLE_TOKENS, ROLE_STATE = 1, 2
MAX_DIMS = 6
MAX_SEGMENTS = 1 << 17
MAX_SEGMENT_BYTES = 1 << 40
CHECKSUM_OFFSET = 16  # byte offset of header_checksum inside PREFIX
DEFINED_FLAGS = 0  # v2 defines no header flags; any set bit is refused, as are non-zero reserved fields


def header_nbytes(num_segments: int) -> int:
    """Bytes of the header of a payload of ``num_segments`` segments: prefix and segment table."""
    return PREFIX.size + ENTRY.size * num_segments


@dataclass(frozen=True)
class SegmentHeader:
    layer: int
    component: int  # index into the layer's components (token tensors, then states)
    is_state: bool
    dtype: str
    codec: Codec
    codec_param: int
    token_start: int
    shape: tuple[int, ...]
    offset: int
    length: int
    raw_nbytes: int
    checksum: int

    @property
    def name(self) -> str:
        return f"layer {self.layer} component {self.component}"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class PayloadHeader:
    fingerprint: bytes
    token_start: int
    token_end: int
    block_size: int
    segments: tuple[SegmentHeader, ...]

    @property
    def header_len(self) -> int:
        return header_nbytes(len(self.segments))

    @property
    def body_len(self) -> int:
        return sum(s.length for s in self.segments)

    def encode(self) -> bytes:
        out = bytearray(self.header_len)
        PREFIX.pack_into(out, 0, MAGIC, VERSION, 0, self.header_len, len(self.segments), 0, self.fingerprint,
                         self.token_start, self.token_end, self.block_size, 0, self.body_len)
        pos = PREFIX.size
        for s in self.segments:
            shape = tuple(s.shape) + (0,) * (MAX_DIMS - len(s.shape))
            ENTRY.pack_into(out, pos, s.layer, s.component, ROLE_STATE if s.is_state else ROLE_TOKENS,
                            DTYPE_CODES[s.dtype], s.codec, len(s.shape), s.codec_param, 0, s.token_start, *shape, s.offset, s.length, s.raw_nbytes, s.checksum)
            pos += ENTRY.size
        struct.pack_into("<Q", out, CHECKSUM_OFFSET, checksum(out))
        return bytes(out)


def peek_lengths(prefix: bytes | memoryview) -> tuple[int, int]:
    """(header_len, body_len) from the first ``PREFIX.size`` bytes, validated against the limits.

    Raises :class:`BadMagic`, :class:`UnsupportedVersion`, :class:`LengthError`, or
    :class:`WireFormatError` when flags or the reserved field are non-zero (v2 defines none).
    A v1 payload (kvlink before the general layer spec) is refused with :class:`UnsupportedVersion`.
    """
    if len(prefix) < PREFIX.size:
        raise LengthError(f"need {PREFIX.size} bytes for the payload prefix, got {len(prefix)}")
    magic, version, flags, header_len, nseg, _, _, _, _, _, reserved, body_len = PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise BadMagic(f"bad payload magic {bytes(magic)!r}")
    if version == 1:
        raise UnsupportedVersion("payload version 1 (written before the general layer spec) is not read by this "
                                 f"build, which reads version {VERSION}: pack it again with this build")
    if version != VERSION:
        raise UnsupportedVersion(f"payload version {version}; this build reads {VERSION}")
    if flags & ~DEFINED_FLAGS or reserved:
        raise WireFormatError(f"undefined header flags {flags:#06x} / reserved {reserved:#x} set")
    if nseg > MAX_SEGMENTS or header_len != header_nbytes(nseg):
        raise LengthError(f"header length {header_len} does not fit {nseg} segments")
    if body_len > MAX_SEGMENT_BYTES * 4:
        raise LengthError(f"body length {body_len} beyond limit")
    return header_len, body_len


def parse_header(buf) -> PayloadHeader:
    """Parse and validate the header at the start of ``buf`` (segment bytes may follow).

    Raises a :class:`WireFormatError` subclass (:class:`LengthError`, :class:`ChecksumMismatch`,
    :class:`UnknownCodec`, ...) for anything out of place, including non-zero reserved fields.
    """
    view = memoryview(buf).cast("B")
    header_len, body_len = peek_lengths(view[: PREFIX.size])
    if len(view) < header_len:
        raise LengthError(f"header of {header_len} bytes, buffer holds {len(view)}")
    head = bytearray(view[:header_len])
    (_, _, _, _, nseg, expect_sum, fingerprint, t0, t1, block_size, _, _) = PREFIX.unpack_from(head, 0)
    struct.pack_into("<Q", head, CHECKSUM_OFFSET, 0)
    got = checksum(head)
    if got != expect_sum:
        raise ChecksumMismatch("header", expect_sum, got)
    if t0 > t1:
        raise WireFormatError(f"token range [{t0}, {t1}) is reversed")
    segments, offset = [], 0
    for i in range(nseg):
        (layer, component, role, dtype, codec, ndim, cparam, reserved, seg_t0, *rest) = ENTRY.unpack_from(
            head, PREFIX.size + i * ENTRY.size)
        shape_raw, (off, length, raw_nbytes, seg_sum) = rest[:MAX_DIMS], rest[MAX_DIMS:]
        where = f"segment {i}"
        if reserved:
            raise WireFormatError(f"{where}: reserved field {reserved:#x} set")
        if role not in (ROLE_TOKENS, ROLE_STATE):
            raise WireFormatError(f"{where}: unknown segment role {role}")
        if dtype not in DTYPE_BY_CODE:
            raise WireFormatError(f"{where}: unknown dtype code {dtype}")
        try:
            codec = Codec(codec)
        except ValueError:
            raise UnknownCodec(f"{where}: unknown codec id {codec}") from None
        if not 1 <= ndim <= MAX_DIMS or any(shape_raw[ndim:]):
            raise WireFormatError(f"{where}: bad rank {ndim}")
        shape = tuple(shape_raw[:ndim])
        seg = SegmentHeader(layer, component, role == ROLE_STATE, DTYPE_BY_CODE[dtype], codec, cparam, seg_t0, shape, off, length, raw_nbytes, seg_sum)
        if raw_nbytes != seg.numel * TORCH_DTYPES[seg.dtype].itemsize or raw_nbytes > MAX_SEGMENT_BYTES:
            raise LengthError(f"{where} ({seg.name}): raw length {raw_nbytes} does not match shape {shape}")
        if codec is Codec.FP8_E4M3 and not 0 <= cparam <= 16:
            raise WireFormatError(f"{where}: bad fp8 group exponent {cparam}")
        if codec is not Codec.FP8_E4M3 and cparam:
            raise WireFormatError(f"{where}: codec parameter {cparam} set for {codec.label}")
        bound = encoded_bound(codec, raw_nbytes, seg.numel, 1 << cparam if codec is Codec.FP8_E4M3 else 128)
        if off != offset or length > bound:
            raise LengthError(f"{where} ({seg.name}): offset {off} / length {length} out of place or beyond {bound}")
        if codec is Codec.NONE and length != raw_nbytes:  # copiers trust an uncompressed segment's shape
            raise LengthError(f"{where} ({seg.name}): uncompressed length {length}, its shape holds {raw_nbytes}")
        offset += length
        segments.append(seg)
    if offset != body_len:
        raise LengthError(f"segments hold {offset} bytes, header says {body_len}")
    return PayloadHeader(bytes(fingerprint), t0, t1, block_size, tuple(segments))

