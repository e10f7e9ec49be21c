"""The sender's side of one connection: handshake, frame writing (through a writer thread on
plain TCP), and the events it reports to its :class:`~kvlink.transport.sender.TransferClient`."""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
import time
from typing import TYPE_CHECKING

from kvlink.codec.checksum import checksum_pieces
from kvlink.errors import HandshakeError, KvlinkError, PeerUnreachable, TransportError
from kvlink.transport import handshake as hs
from kvlink.transport.congestion import RateController
from kvlink.transport.connection import FrameConnection, tcp_info
from kvlink.transport.frame import FLAG_UNCHECKED, FrameHeader, FrameType, make_frame, unpack_acks
from kvlink.transport.outgoing import OutgoingTransfer
from kvlink.transport.writer import ThreadWriter

if TYPE_CHECKING:
    from kvlink.transport.sender import TransferClient

NOTSENT_LOWAT = 1 << 20      # unsent bytes the kernel may hold at low rates
MAX_NOTSENT_LOWAT = 8 << 20  # ... and at the highest


class ClientConn:
    """Frame handler for one connection to the receiver."""

    def __init__(self, client: "TransferClient", slot: int):
        self.client = client
        self.slot = slot
        self.conn: FrameConnection | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.nonce = hs.new_nonce()
        self.server_nonce = b""
        self.peer_verifies_parts = False
        self.registered = False
        self.inflight: dict[tuple[int, int, int], tuple[float, int, OutgoingTransfer]] = {}
        self.inflight_bytes = 0
        self.announced: dict[int, int] = {}  # transfer id -> parts announced here (in add order)
        self.last_ack = time.monotonic()
        self.tcp_prev: dict | None = None
        self.writer: ThreadWriter | None = None
        self.lowat = 0
        self.max_chunk = 0  # the receiver's largest frame, from its ACCEPT

    def start_writer(self, timeout: float) -> None:
        """After the handshake, frames go out through a writer thread (plain TCP only: TLS
        records must be produced by the event loop's transport)."""
        loop = asyncio.get_running_loop()
        wake = self.client._wake
        self.writer = ThreadWriter(self.conn.sock, lambda exc: loop.call_soon_threadsafe(self._writer_failed, exc),
                                   timeout, lambda: loop.call_soon_threadsafe(wake.set))

    def set_lowat(self, nbytes: int) -> None:
        """Let the kernel hold up to ``nbytes`` unsent (``TCP_NOTSENT_LOWAT``). Small keeps the
        choice of what goes next late; too small for the rate costs a writer wake-up per small
        refill (measured on loopback: 1 MiB at ~30 Gbit/s cost ~5% of goodput)."""
        sock = self.conn.sock if self.conn is not None else None
        if sock is None or nbytes == self.lowat or not hasattr(socket, "TCP_NOTSENT_LOWAT"):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, nbytes)
            self.lowat = nbytes
        except OSError:
            pass  # a connection being torn down; the next one starts afresh

    @property
    def backlog(self) -> int:
        """Bytes handed to this connection and not yet in the kernel: kept to a few frames, so
        the scheduler decides late, when the socket can take data, and weights and deadlines hold."""
        if self.writer is not None:
            return self.writer.backlog
        return self.conn.transport.get_write_buffer_size()

    @property
    def frames(self) -> int:
        """DATA frames handed to this connection's writer and not yet wholly in the kernel."""
        return self.writer.frames if self.writer is not None else 0

    def _writer_failed(self, exc: BaseException) -> None:
        if self.conn is not None:
            self.conn.abort(exc)

    def send(self, ftype: FrameType, transfer_id: int = 0, stream: int = 0, body: bytes = b"") -> None:
        if self.writer is None:
            self.conn.send(ftype, transfer_id, stream, body=body)
        else:
            head, view = make_frame(ftype, transfer_id, stream, 0, body)
            self.writer.frame(head, view)

    def send_data(self, t: OutgoingTransfer, part: int, offset: int, pieces: list[memoryview], checked: bool) -> None:
        if self.writer is not None:
            self.writer.data(t.transfer_id, part, offset, pieces, checked)
            return
        flags = 0 if checked else FLAG_UNCHECKED
        digest = checksum_pieces(pieces) if checked else 0
        length = sum(p.nbytes for p in pieces)
        self.conn.send_raw(FrameHeader(FrameType.DATA, t.transfer_id, part, offset, length, digest, flags).encode(),
                           pieces)

    @property
    def usable(self) -> bool:
        return self.registered and self.conn is not None and self.conn.can_write

    def on_open(self, conn: FrameConnection) -> None:
        self.conn = conn
        c = self.client
        hello = {"v": hs.PROTOCOL, "session": c.session.hex(), "conn": self.slot,
                 "fingerprint": c.fingerprint.hex(), "nonce": self.nonce.hex()}
        if c.key_id is not None:
            hello["key"] = c.key_id
        conn.send(FrameType.HELLO, body=hs.encode(hello))

    def on_writable(self, conn) -> None:
        self.client._wake.set()

    def on_closed(self, conn, exc) -> None:
        if self.writer is not None:
            self.writer.close()
        if not self.ready.done():
            self.ready.set_exception(HandshakeError(f"connection closed during the handshake ({exc})"))
            self.ready.exception()
        if self.registered:
            self.client._on_conn_lost(self)

    def data_target(self, conn, header):
        conn.abort(TransportError("receiver sent DATA"))
        return None

    def on_data(self, conn, header, target) -> None:
        pass

    def on_control(self, conn, header: FrameHeader, body: bytes) -> None:
        if not self.ready.done():
            try:
                self._handshake(header, body)
            except KvlinkError as exc:
                self.ready.set_exception(exc)
                conn.abort()
            return
        client = self.client
        if header.type in (FrameType.ACK, FrameType.NACK):
            try:
                entries = unpack_acks(body)
            except KvlinkError as exc:
                conn.abort(exc)
                return
            client._on_acks(self, entries, header.type is FrameType.NACK)
        elif header.type is FrameType.END:
            client._on_end(header.transfer_id)
        elif header.type is FrameType.ERROR:
            client._on_error(self, header.transfer_id, hs.error_from_body(body))
        elif header.type is FrameType.CANCEL:
            client._on_peer_cancel(header.transfer_id)
        else:
            conn.abort(TransportError(f"unexpected {header.type.name} from the receiver"))

    def _handshake(self, header: FrameHeader, body: bytes) -> None:
        c = self.client
        if header.type is FrameType.ERROR:
            raise hs.error_from_body(body)
        if header.type is FrameType.CHALLENGE:
            if c.secret is None:
                raise hs.AuthenticationError("the receiver requires a shared secret and none is configured")
            self.server_nonce = hs.hex_bytes(hs.decode(body, {"nonce": str}), "nonce", hs.NONCE_BYTES)
            mac = hs.mac(c.secret, "client", self.nonce, self.server_nonce, c.session, c.fingerprint)
            self.conn.send(FrameType.AUTH, body=hs.encode({"mac": mac}))
            return
        if header.type is FrameType.ACCEPT:
            accept = hs.decode(body, {"max_chunk": int})
            if c.secret is not None:
                if not self.server_nonce:
                    raise hs.AuthenticationError("the receiver did not ask for the shared secret")
                hs.check_mac(hs.mac(c.secret, "server", self.nonce, self.server_nonce, c.session, c.fingerprint),
                             accept.get("mac"))
            if accept["max_chunk"] < c.config.grid_bytes:
                raise HandshakeError(f"receiver takes frames up to {accept['max_chunk']} bytes, "
                                     f"less than this sender's {c.config.grid_bytes}-byte grid")
            self.max_chunk = accept["max_chunk"]  # frames to this receiver stay within it
            self.peer_verifies_parts = bool(accept.get("verifies_parts", False))
            self.ready.set_result(None)
            return
        raise HandshakeError(f"unexpected {header.type.name} during the handshake")

    @property
    def checked(self) -> bool:
        """Whether this connection's chunks of verifiable transfers carry xxh3 (see
        TransportConfig.chunk_checksums); chunks of other transfers always do, unless the setting
        is False."""
        setting = self.client.config.chunk_checksums
        return not self.peer_verifies_parts if setting is None else setting

    def checks(self, verifiable: bool) -> bool:
        """Whether a chunk of a transfer (``verifiable``: opened as such) carries xxh3 here."""
        if self.client.config.chunk_checksums is None and not verifiable:
            return True  # the receiver's part verifier is not known to understand these parts
        return self.checked


