"""A payload: a header plus one buffer per segment, sendable as a list of buffers (no join)."""

from __future__ import annotations

from kvlink.codec.checksum import checksum, checksums, native_checksum_stream
from kvlink.errors import ChecksumMismatch, LengthError, WireFormatError
from kvlink.serde.staging import StagingLease
from kvlink.serde.wire import PREFIX, PayloadHeader, parse_header, peek_lengths


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

    def verify(self, names: list[str] | None = None) -> None:
        """Check every segment's checksum; raises :class:`~kvlink.errors.ChecksumMismatch` naming it
        (by ``names[i]`` when given: the unpacker passes the spec's component names)."""
        for seg, data in zip(self.header.segments, self.datas):
            if data.nbytes != seg.length:
                raise LengthError(f"{seg.name}: {data.nbytes} bytes, expected {seg.length}")
        for i, (seg, got) in enumerate(zip(self.header.segments, checksums(self.datas))):
            if got != seg.checksum:
                raise ChecksumMismatch(names[i] if names else seg.name, seg.checksum, got)

    def verify_segment(self, i: int, name: str | None = None) -> None:
        """:meth:`verify` for segment ``i`` alone."""
        seg, data = self.header.segments[i], self.datas[i]
        if data.nbytes != seg.length:
            raise LengthError(f"{seg.name}: {data.nbytes} bytes, expected {seg.length}")
        got = checksum(data)
        if got != seg.checksum:
            raise ChecksumMismatch(name or seg.name, seg.checksum, got)

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
    try:
        Payload.from_buffer(buf).verify()
    except WireFormatError:
        return False
    return True


class PayloadScan:
    """:func:`payload_intact`, judged while the bytes of ``buf`` arrive in order.

    ``advance(end)`` says that ``buf[:end]`` is final and hashes what is new in it; once ``end``
    has reached the end, :meth:`verdict` is what ``payload_intact(buf)`` would return. Each byte
    is hashed once, by whoever advances past it, so a receiver hashes bytes soon after they land
    (often still in cache) and has nothing left to hash when the last ones do. Not thread-safe:
    one caller at a time advances a scan.
    """

    def __init__(self, buf):
        self.buf = memoryview(buf).cast("B")
        self.failed = False
        self._end = 0  # bytes known final
        self._pos = 0  # bytes hashed (or parsed, for the header)
        self._segments: list[tuple[int, int]] | None = None  # (end in buf, checksum)
        self._next = 0
        self._hash = native_checksum_stream()

    def advance(self, end: int) -> None:
        """``buf[:end]`` is final: parse the header once it is whole, hash new segment bytes."""
        end = min(end, len(self.buf))
        if self.failed or end <= self._end:
            return
        self._end = end
        try:
            if self._segments is None and not self._parse():
                return
        except WireFormatError:
            self.failed = True
            return
        self._hash_to(end)

    def _hash_to(self, end: int) -> None:
        """Hash the segment bytes from where hashing stopped up to ``end``, checking each
        segment (empty ones too) whose last byte that reaches."""
        segments, buf = self._segments, self.buf
        while self._next < len(segments):
            stop, expect = segments[self._next]
            upto = min(stop, end)
            if upto > self._pos:
                self._hash.update(buf[self._pos:upto])
                self._pos = upto
            if self._pos < stop:
                return
            if self._hash.intdigest() != expect:
                self.failed = True
                return
            self._hash.reset()
            self._next += 1

    # -- landing: the caller hashes the bytes as it receives them ---------------------------------
    def hot_span(self, pos: int) -> tuple[int, int]:
        """For a caller about to land ``buf[pos:]`` with ``pos`` == :attr:`scanned`: ``(stop,
        state)``. It may land ``buf[pos:stop]`` (at least one byte) hashing them into the native
        running hash at address ``state`` as they arrive (0: land them unhashed), then must
        call :meth:`took` before landing more. Spans never cross a segment's end, so each
        segment's digest is checked as its last byte lands. Raises ValueError when ``pos`` is
        not where the scan is (a caller's bug)."""
        size = len(self.buf)
        if self.failed:  # nothing to judge any more (it stopped where it found the fault)
            return size, 0
        if pos != self._end or pos >= size:
            raise ValueError(f"hot_span({pos}) on a scan at {self._end} of {size}")
        if self._segments is None:  # the header: landed unhashed, then parsed by took()
            if pos < PREFIX.size:
                return min(PREFIX.size, size), 0
            try:
                header_len, _ = peek_lengths(self.buf[:PREFIX.size])
            except WireFormatError:
                self.failed = True
                return size, 0
            return (min(header_len, size), 0) if header_len > pos else (size, 0)
        if self._next < len(self._segments) and self._pos == pos:
            stop = min(self._segments[self._next][0], size)
            if stop > pos:
                return stop, getattr(self._hash, "address", 0)
        return size, 0  # unhashed: took() advances over it the ordinary way

    def took(self, end: int, hashed: bool) -> None:
        """The caller landed ``buf[scanned:end]`` within the span :meth:`hot_span` gave, hashing
        them into its state when ``hashed``. Raises ValueError for an ``end`` outside that span."""
        if not hashed or self.failed:
            self.advance(end)
            return
        stop = self._segments[self._next][0]
        if not self._pos == self._end < end <= stop:
            raise ValueError(f"took({end}) outside the span [{self._pos}, {stop}]")
        self._pos = self._end = end
        self._hash_to(end)  # nothing left to hash: checks the segment if this ended it (and empty ones after)

    def _parse(self) -> bool:
        if self._end < PREFIX.size:
            return False
        header_len, body_len = peek_lengths(self.buf[:PREFIX.size])
        if header_len + body_len != len(self.buf):
            raise LengthError(f"payload of {len(self.buf)} bytes, header says {header_len + body_len}")
        if self._end < header_len:
            return False
        header = parse_header(self.buf[:header_len])
        self._segments = [(header_len + s.offset + s.length, s.checksum) for s in header.segments]
        self._pos = header_len
        return True

    @property
    def scanned(self) -> int:
        """How far the caller has advanced the scan (bytes)."""
        return self._end

    def verdict(self) -> bool:
        """True when the whole buffer was advanced over and it is an intact payload."""
        return not self.failed and self._segments is not None and self._next == len(self._segments)


def is_payload(data) -> bool:
    """Whether ``data`` (a buffer, or a list of buffers meant back to back, e.g.
    :meth:`Payload.buffers`) holds one whole kvlink payload by its header: magic, version, header
    checksum and total length. Cheap (segment bytes are not hashed): a sender's test of whether a
    receiver's part verifier can judge it."""
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
