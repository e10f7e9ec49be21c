"""A payload: a header plus one buffer per segment, sendable as a list of buffers (no join)."""

from __future__ import annotations

from kvlink.codec.checksum import checksums
from kvlink.errors import ChecksumMismatch, LengthError
from kvlink.serde.staging import StagingLease
from kvlink.serde.wire import PayloadHeader, parse_header


class Payload:
    """Header plus segment buffers (views into a staging lease, or into a received buffer)."""

    def __init__(self, header: PayloadHeader, datas: list, lease: StagingLease | None = None):
        if len(datas) != len(header.segments):
            raise LengthError(f"{len(datas)} buffers for {len(header.segments)} segments")
        self.header = header
        self.datas = [memoryview(d).cast("B") for d in datas]
        self._lease = lease
        self._header_bytes: bytes | None = None

    @property
    def segments(self):
        return self.header.segments

    def header_bytes(self) -> bytes:
        if self._header_bytes is None:
            self._header_bytes = self.header.encode()
        return self._header_bytes

    def buffers(self) -> list[memoryview]:
        """Header then segment bytes, in wire order: hand these to ``sendmsg``/``writelines`` as is."""
        return [memoryview(self.header_bytes()), *self.datas]

    @property
    def nbytes(self) -> int:
        return self.header.header_len + self.header.body_len

    def tobytes(self) -> bytes:
        """The whole payload as one ``bytes`` (copies: for tests and small payloads)."""
        return b"".join(self.buffers())

    def verify(self) -> None:
        """Check every segment's checksum; raises :class:`~kvlink.errors.ChecksumMismatch` naming it."""
        for seg, data in zip(self.header.segments, self.datas):
            if data.nbytes != seg.length:
                raise LengthError(f"{seg.name}: {data.nbytes} bytes, expected {seg.length}")
        for seg, got in zip(self.header.segments, checksums(self.datas)):
            if got != seg.checksum:
                raise ChecksumMismatch(seg.name, seg.checksum, got)

    def release(self) -> None:
        """Give the staging space back; the segment buffers must not be used afterwards."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    @classmethod
    def from_buffer(cls, buf) -> "Payload":
        """Parse a received payload; segment buffers view ``buf`` (no copy). Checksums are checked by
        :meth:`verify` (the unpacker calls it before writing)."""
        view = memoryview(buf).cast("B")
        header = parse_header(view)
        if len(view) != header.header_len + header.body_len:
            raise LengthError(f"payload of {len(view)} bytes, header says {header.header_len + header.body_len}")
        base = header.header_len
        return cls(header, [view[base + s.offset : base + s.offset + s.length] for s in header.segments])


def payload_intact(buf) -> bool:
    """Whether ``buf`` is a well-formed payload whose every segment matches its checksum: the
    receiver's part verifier for transfers of kvlink payloads (one hash pass, no chunk hashes)."""
    from kvlink.errors import WireFormatError

    try:
        Payload.from_buffer(buf).verify()
    except WireFormatError:
        return False
    return True


def is_payload(data) -> bool:
    """Whether ``data`` (a buffer, or a list of buffers meant back to back, e.g.
    :meth:`Payload.buffers`) holds one whole kvlink payload by its header: magic, version, header
    checksum and total length. Cheap (segment bytes are not hashed): a sender's test of whether a
    receiver's part verifier can judge it."""
    from kvlink.errors import WireFormatError

    buffers = data if isinstance(data, (list, tuple)) else [data]
    try:
        views = [memoryview(b).cast("B") for b in buffers]
        first = next((v for v in views if v.nbytes), None)
        if first is None:
            return False
        header = parse_header(first)
    except (TypeError, ValueError, WireFormatError):
        return False
    return sum(v.nbytes for v in views) == header.header_len + header.body_len