async def open_conn(client: "TransferClient", slot: int) -> ClientConn:
    """Connect connection ``slot`` of ``client``, complete the handshake and start its writer.
    Raises :class:`~kvlink.errors.PeerUnreachable` (connect failed or timed out, or TLS closed
    before it completed) and :class:`~kvlink.errors.HandshakeError` (TLS failed: never retried;
    or the handshake timed out), or what the handshake found (authentication, fingerprint)."""
    loop = asyncio.get_running_loop()
    cfg = client.config
    cc = ClientConn(client, slot)
    try:
        await asyncio.wait_for(loop.create_connection(
            lambda: FrameConnection(cc, 64 << 10), client.host, client.port, ssl=client.ssl,
            server_hostname=client.server_hostname if client.ssl else None, local_addr=client.local_addr),
            cfg.connect_timeout)
    except _ssl.SSLError as exc:
        # An unverifiable certificate or a TLS mismatch stays so: fail now, do not retry. (A TLS
        # EOF/reset is a lost connection like any other.)
        if isinstance(exc, (_ssl.SSLEOFError, _ssl.SSLZeroReturnError)):
            raise PeerUnreachable(f"cannot connect to {client.host}:{client.port}: {exc}") from None
        raise HandshakeError(f"TLS with {client.host}:{client.port} failed: {exc}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerUnreachable(f"cannot connect to {client.host}:{client.port}: {exc or 'timed out'}") from None
    try:
        await asyncio.wait_for(asyncio.shield(cc.ready), cfg.handshake_timeout)
    except asyncio.TimeoutError:
        cc.conn.abort()
        raise HandshakeError("handshake timed out") from None
    except BaseException:
        cc.conn.abort()
        raise
    # Keep little unsent data in the kernel, so what goes next is decided late (weights,
    # deadlines, pacing) and not hidden in a deep socket buffer; the client's ticker scales it
    # to the rate.
    cc.set_lowat(client._lowat())
    if client.ssl is None and cc.conn.sock is not None:
        cc.start_writer(cfg.progress_timeout)
    cc.registered = True
    cc.last_ack = time.monotonic()
    return cc


def poll_tcp_info(conns: list[ClientConn | None], controller: RateController) -> None:
    """Feed the kernel's view of every live connection (``TCP_INFO``: RTT, retransmissions,
    bytes acknowledged) to the rate controller."""
    rtts, mins, retrans, segs, dsacks = [], [], 0, 0, 0
    for cc in conns:
        if cc is None or cc.conn is None:
            continue
        info = tcp_info(cc.conn.sock)
        if not info:
            continue
        prev, cc.tcp_prev = cc.tcp_prev, info
        if info.get("rtt_us"):
            rtts.append(info["rtt_us"] / 1e6)
        if info.get("min_rtt_us"):
            mins.append(info["min_rtt_us"] / 1e6)
        if prev is not None:
            retrans += info.get("total_retrans", 0) - prev.get("total_retrans", 0)
            segs += info.get("segs_out", 0) - prev.get("segs_out", 0)
            dsacks += info.get("dsack_dups", 0) - prev.get("dsack_dups", 0)
            if "bytes_acked" in info:
                controller.on_wire_acked(info["bytes_acked"] - prev.get("bytes_acked", 0))
    if rtts:
        controller.on_tcp_info(sum(rtts) / len(rtts), min(mins) if mins else None, retrans, segs, dsacks)
