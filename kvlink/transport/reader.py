"""A receiving connection's reader thread: land each frame in place, verifying it as it lands.

One event loop thread cannot copy several connections' worth of bytes out of the kernel as fast
as the link delivers them (a single-threaded reader reaches ~0.6x of four reading threads on
loopback). After the handshake each plain-TCP connection therefore gets a thread that reads its
frames into the destination the handler chose. Bytes to verify are landed through a small bounce
buffer (:class:`~kvlink.ops.landing.Lander`) and hashed there, in cache, as they arrive: into the
frame's own xxh3 when it carries one, else into its part's running scan when the frame is next in
that scan (a part's frames come in order on one connection: see ``OutgoingTransfer.take``).
Other frames are read with ``recv_into`` and scanned later. All of it releases the GIL. The
thread looks each chunk's target up itself
(the transfer's lock orders it against the loop, and buffers are freed only once no write into
them is in progress); control frames and verdicts go to the event loop, which makes every write
(ACK, END, ERROR) on the loop's transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import socket
import threading

from kvlink.codec.checksum import checksum
from kvlink.errors import KvlinkError, TransportError
from kvlink.ops.landing import Lander, Xxh3State
from kvlink.ops.runs import native_available
from kvlink.transport.connection import shutdown_quietly
from kvlink.transport.frame import FLAG_UNCHECKED, HEADER_SIZE, FrameType, parse_header

_SCRATCH = 1 << 20
# The most bytes a reader asks the kernel to gather before waking it (``SO_RCVLOWAT``). Without
# it, every segment that lands wakes the thread for a small copy; on loopback the wake-ups cost
# the receiver ~0.03-0.05 CPU-s per GiB (a sixth of its time) and the link ~10% of goodput.
RCVLOWAT = 1 << 20


class _Closed(Exception):
    pass


class ThreadReader:
    """Reads the frames of ``conn`` (a paused :class:`FrameConnection`) in a thread."""

    def __init__(self, conn, loop: asyncio.AbstractEventLoop):
        self.conn = conn
        self.handler = conn.handler
        self.loop = loop
        self.sock = socket.socket(fileno=os.dup(conn.sock.fileno()))
        # Non-blocking like the descriptor it shares with the loop: read first, poll only when
        # nothing is there (a socket timeout would poll before every read).
        self.sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN)
        self._lowat = 1  # the kernel's default
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvlink-reader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            shutdown_quietly(self.sock)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    # -- thread side ------------------------------------------------------------------------------
    def _call(self, fn, *args):
        """Run ``fn(*args)`` on the event loop and wait for its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed back to the reader thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result()

    def _wake_at(self, nbytes: int) -> None:
        """Have ``poll`` wake this thread only once ``nbytes`` are readable. Never more than the
        frame still owes: the peer may send nothing after it, and a wait for more would hang."""
        nbytes = max(1, min(nbytes, RCVLOWAT))
        if nbytes != self._lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
            except OSError:
                return  # a socket being shut down: the next read reports it
            self._lowat = nbytes

    def _fill(self, view: memoryview, read) -> None:
        """Fill ``view`` with ``read(rest) -> bytes read`` (raising :class:`BlockingIOError` when
        nothing is there: then wait in ``poll``, woken by data or by close() shutting the socket)."""
        got, size = 0, len(view)
        while got < size:
            try:
                n = read(view[got:])
            except BlockingIOError:
                # Set only before a wait: most reads find their bytes already there (a frame's
                # header behind its body, the rest of a body), and each change is a syscall.
                self._wake_at(size - got)
                self._poll.poll()
                continue
            if n == 0:
                raise _Closed()
            got += n

    def _recv_exact(self, view: memoryview) -> None:
        self._fill(view, self.sock.recv_into)

    def _land(self, view: memoryview, lander, state: int = 0) -> None:
        """Fill ``view`` through ``lander``, hashing into the native state at ``state`` (0: none)."""
        fd = self.sock.fileno()
        self._fill(view, lambda rest: lander.recv(fd, rest, state))

    def _land_scanned(self, target: memoryview, scan, offset: int, lander) -> int:
        """Fill ``target`` (the run at ``offset`` of a part whose scan this thread holds), each
        span the scan gives hashed into its running hash as it lands; returns the bytes hashed."""
        got = hashed = 0
        while got < len(target):
            stop, state = scan.hot_span(offset + got)
            span = target[got: min(len(target), stop - offset)]
            self._land(span, lander, state)
            got += len(span)
            hashed += len(span) if state else 0
            scan.took(offset + got, bool(state))
        return hashed

    def _read_body(self, transfer, header, target: memoryview, lander, frame_hash) -> tuple[bool, int | None]:
        """Land a DATA body in ``target``; returns its checksum verdict and how many of its bytes
        this thread hashed into its part's scan as they landed (None: it did not hold the scan)."""
        unchecked = bool(header.flags & FLAG_UNCHECKED)
        if lander is None:
            self._recv_exact(target)
            return unchecked or checksum(target) == header.body_checksum, None
        if not unchecked:  # the frame's own checksum, taken in cache as the bytes land
            frame_hash.reset()
            self._land(target, lander, frame_hash.address)
            return frame_hash.intdigest() == header.body_checksum, None
        scan = transfer.claim_scan(header.stream, header.offset)
        if scan is None:  # not next in its part's scan: whoever reaches it hashes it later
            self._recv_exact(target)
            return True, None
        try:
            return True, self._land_scanned(target, scan, header.offset, lander)
        except BaseException:
            # Cut inside the run: its resend will overwrite bytes the scan has hashed.
            transfer.restart_scan(header.stream)
            raise
        finally:
            transfer.release_scan(header.stream)

    def _deliver(self, box: list) -> None:
        """On the loop: hand a landed frame to the handler, taking it out of the reader's box."""
        self.handler.on_data(*box.pop())

    def _run(self) -> None:
        head = bytearray(HEADER_SIZE)
        scratch = None
        error: BaseException | None = None
        reserved = None  # (transfer, header) while a DATA body is being read into its target
        lander = frame_hash = None
        try:
            if native_available():  # built off the loop: the first build takes seconds
                lander, frame_hash = Lander(), Xxh3State()
            while not self._closed:
                self._recv_exact(memoryview(head))
                header = parse_header(head, self.conn.max_data)
                if header.type is not FrameType.DATA:
                    body = bytearray(header.length)
                    self._recv_exact(memoryview(body))
                    self._call(self.handler.on_control, self.conn, header, bytes(body))
                    continue
                transfer, target = self.handler.lookup(header, self.loop.call_soon_threadsafe)
                if target is None:
                    scratch = scratch or memoryview(bytearray(_SCRATCH))
                    left = header.length
                    while left:
                        step = min(left, _SCRATCH)
                        self._recv_exact(scratch[:step])
                        left -= step
                    continue
                reserved = (transfer, header)
                ok, hashed = self._read_body(transfer, header, target, lander, frame_hash)
                reserved = None
                unchecked = bool(header.flags & FLAG_UNCHECKED)
                whole = None
                if hashed is None and unchecked and header.offset == 0 \
                        and len(target) == transfer.part_view(header.stream).nbytes:
                    # A frame that is a whole unchecked part is judged here, while its bytes are
                    # still warm and without a hop to an executor thread.
                    whole = self.handler.judge_part(target)
                elif unchecked:
                    # Scan on while warm (after a hashed landing: over runs that landed meanwhile).
                    transfer.landed(header.stream, header.offset, header.length)
                # Hold nothing once the loop has the frame: a released transfer and its part
                # buffer must be freed at once, not when this thread next gets the GIL (it may
                # not run again before the claimer releases the transfer) or the connection next
                # carries data. The references travel in a box the callback empties.
                box = [(self.conn, header, target, ok, transfer, whole, hashed or 0)]
                transfer = target = None
                self.loop.call_soon_threadsafe(self._deliver, box)
                box = None
        except (_Closed, OSError, RuntimeError):
            pass  # peer gone, shut down by close(), or the loop has stopped
        except KvlinkError as exc:
            error = exc  # the byte stream can no longer be trusted
        except Exception as exc:  # a bug here must still end the connection with a typed error
            error = TransportError(f"reader thread failed: {exc!r}")
        finally:
            self.sock.close()
            if reserved is not None:  # cut inside a body: its run must be free for the resend
                try:
                    self.loop.call_soon_threadsafe(self.handler.abandon, *reserved)
                except RuntimeError:
                    pass
            if not self._closed:
                try:
                    self.loop.call_soon_threadsafe(self.conn.abort, error)
                except RuntimeError:
                    pass
