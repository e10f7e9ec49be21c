"""Transport frames: a fixed 48-byte header, then ``length`` body bytes. See docs/transport-frames.md.

The header is self-checking (its own checksum), so a receiver learns that a header is damaged
before it trusts any length in it; the body carries its own xxh3-64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from kvlink.codec import checksum
from kvlink.errors import BadMagic, ChecksumMismatch, LengthError, UnsupportedVersion, WireFormatError

MAGIC = b"KVLF"
VERSION = 1
# magic, version, type, flags, transfer_id, stream, length, offset, body_checksum, reserved, header_checksum
HEADER = struct.Struct("<4sBBHQIIQQII")
HEADER_SIZE = HEADER.size  # 48
MAX_CONTROL_BODY = 64 << 10


class FrameType(IntEnum):
    """Frame types. Wire codes; never renumber."""

    HELLO = 1       # client -> server: fingerprint, nonce
    CHALLENGE = 2   # server -> client: nonce (when a secret is configured)
    AUTH = 3        # client -> server: HMAC of both nonces
    ACCEPT = 4      # server -> client: handshake done
    BEGIN = 5       # a transfer starts: its payload lengths and priority
    DATA = 6        # bytes [offset, offset + length) of stream ``stream`` of a transfer
    ACK = 7         # receiver: bytes verified up to ``offset`` of ``stream``
    NACK = 8        # receiver: resend from ``offset`` of ``stream`` (bad checksum)
    END = 9         # sender: transfer complete
    CANCEL = 10     # either side: abandon the transfer
    ERROR = 11      # either side: typed error, JSON body {"code", "message"}
    PART = 12       # sender: part ``stream`` of a transfer exists, JSON body {"length"}


FLAG_UNCHECKED = 1  # DATA: body_checksum is not set; the payload carries end-to-end checksums
DEFINED_FLAGS = {6: FLAG_UNCHECKED}  # frame type -> flag bits version 1 defines (none elsewhere)

# ACK and NACK bodies: one or more entries (transfer_id, stream, length, offset), one per chunk.
ACK_ENTRY = struct.Struct("<QIIQ")


@dataclass(frozen=True)
class FrameHeader:
    type: FrameType
    transfer_id: int
    stream: int
    offset: int
    length: int
    body_checksum: int
    flags: int = 0

    def encode(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        HEADER.pack_into(buf, 0, MAGIC, VERSION, self.type, self.flags, self.transfer_id, self.stream, self.length,
                         self.offset, self.body_checksum, 0, 0)
        struct.pack_into("<I", buf, 44, checksum(buf[:44]) & 0xFFFFFFFF)
        return bytes(buf)


def make_frame(type: FrameType, transfer_id: int = 0, stream: int = 0, offset: int = 0, body=b"",
               flags: int = 0) -> tuple[bytes, memoryview]:
    """Header bytes for ``body`` (which is not copied) and the body as a memoryview."""
    view = memoryview(body).cast("B")
    header = FrameHeader(type, transfer_id, stream, offset, view.nbytes, checksum(view), flags)
    return header.encode(), view


def pack_acks(entries) -> bytes:
    """ACK/NACK body for ``(transfer_id, stream, length, offset)`` entries."""
    out = bytearray(ACK_ENTRY.size * len(entries))
    for i, entry in enumerate(entries):
        ACK_ENTRY.pack_into(out, i * ACK_ENTRY.size, *entry)
    return bytes(out)


def unpack_acks(body) -> list[tuple[int, int, int, int]]:
    """Entries of an ACK/NACK body; raises :class:`LengthError` for a ragged body."""
    view = memoryview(body).cast("B")
    if view.nbytes % ACK_ENTRY.size:
        raise LengthError(f"ack body of {view.nbytes} bytes is not a multiple of {ACK_ENTRY.size}")
    return [ACK_ENTRY.unpack_from(view, off) for off in range(0, view.nbytes, ACK_ENTRY.size)]


def parse_header(buf, max_data: int) -> FrameHeader:
    """Validate a 48-byte frame header; ``max_data`` bounds DATA bodies (control bodies: 64 KiB).

    Raises :class:`BadMagic`, :class:`UnsupportedVersion`, :class:`ChecksumMismatch` (header),
    :class:`LengthError` or :class:`WireFormatError` (unknown type, a non-zero reserved field or a
    flag bit version 1 does not define for that type: later versions may give them meaning).
    """
    view = memoryview(buf).cast("B")
    if view.nbytes != HEADER_SIZE:
        raise LengthError(f"frame header must be {HEADER_SIZE} bytes, got {view.nbytes}")
    magic, version, ftype, flags, tid, stream, length, offset, body_sum, reserved, head_sum = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BadMagic(f"bad frame magic {bytes(magic)!r}")
    if version != VERSION:
        raise UnsupportedVersion(f"frame version {version}; this build speaks {VERSION}")
    got = checksum(view[:44]) & 0xFFFFFFFF
    if got != head_sum:
        raise ChecksumMismatch("frame header", head_sum, got)
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise WireFormatError(f"unknown frame type {ftype}") from None
    if reserved:
        raise WireFormatError(f"frame header reserved field is {reserved:#x}, must be 0")
    if flags & ~DEFINED_FLAGS.get(ftype, 0):
        raise WireFormatError(f"{ftype.name} frame has undefined flag bits {flags:#x}")
    limit = max_data if ftype is FrameType.DATA else MAX_CONTROL_BODY
    if length > limit:
        raise LengthError(f"{ftype.name} body of {length} bytes exceeds {limit}")
    return FrameHeader(ftype, tid, stream, offset, length, body_sum, flags)


def check_body(header: FrameHeader, body) -> None:
    """Raise :class:`ChecksumMismatch` unless ``body`` is what ``header`` announced."""
    view = memoryview(body).cast("B")
    if view.nbytes != header.length:
        raise LengthError(f"frame body of {view.nbytes} bytes, header says {header.length}")
    got = checksum(view)
    if got != header.body_checksum:
        raise ChecksumMismatch(f"frame body (transfer {header.transfer_id}, stream {header.stream}, "
                               f"offset {header.offset})", header.body_checksum, got)
