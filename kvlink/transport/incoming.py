"""The receiver's view of one transfer: parts announced, chunks verified, per-part completion."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from kvlink.errors import KvlinkError, PartIndexError, TransferCancelled, TransferRejected, TransportError
from kvlink.transport.parts import (Allocator, PartScan, Scanner, arena_allocator,  # noqa: F401 (re-exported)
                                    default_allocator)


class _Part:
    __slots__ = ("length", "buf", "done", "chunks", "left", "completed", "unchecked", "verified_whole",
                 "scan", "scan_lock", "landed", "prefix")

    def __init__(self, length: int, buf: memoryview, nchunks: int):
        self.length, self.buf = length, buf  # buf is None once the transfer is released
        self.completed = False  # whole and verified: part() returns it at once
        self.done = bytearray(nchunks)  # 1 per written chunk (verified, unless unchecked)
        self.left = nchunks
        self.unchecked = False  # some chunk arrived without its checksum: verify the whole part
        self.verified_whole = False  # the receiver's part verifier passed it
        # Streaming verification (with a scanner): unchecked chunks whose bytes are in, the
        # length of their unbroken run from the start, and the scan over that run. The scan
        # lock is held by the one thread advancing it.
        self.scan: PartScan | None = None
        self.scan_lock = threading.Lock()
        self.landed = bytearray(0)
        self.prefix = 0


_NO_BYTES = memoryview(b"")

VERIFY_PART = 2  # write_done: the part is whole but unchecked; verify it, then accept_part/reset_part


class IncomingTransfer:
    """A transfer being received. Parts complete one by one: ``await part(i)`` as each lands.

    The buffers returned stay valid until :meth:`release`, which gives their bytes back to the
    receiver's budget and drops every reference this object holds to them (so they are freed by
    reference counting, not left to the garbage collector). Awaiting methods raise the transfer's
    typed error if it failed (:class:`~kvlink.errors.TransferCancelled`,
    :class:`~kvlink.errors.TransferTimeout`, :class:`~kvlink.errors.TransferRejected`), or
    :class:`~kvlink.errors.TransportError` once it was released.
    """

    def __init__(self, transfer_id: int, owner: tuple, parts: int, chunk: int, meta: dict,
                 release_bytes: Callable[[int], None]):
        loop = asyncio.get_running_loop()
        self.transfer_id = transfer_id
        self.owner = owner  # (key id, session id) of the peer that began it: only it may feed it
        self.num_parts = parts
        self.chunk = chunk
        self.meta = meta
        self.peer: tuple | None = None  # (host, port) of the connection that began it
        self.key_id: str | None = None  # the receiver's key id its peer proved (TransferServer secrets)
        self.peer_id = ""  # whom the receiver charges for it: "key:<key id>", else the peer's address
        self.allocator: Allocator | None = None  # this transfer's own, set by the receiver at BEGIN
        self.scanner: Scanner | None = None  # the receiver's streaming part verifier, set at BEGIN
        self.started = time.monotonic()
        self.finished: float | None = None
        self.last_progress = self.started
        self.bytes_received = 0
        self.reserved = 0  # part bytes
        self.overhead = 0  # bookkeeping bytes the receiver charged for it (given back with the parts)
        self._release_bytes = release_bytes
        self._parts: dict[int, _Part] = {}  # announced parts only: a BEGIN costs nothing per part
        self._waiting: dict[int, asyncio.Future] = {}  # part -> future, only while someone awaits it
        self._left = parts
        self._done = loop.create_future()
        self.error: KvlinkError | None = None
        # canceller(transfer): tell the peer; takes the transfer as an argument so that no closure
        # over it makes a reference cycle (a released transfer must be freed by refcount).
        self.canceller: Callable[["IncomingTransfer"], None] | None = None
        self._releases: list[Callable[[], None]] = []
        # Reader threads look targets up and write into part buffers while the event loop
        # announces, completes, fails and releases: this lock orders the two, and buffers are
        # handed back only once no chunk write into them is in progress.
        self._lock = threading.Lock()
        self._writes = 0
        self._release_pending = False
        self._freed = False

    # -- called by the receiver ------------------------------------------------------------
    def announce(self, index: int, length: int, allocator: Allocator) -> None:
        """Part ``index`` has ``length`` bytes (idempotent; a different length is rejected)."""
        if not 0 <= index < self.num_parts:
            raise TransferRejected(f"part {index} outside 0..{self.num_parts - 1}")
        if self._release_pending:
            raise TransferRejected(f"transfer {self.transfer_id:#x} was released")
        part = self._parts.get(index)
        if part is not None:
            if part.length != length:
                raise TransferRejected(f"part {index} re-announced with {length} bytes, was {part.length}")
            return
        buf, release = allocator(length)
        buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if len(buf) != length:
            raise TransferRejected(f"allocator returned {len(buf)} bytes for a {length}-byte part")
        if release is not None:
            self._releases.append(release)
        self.reserved += length
        nchunks = max(1, -(-length // self.chunk))
        part = self._parts[index] = _Part(length, buf, nchunks)
        self._new_scan(part)
        if length == 0:
            part.done[0], part.left = 1, 0
            self._complete_part(part, index)

    def _slots(self, part: _Part, offset: int, length: int) -> slice:
        end = offset + length
        if offset % self.chunk or length < 0 or end > part.length or (end % self.chunk and end != part.length) \
                or (length == 0 and part.length != 0):
            raise TransferRejected(f"run [{offset}, +{length}) is off the {self.chunk}-byte grid of a "
                                   f"{part.length}-byte part")
        return slice(offset // self.chunk, max(offset // self.chunk + 1, -(-end // self.chunk)))

    def announced(self, index: int) -> bool:
        return index in self._parts

    def target(self, index: int, offset: int, length: int) -> tuple[memoryview | None, bool]:
        """Where a run of grid chunks goes, and whether it was already verified (then: read and
        drop it). A returned view is reserved for this write: call :meth:`write_done` when its
        bytes are in, whether they verified or not. Safe to call from a reader thread.
        """
        with self._lock:
            part = self._parts.get(index)
            if part is None:
                raise TransferRejected(f"data for part {index} before it was announced")
            slots = self._slots(part, offset, length)
            if self.error is not None or self._release_pending:
                return None, False
            states = part.done[slots]
            if states.count(1) == len(states):
                return None, True
            if 2 in states:
                return None, False  # the same run is being written right now (a resend): drop this copy
            part.done[slots] = bytes(2 if v == 0 else v for v in states)
            self._writes += 1
            return part.buf[offset: offset + length], False

    def write_done(self, index: int, offset: int, length: int, ok: bool, unchecked: bool = False,
                   verify_parts: bool = False) -> bool | int:
        """A reserved run's write finished; ``ok``: it verified (``unchecked``: it carried no
        checksum). True when this completed the transfer; :data:`VERIFY_PART` when it completed
        a part some of whose chunks were unchecked and a part verifier is to judge it."""
        with self._lock:
            self._writes -= 1
            part = self._parts[index]
            slots = self._slots(part, offset, length)
            release_now = self._release_pending and self._writes == 0
            states = part.done[slots]
            if not ok or self.error is not None or self._release_pending:
                part.done[slots] = bytes(0 if v == 2 else v for v in states)
                fresh = 0
            else:
                fresh = states.count(2)
                # Only this write's own slots (2) become done: a slot reset to 0 meanwhile (the
                # part failed verification and is being resent) must take the resend, not drop it.
                part.done[slots] = bytes(1 if v == 2 else v for v in states)
                part.left -= fresh
                part.unchecked |= unchecked and fresh > 0
        if release_now:
            self._free()
        if not fresh:
            return False
        self.bytes_received += length
        self.last_progress = time.monotonic()
        if part.left == 0:
            if part.unchecked and verify_parts:
                return VERIFY_PART
            self._complete_part(part, index)
        return self.complete

    # -- streaming verification (parts of unchecked chunks, with a scanner) -------------------
    def _new_scan(self, part: _Part) -> None:
        if self.scanner is not None and part.buf is not None:
            part.scan = self.scanner(part.buf)
            part.landed = bytearray(len(part.done))
            part.prefix = 0

    def landed(self, index: int, offset: int, length: int) -> None:
        """An unchecked run's bytes are in (reader thread, before its :meth:`write_done`): advance
        the part's scan over its unbroken landed start, now, while the newest bytes are in cache.
        If another thread is advancing it, that one usually goes on past these bytes; whatever
        no reader got to is hashed by :meth:`scan_verdict` once the part is whole."""
        part = self._parts.get(index)
        if part is None or part.scan is None:
            return
        with self._lock:
            if self.error is not None or self._release_pending:
                return
            slots = self._slots(part, offset, length)
            part.landed[slots] = b"\x01" * (slots.stop - slots.start)
            n = len(part.landed)
            while part.prefix < n and part.landed[part.prefix]:
                part.prefix += 1
        self._advance_scan(part, wait=False)

    def claim_scan(self, index: int, offset: int) -> PartScan | None:
        """The scan of part ``index`` for a reader about to land the run at ``offset``, when the
        scan has reached exactly there and can hash while landing (:class:`PartScan`'s optional
        ``hot_span``): the reader then holds it, hashing the run's bytes in cache as they arrive,
        until :meth:`release_scan`. None when another thread holds it, or the run is not next."""
        part = self._parts.get(index)
        scan = part.scan if part is not None else None
        if scan is None or not hasattr(scan, "hot_span") or not part.scan_lock.acquire(blocking=False):
            return None
        if part.scan is scan and scan.scanned == offset and self.error is None and not self._release_pending:
            return scan
        part.scan_lock.release()
        return None

    def restart_scan(self, index: int) -> None:
        """The reader holding part ``index``'s scan was cut inside its run after hashing some of
        it: the resend will overwrite those bytes, so the scan starts over from the part's start
        (over the runs landed so far, then the rest as it lands). Call before :meth:`release_scan`."""
        part = self._parts[index]
        with self._lock:
            # Which runs have landed stays true (the cut run never reported landing): only the
            # hashing starts over.
            if part.scan is not None and part.buf is not None and self.scanner is not None:
                part.scan = self.scanner(part.buf)

    def release_scan(self, index: int) -> None:
        """Give back a scan :meth:`claim_scan` returned (then mark the run :meth:`landed`)."""
        self._parts[index].scan_lock.release()

    def _advance_scan(self, part: _Part, wait: bool, to_end: bool = False) -> None:
        if not part.scan_lock.acquire(blocking=wait):
            return
        try:
            while True:
                with self._lock:
                    if self.error is not None or self._release_pending:
                        return
                    end = part.length if to_end else min(part.length, part.prefix * self.chunk)
                    scan = part.scan
                if scan is None or end <= scan.scanned:
                    return
                before = scan.scanned
                scan.advance(end)
                if scan.scanned <= before:  # it found the part bad and stopped: looping on
                    return  # would spin for ever, holding scan_lock, and the part go unjudged
        finally:
            part.scan_lock.release()

    def scan_verdict(self, index: int, wait: bool) -> bool | None:
        """The scan's verdict on part ``index`` once all of it is in; None when there is no scan,
        or (``wait`` False) when finishing it would mean hashing or waiting for another thread.
        With ``wait``, hashes what is left (run it off the event loop)."""
        part = self._parts.get(index)
        scan = part.scan if part is not None else None
        if scan is None:
            return None
        if wait:
            self._advance_scan(part, wait=True, to_end=True)
        elif part.scan_lock.locked() or scan.scanned < part.length:
            return None
        # A scan that stopped short of the end (it found the part bad) vouches for nothing.
        return scan.verdict() and scan.scanned >= part.length

    def verified_whole(self, index: int) -> bool:
        """Whether part ``index`` was judged whole by the receiver's part verifier (for kvlink
        payloads: against their own checksums, so unpacking need not hash them again)."""
        part = self._parts.get(index)
        return part is not None and part.verified_whole

    def part_view(self, index: int) -> memoryview:
        """The buffer of an announced part, whole or not (for the part verifier); empty once
        the transfer is released."""
        part = self._parts[index]
        return part.buf if part.buf is not None else _NO_BYTES

    def accept_part(self, index: int) -> bool:
        """The part verifier passed part ``index``; True when this completed the transfer."""
        part = self._parts[index]
        if self.error is not None or self._freed or part.left or part.completed:
            return False
        part.unchecked = False
        part.verified_whole = True
        self._complete_part(part, index)
        return self.complete

    def reset_part(self, index: int) -> int:
        """The part verifier failed part ``index``: forget its bytes (they will be resent);
        returns its length."""
        part = self._parts[index]
        with part.scan_lock, self._lock:
            part.done[:] = bytes(len(part.done))
            part.left = len(part.done)
            part.unchecked = False
            self._new_scan(part)
        self.bytes_received -= part.length
        return part.length

    def _complete_part(self, part: _Part, index: int) -> None:
        if part.completed:
            return
        part.completed = True
        self._left -= 1
        future = self._waiting.pop(index, None)
        if future is not None and not future.done():
            future.set_result(part.buf)
        if self._left == 0 and not self._done.done():
            self.finished = time.monotonic()
            self._done.set_result(None)  # no buffers in the future: release() must drop them all

    def fail(self, error: KvlinkError) -> None:
        if self.error is not None or self._done.done():
            return
        with self._lock:
            self.error = error
        waiting, self._waiting = self._waiting, {}
        for future in [*waiting.values(), self._done]:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here, so an unawaited failure logs nothing
        self.release()

    # -- application API ---------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._done.done() and self.error is None

    @property
    def total_bytes(self) -> int | None:
        """Sum of the part lengths once every part is announced."""
        if len(self._parts) < self.num_parts:
            return None
        return sum(p.length for p in self._parts.values())

    async def part(self, index: int) -> memoryview:
        """Wait for part ``index`` to arrive whole and verified; returns its bytes. Raises
        :class:`~kvlink.errors.PartIndexError` (a ``TransferRejected`` and an ``IndexError``)
        for an index outside the transfer, the transfer's typed error if it failed, and
        :class:`~kvlink.errors.TransportError` once it was released."""
        if not 0 <= index < self.num_parts:
            raise PartIndexError(f"part {index} outside 0..{self.num_parts - 1}")
        self._check_usable()
        part = self._parts.get(index)
        if part is not None and part.completed:
            return part.buf
        future = self._waiting.get(index)
        if future is None:
            future = self._waiting[index] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(future)

    def buffers(self) -> list[memoryview]:
        """The parts of a completed transfer in part order. Raises its error if it failed,
        :class:`~kvlink.errors.TransportError` if it is not complete yet (await :meth:`done`
        first) or was released."""
        self._check_usable()
        if not self._done.done():
            raise TransportError(f"transfer {self.transfer_id:#x} is not complete yet")
        self._done.result()
        return [self._parts[i].buf for i in range(self.num_parts)]

    async def done(self) -> list[memoryview]:
        """Wait for every part; returns their buffers in part order (errors as :meth:`part`)."""
        self._check_usable()
        await asyncio.shield(self._done)
        return self.buffers()

    def _check_usable(self) -> None:
        if self.error is not None:
            raise self.error
        if self._freed or self._release_pending:
            raise TransportError(f"transfer {self.transfer_id:#x} was released")

    def cancel(self) -> None:
        """Abandon the transfer here and tell the sender (its ``done()`` raises TransferCancelled)."""
        if self.canceller is not None and not self._done.done():
            self.canceller(self)
        self.fail(TransferCancelled(f"transfer {self.transfer_id:#x} cancelled by the receiver"))

    def release(self) -> None:
        """Hand the part buffers' bytes back to the receiver budget and drop them; buffers must
        not be used after. Releasing an unfinished transfer cancels it (nobody will read it)."""
        if self.error is None and not self._done.done():
            self.cancel()  # fails it, which releases it
            return
        with self._lock:
            self._release_pending = True
            if self._writes:
                return  # the last write in progress frees the buffers
        self._free()

    def _free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = self._release_pending = True
            reserved, self.reserved, self.overhead = self.reserved + self.overhead, 0, 0
            releases, self._releases = self._releases, []
            for part in self._parts.values():
                part.buf = part.scan = None  # no reference to a received byte survives release
        self.canceller = None
        if reserved:
            self._release_bytes(reserved)
        for release in releases:
            release()
