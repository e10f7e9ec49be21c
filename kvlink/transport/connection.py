"""One TCP connection speaking kvlink frames, as an asyncio ``BufferedProtocol``.

The protocol hands the event loop the exact buffer the next bytes belong in: the 48-byte header
buffer, a small control-body buffer, or, for DATA, a view into the destination that the handler
chose after validating the header. So chunk bytes go from the kernel straight into place
(``recv_into``), and a connection never reads past the frame it is on.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

from kvlink.errors import KvlinkError, WireFormatError
from kvlink.transport.frame import HEADER_SIZE, FrameHeader, FrameType, make_frame, parse_header

_HEADER, _CONTROL, _DATA, _DISCARD = range(4)
_SCRATCH = 256 << 10
_JOIN_BELOW = 64 << 10  # control frame bodies up to this size are joined to their header


class FrameHandler(Protocol):
    """What a :class:`FrameConnection` reports to. Methods run on the event loop and must not block."""

    def on_open(self, conn: "FrameConnection") -> None: ...

    def on_control(self, conn: "FrameConnection", header: FrameHeader, body: bytes) -> None: ...

    def data_target(self, conn: "FrameConnection", header: FrameHeader) -> memoryview | None:
        """Where a DATA body goes (exactly ``header.length`` bytes), or None to read and drop it."""

    def on_data(self, conn: "FrameConnection", header: FrameHeader, target: memoryview | None) -> None:
        """The DATA body is in ``target`` (unchecked: the handler verifies ``header.body_checksum``)."""

    def on_closed(self, conn: "FrameConnection", exc: BaseException | None) -> None: ...


class FrameConnection(asyncio.BufferedProtocol):
    """Frame reader and writer over one transport. ``max_data`` bounds DATA bodies."""

    def __init__(self, handler: FrameHandler, max_data: int, high_water: int = 4 << 20):
        self.handler = handler
        self.max_data = max_data
        self.high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self._hbuf = bytearray(HEADER_SIZE)
        self._state = _HEADER
        self._view = memoryview(self._hbuf)
        self._got = 0
        self._header: FrameHeader | None = None
        self._scratch: bytearray | None = None
        self._discard_left = 0

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        if self.sock is not None and self.sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.high_water)
        self.handler.on_open(self)

    def connection_lost(self, exc) -> None:
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)
        self.handler.on_closed(self, exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()
        on_writable = getattr(self.handler, "on_writable", None)
        if on_writable is not None:
            on_writable(self)

    @property
    def can_write(self) -> bool:
        return self._writable.is_set() and self.is_open

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == _DISCARD:
            if self._scratch is None:
                self._scratch = bytearray(_SCRATCH)
            return memoryview(self._scratch)[: min(self._discard_left, _SCRATCH)]
        return self._view[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._advance(nbytes)
        except KvlinkError as exc:
            # The byte stream can no longer be trusted; other connections carry on and the
            # sender resumes what this one had in flight.
            self.abort(exc)

    def eof_received(self):
        return False

    # -- frame state machine ----------------------------------------------------------------
    def _advance(self, nbytes: int) -> None:
        if self._state == _DISCARD:
            self._discard_left -= nbytes
            if self._discard_left == 0:
                header, self._header = self._header, None
                self._expect_header()
                self.handler.on_data(self, header, None)
            return
        self._got += nbytes
        if self._got < len(self._view):
            return
        if self._state == _HEADER:
            header = parse_header(self._hbuf, self.max_data)
            self._header = header
            if header.type is FrameType.DATA:
                target = self.handler.data_target(self, header)
                if self.transport is None or self.transport.is_closing():
                    return
                if header.length == 0:
                    self._expect_header()
                    self.handler.on_data(self, header, target)
                elif target is None:
                    self._state, self._discard_left = _DISCARD, header.length
                else:
                    if len(target) != header.length:
                        raise WireFormatError("data target does not match the frame length")
                    self._state, self._view, self._got = _DATA, target, 0
                return
            if header.length == 0:
                self._expect_header()
                self.handler.on_control(self, header, b"")
                return
            self._state, self._view, self._got = _CONTROL, memoryview(bytearray(header.length)), 0
            return
        header, body = self._header, self._view
        self._expect_header()
        if header.type is FrameType.DATA:
            self.handler.on_data(self, header, body)
        else:
            self.handler.on_control(self, header, bytes(body))

    def _expect_header(self) -> None:
        self._state, self._view, self._got, self._header = _HEADER, memoryview(self._hbuf), 0, None

    # -- writing ------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, ftype: FrameType, transfer_id: int = 0, stream: int = 0, offset: int = 0, body=b"") -> None:
        """Queue one frame (the body is not copied). Dropped silently once the connection is closing."""
        if not self.is_open:
            return
        head, view = make_frame(ftype, transfer_id, stream, offset, body)
        if view.nbytes <= _JOIN_BELOW:
            # One write, so one segment: each write to an idle socket is a syscall and a wake-up
            # of the peer (acknowledgements alone cost a receiver ~8% of a core at 35 Gbit/s).
            self.transport.write(head + view.tobytes() if view.nbytes else head)
        else:
            self.transport.write(head)
            self.transport.write(view)

    def send_raw(self, head: bytes, bodies) -> None:
        """Queue a prepared header and its body pieces (used for DATA chunks that span buffers)."""
        if not self.is_open:
            return
        self.transport.write(head)
        for piece in bodies:
            if piece.nbytes:
                self.transport.write(piece)

    async def writable(self) -> None:
        """Wait until the transport's write buffer is under its high-water mark."""
        await self._writable.wait()

    def abort(self, exc: BaseException | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


def shutdown_quietly(sock: socket.socket) -> None:
    """Shut both directions down (wakes a thread blocked on the socket); ignores a dead socket."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# struct tcp_info (linux/tcp.h): the fields the rate controller reads, at their fixed offsets.
_TCP_INFO_LEN = 232
_TCP_INFO_FIELDS = {"rtt_us": (68, "I"), "rttvar_us": (72, "I"), "snd_cwnd": (80, "I"),
                    "total_retrans": (100, "I"), "min_rtt_us": (148, "I"), "delivery_rate": (160, "Q"),
                    "bytes_retrans": (208, "Q"), "segs_out": (136, "I"), "bytes_acked": (120, "Q"),
                    "dsack_dups": (216, "I")}


def tcp_info(sock: socket.socket | None) -> dict[str, int] | None:
    """Selected ``TCP_INFO`` fields (Linux), or None where the platform or kernel lacks them."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    out = {}
    for name, (offset, fmt) in _TCP_INFO_FIELDS.items():
        if offset + struct.calcsize(fmt) <= len(raw):
            out[name] = struct.unpack_from("<" + fmt, raw, offset)[0]
    return out
