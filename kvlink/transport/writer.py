"""A connection's writer thread: hashes chunks and ``sendmsg``s frames off the event loop.

Python's event loop writes every connection from one thread; at multi-GB/s the kernel copy and
the xxh3 of each chunk then queue up on one core. Each connection gets its own thread instead,
so both run in parallel across connections (both release the GIL). The thread writes through
its own descriptor of the same socket (a ``dup``), waiting with ``poll`` when the socket is full;
the event loop keeps reading (acknowledgements) from the original. Frames leave in the order
they were queued, so announcements (BEGIN, PART) always precede their data.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
from typing import Callable

from kvlink.codec.checksum import checksum_pieces
from kvlink.transport.connection import shutdown_quietly
from kvlink.transport.frame import FLAG_UNCHECKED, FrameHeader, FrameType

_STOP = object()


class ThreadWriter:
    """Owns the write side of one connected socket. ``on_error(exc)`` runs in the writer thread."""

    def __init__(self, sock: socket.socket, on_error: Callable[[BaseException], None], timeout: float,
                 on_sent: Callable[[], None] | None = None):
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        # The descriptor is non-blocking (shared with the event loop). Send first and wait with
        # poll only when the kernel's buffer is full: a socket timeout would poll before every
        # call, a syscall and a GIL round trip more per send.
        self.sock.setblocking(False)
        self.timeout = timeout
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLOUT)
        self.on_error = on_error
        self.on_sent = on_sent
        # Bytes and frames of DATA queued here and not yet handed to the kernel: each counter is
        # written by one thread only, so no lock is needed.
        self._queued = 0
        self._sent = 0
        self._frames_queued = 0
        self._frames_sent = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvlink-writer", daemon=True)
        self._thread.start()

    def frame(self, head: bytes, body: memoryview | bytes = b"") -> None:
        """Queue a prepared control frame."""
        self._queue.put((head, [memoryview(body)] if len(body) else []))

    def data(self, transfer_id: int, part: int, offset: int, pieces: list[memoryview], checked: bool) -> None:
        """Queue a DATA chunk; its checksum is computed in the writer thread."""
        self._queued += sum(p.nbytes for p in pieces)
        self._frames_queued += 1
        self._queue.put((transfer_id, part, offset, pieces, checked))

    @property
    def frames(self) -> int:
        """DATA frames queued here and not yet wholly written to the socket."""
        return self._frames_queued - self._frames_sent

    @property
    def backlog(self) -> int:
        """DATA bytes queued and not yet written to the socket."""
        return self._queued - self._sent

    def close(self) -> None:
        """Stop the thread; the socket is shut down so a blocked send returns at once."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        shutdown_quietly(self.sock)

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the thread to end (after :meth:`close`), so none outlives its client."""
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP or self._closed:
                    break
                if len(item) == 2:
                    head, pieces = item
                else:
                    tid, part, offset, pieces, checked = item
                    length = sum(p.nbytes for p in pieces)
                    digest = checksum_pieces(pieces) if checked else 0
                    head = FrameHeader(FrameType.DATA, tid, part, offset, length, digest,
                                       0 if checked else FLAG_UNCHECKED).encode()
                self._send([memoryview(head), *pieces])
                if len(item) != 2:
                    self._sent += length
                    self._frames_sent += 1
                    if self.on_sent is not None:
                        self.on_sent()
                item = pieces = None  # keep no sent buffer alive while waiting for the next frame
        except (OSError, ValueError) as exc:
            if not self._closed:
                self.on_error(exc)
        finally:
            self.sock.close()

    def _send(self, buffers: list[memoryview]) -> None:
        while buffers:
            try:
                sent = self.sock.sendmsg(buffers[:64])
            except BlockingIOError:
                if not self._poll.poll(self.timeout * 1000):
                    raise TimeoutError("send made no progress within the timeout") from None
                continue
            while sent:
                first = buffers[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    buffers.pop(0)
                else:
                    buffers[0] = first[sent:]
                    sent = 0
            while buffers and not buffers[0].nbytes:
                buffers.pop(0)
