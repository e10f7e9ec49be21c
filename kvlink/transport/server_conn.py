"""The receiver's handler for one accepted connection: handshake, control frames, landing DATA
in place, acknowledgements, and whole-part verification (split from receiver.py)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from kvlink.codec.checksum import checksum
from kvlink.errors import FingerprintMismatch, HandshakeError, KvlinkError, TransferRejected
from kvlink.transport import handshake as hs
from kvlink.transport.connection import FrameConnection
from kvlink.transport.frame import FLAG_UNCHECKED, FrameHeader, FrameType, pack_acks
from kvlink.transport.incoming import VERIFY_PART, IncomingTransfer
from kvlink.transport.reader import ThreadReader

if TYPE_CHECKING:
    from kvlink.transport.receiver import TransferServer


def peer_host(peername) -> str:
    """The address part of a peer name: the unit of per-peer limits for connections in the
    handshake, and after it for peers that proved no key id."""
    return str(peername[0]) if isinstance(peername, tuple) and peername else ""


class ServerConn:
    """Frame handler for one accepted connection."""

    def __init__(self, server: "TransferServer"):
        self.server = server
        self.conn: FrameConnection | None = None
        self.session: bytes | None = None
        self.fingerprint: bytes = b""
        self.client_nonce = b""
        self.server_nonce = b""
        self.authed = False
        self.key_id: str | None = None  # which of the server's ``secrets`` the peer proved
        self.secret: bytes | None = None
        self._acks: list = []
        self._nacks: list = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self.reader: ThreadReader | None = None
        self.peer_host = ""
        self.peer_id = ""  # set at ACCEPT: "key:<key id>" when the peer proved one, else peer_host
        # Last frame seen (monotonic): the idle reaper closes authenticated connections idle for
        # conn_idle_timeout. Written by a reader thread too (a float store is atomic).
        self.last_active = time.monotonic()
        # (transfer, header) of a DATA frame being read into place on the loop
        self._pending: tuple[IncomingTransfer, FrameHeader] | None = None

    # -- FrameHandler ---------------------------------------------------------------------------
    def on_open(self, conn: FrameConnection) -> None:
        self.conn = conn
        self.peer_host = peer_host(conn.transport.get_extra_info("peername"))
        self.server._admit_handshake(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.config.handshake_timeout, self._handshake_expired)

    @property
    def owner(self) -> tuple[str | None, bytes | None]:
        """Who may feed the transfers this connection begins: (proven key id, session id)."""
        return self.key_id, self.session

    def drop(self, reason: str) -> None:
        """Close a connection still in the handshake (its slot went to a newer one)."""
        if self._timer is not None:
            self._timer.cancel()
        if self.conn is not None and self.conn.is_open:
            self._refuse("busy", reason)

    def close_idle(self) -> None:
        """Close an authenticated connection that carried no frame for ``conn_idle_timeout``
        (its sender reconnects when it has something to send)."""
        if self.conn is not None and self.conn.is_open:
            self._refuse("timeout", f"connection idle for {self.server.config.conn_idle_timeout} s")

    def on_closed(self, conn, exc) -> None:
        self.server._release_conn(self)
        if self.reader is not None:
            self.reader.close()
        if self._pending is not None:  # cut inside a DATA frame read on the loop
            self.abandon(*self._pending)
            self._pending = None
        if self._timer is not None:
            self._timer.cancel()

    def _handshake_expired(self) -> None:
        if not self.authed:
            self._refuse("handshake", "handshake timed out")

    def _refuse(self, code: str, message: str) -> None:
        self.conn.send(FrameType.ERROR, body=hs.error_body(code, message))
        self.conn.transport.close()  # flushes the ERROR, then closes

    def on_control(self, conn, header: FrameHeader, body: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            if not self.authed:
                self._handshake(header, body)
            else:
                self._control(header, body)
        except HandshakeError as exc:
            code = "auth" if "secret" in str(exc) else "handshake"
            self._refuse(code, str(exc))
        except FingerprintMismatch as exc:
            self._refuse("fingerprint", str(exc))

    def _handshake(self, header: FrameHeader, body: bytes) -> None:
        server = self.server
        if header.type is FrameType.HELLO and self.session is None:
            hello = hs.decode(body, {"v": int, "session": str, "conn": int, "fingerprint": str, "nonce": str})
            if hello["v"] != hs.PROTOCOL:
                raise HandshakeError(f"protocol {hello['v']}; this receiver speaks {hs.PROTOCOL}")
            self.session = hs.hex_bytes(hello, "session", 16)
            self.fingerprint = hs.hex_bytes(hello, "fingerprint", 16)
            self.client_nonce = hs.hex_bytes(hello, "nonce", hs.NONCE_BYTES)
            if server.fingerprints is not None and self.fingerprint not in server.fingerprints:
                raise FingerprintMismatch(next(iter(server.fingerprints), b""), self.fingerprint)
            key = hello.get("key")
            if key is not None:
                # A key id names one of several secrets (e.g. a pool daemon's tenants). An unknown
                # one is challenged with a secret nobody holds: it fails at AUTH like a wrong secret.
                if not isinstance(key, str):
                    raise HandshakeError("key id must be a string")
                self.key_id = key
                self.secret = server.secrets.get(key, server._unknown_key_secret)
            else:
                self.secret = server.secret
            if self.secret is None and not server.secrets:
                self._accept(None)
            elif self.secret is None:
                raise HandshakeError("this receiver requires a key id and its secret")
            else:
                self.server_nonce = hs.new_nonce()
                self.conn.send(FrameType.CHALLENGE, body=hs.encode({"nonce": self.server_nonce.hex()}))
            return
        if header.type is FrameType.AUTH and self.server_nonce:
            auth = hs.decode(body, {"mac": str})
            hs.check_mac(hs.mac(self.secret, "client", self.client_nonce, self.server_nonce, self.session,
                                self.fingerprint), auth["mac"])
            self._accept(hs.mac(self.secret, "server", self.client_nonce, self.server_nonce, self.session,
                                self.fingerprint))
            return
        raise HandshakeError(f"unexpected {header.type.name} frame during the handshake")

    def _accept(self, server_mac: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.peer_id = f"key:{self.key_id}" if self.key_id is not None else self.peer_host
        refused = self.server._admit(self)
        if refused is not None:
            self.server.stats["connections_refused"] += 1
            self._refuse("busy", f"connection refused: {refused}")
            return
        self.authed = True
        reply = {"max_chunk": self.server.config.max_chunk_bytes,
                 "verifies_parts": self.server.part_verifier is not None}
        if server_mac is not None:
            reply["mac"] = server_mac
        self.conn.send(FrameType.ACCEPT, body=hs.encode(reply))
        if self.server.ssl is None and self.conn.sock is not None and self.server.reader_threads:
            # The sender sends nothing until it has our ACCEPT, so no byte is half-parsed here.
            self.conn.transport.pause_reading()
            self.reader = ThreadReader(self.conn, asyncio.get_running_loop())

    def _control(self, header: FrameHeader, body: bytes) -> None:
        tid = header.transfer_id
        try:
            if header.type is FrameType.BEGIN:
                self.server._begin(self, tid, body)
            elif header.type is FrameType.PART:
                self.server._part(self, tid, header.stream, body)
            elif header.type is FrameType.CANCEL:
                self.server._cancelled_by_peer(self, tid)
            elif header.type is FrameType.ERROR:
                pass  # a sender reporting its own failure; its CANCEL follows
            else:
                raise TransferRejected(f"{header.type.name} frames are not accepted by a receiver")
        except KvlinkError as exc:  # refuses this transfer only; the connection carries on
            self.server._reject(self, tid, exc)

    def lookup(self, header: FrameHeader, later) -> tuple[IncomingTransfer | None, memoryview | None]:
        """Where a DATA body goes: (transfer, reserved view), or (None, None) to read and drop it.

        Runs in the reader thread (``later`` = ``loop.call_soon_threadsafe``) or on the loop
        (``later`` calls at once); every write to a connection happens through ``later``.
        """
        server, tid = self.server, header.transfer_id
        self.last_active = time.monotonic()
        if tid in server._recent:
            later(self._reconfirm, header)  # a resend after a lost END: confirm again
            return None, None
        transfer = server._transfers.get(tid)
        try:
            if transfer is None or transfer.owner != self.owner:
                raise TransferRejected(f"unknown transfer {tid:#x}")
            target, seen = transfer.target(header.stream, header.offset, header.length)
        except TransferRejected as exc:
            later(server._reject, self, tid, exc)
            return None, None
        if seen:
            later(self._ack, header)
        return (transfer, target) if target is not None else (None, None)

    def _reconfirm(self, header: FrameHeader) -> None:
        self._ack(header)
        self.conn.send(FrameType.END, transfer_id=header.transfer_id)

    def data_target(self, conn, header: FrameHeader) -> memoryview | None:
        if not self.authed:
            conn.abort(HandshakeError("data before the handshake"))
            return None
        transfer, target = self.lookup(header, lambda fn, *args: fn(*args))
        self._pending = (transfer, header) if target is not None else None
        return target

    def abandon(self, transfer: IncomingTransfer, header: FrameHeader) -> None:
        """The connection died inside a DATA body: free its reserved run for the resend."""
        transfer.write_done(header.stream, header.offset, header.length, ok=False)

    def judge_part(self, buf: memoryview) -> bool | None:
        """The part verifier's verdict on a whole part (any thread); None without a verifier."""
        verifier = self.server.part_verifier
        if verifier is None:
            return None
        try:
            return bool(verifier(buf))
        except Exception:  # a verifier that raises has found nothing it can vouch for
            return False

    def on_data(self, conn, header: FrameHeader, target: memoryview | None, ok: bool | None = None,
                transfer: IncomingTransfer | None = None, whole: bool | None = None, hashed: int = 0) -> None:
        """A body is in ``target``; ``ok`` is the reader thread's checksum verdict (None: check here),
        ``whole`` its part verifier's verdict when the body was a whole unchecked part, ``hashed``
        how many of its bytes the reader hashed into the part's scan as they landed."""
        if target is None:
            return
        if hashed:
            self.server.stats["bytes_scanned_landing"] += hashed
        if transfer is None:
            (transfer, _), self._pending = self._pending, None
        if ok is None:
            ok = bool(header.flags & FLAG_UNCHECKED) or checksum(target) == header.body_checksum
        if not ok:
            self.server.stats["chunks_corrupt"] += 1
            self._nacks.append((header.transfer_id, header.stream, header.length, header.offset))
            self._schedule_flush()
        unchecked = bool(header.flags & FLAG_UNCHECKED)
        completed = transfer.write_done(header.stream, header.offset, header.length, ok, unchecked,
                                        self.server.part_verifier is not None)
        if ok and self.server._transfers.get(header.transfer_id) is transfer:
            self._ack(header)
            if completed == VERIFY_PART and whole is not None:
                self._judged(transfer, header.stream, whole)
            elif completed == VERIFY_PART:
                task = asyncio.ensure_future(self._verify_part(transfer, header.stream))
                self.server._tasks.add(task)
                task.add_done_callback(self.server._tasks.discard)
            elif completed:
                self._flush()
                self.server._finish(self, transfer)

    async def _verify_part(self, transfer: IncomingTransfer, index: int) -> None:
        """Judge a whole part that arrived without chunk checksums; resend it whole if it fails.
        With a streaming scan, reader threads have usually judged all of it by now."""
        ok = transfer.scan_verdict(index, wait=False)
        if ok is None:
            loop = asyncio.get_running_loop()
            if transfer.scanner is not None:
                ok = await loop.run_in_executor(None, transfer.scan_verdict, index, True)
            if ok is None:
                ok = await loop.run_in_executor(None, self.judge_part, transfer.part_view(index))
            else:
                self.server.stats["parts_scan_finished_late"] += 1
        else:
            self.server.stats["parts_scanned_on_arrival"] += 1
        self._judged(transfer, index, ok)

    def _judged(self, transfer: IncomingTransfer, index: int, ok: bool) -> None:
        server = self.server
        if transfer.error is not None or server._transfers.get(transfer.transfer_id) is not transfer:
            return
        if ok:
            if transfer.accept_part(index):
                self._flush()
                server._finish(self, transfer)
            return
        server.stats["parts_corrupt"] += 1
        length = transfer.reset_part(index)
        step = max(transfer.chunk, server.config.max_chunk_bytes // transfer.chunk * transfer.chunk)
        for offset in range(0, max(length, 1), step):
            self._nacks.append((transfer.transfer_id, index, min(step, length - offset), offset))
        self._schedule_flush()

    # -- acknowledgements ---------------------------------------------------------------------
    def _ack(self, header: FrameHeader) -> None:
        self._acks.append((header.transfer_id, header.stream, header.length, header.offset))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Acks for everything that arrived in one loop iteration leave in one frame.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for ftype, entries in ((FrameType.ACK, self._acks), (FrameType.NACK, self._nacks)):
            while entries:
                batch, entries[:] = entries[:2048], entries[2048:]
                self.conn.send(ftype, body=pack_acks(batch))
