"""The receiving end: a listener that authenticates peers and lands their transfers in place.

A peer's session is the set of connections that presented the same session id (a sender opens
several, and reconnects after faults). A transfer belongs to the session that began it; frames
for it from anyone else are refused. Any frame that cannot be honoured is answered with an
ERROR for its transfer only, and its body is read and dropped, so other transfers on the same
connection carry on.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as _ssl
import time
from typing import Callable, Iterable

from kvlink.codec.checksum import checksum
from kvlink.config import TransportConfig
from kvlink.errors import (FingerprintMismatch, HandshakeError, KvlinkError, TransferRejected, TransferTimeout,
                           TransportError)
from kvlink.transport import handshake as hs
from kvlink.transport.connection import FrameConnection
from kvlink.transport.frame import FLAG_UNCHECKED, FrameHeader, FrameType, pack_acks
from kvlink.transport.incoming import VERIFY_PART, Allocator, IncomingTransfer, default_allocator
from kvlink.transport.reader import ThreadReader

_RECENT = 4096  # completed transfer ids remembered, to re-confirm END after a lost one


class _ServerConn:
    """Frame handler for one accepted connection."""

    def __init__(self, server: "TransferServer"):
        self.server = server
        self.conn: FrameConnection | None = None
        self.session: bytes | None = None
        self.fingerprint: bytes = b""
        self.client_nonce = b""
        self.server_nonce = b""
        self.authed = False
        self._acks: list = []
        self._nacks: list = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self.reader: ThreadReader | None = None
        self._pending: IncomingTransfer | None = None

    # -- FrameHandler ---------------------------------------------------------------------------
    def on_open(self, conn: FrameConnection) -> None:
        self.conn = conn
        self.server._conns.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.config.handshake_timeout, self._handshake_expired)

    def on_closed(self, conn, exc) -> None:
        self.server._conns.discard(self)
        if self.reader is not None:
            self.reader.close()
        if self._timer is not None:
            self._timer.cancel()

    def _handshake_expired(self) -> None:
        if not self.authed:
            self._refuse("handshake", "handshake timed out")

    def _refuse(self, code: str, message: str) -> None:
        self.conn.send(FrameType.ERROR, body=hs.error_body(code, message))
        self.conn.transport.close()  # flushes the ERROR, then closes

    def on_control(self, conn, header: FrameHeader, body: bytes) -> None:
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
            if server.secret is None:
                self._accept(None)
            else:
                self.server_nonce = hs.new_nonce()
                self.conn.send(FrameType.CHALLENGE, body=hs.encode({"nonce": self.server_nonce.hex()}))
            return
        if header.type is FrameType.AUTH and self.server_nonce:
            auth = hs.decode(body, {"mac": str})
            hs.check_mac(hs.mac(server.secret, "client", self.client_nonce, self.server_nonce, self.session,
                                self.fingerprint), auth["mac"])
            self._accept(hs.mac(server.secret, "server", self.client_nonce, self.server_nonce, self.session,
                                self.fingerprint))
            return
        raise HandshakeError(f"unexpected {header.type.name} frame during the handshake")

    def _accept(self, server_mac: str | None) -> None:
        self.authed = True
        if self._timer is not None:
            self._timer.cancel()
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
        except (TransferRejected, HandshakeError) as exc:
            self.server._reject(self, tid, exc)

    def lookup(self, header: FrameHeader, later) -> tuple[IncomingTransfer | None, memoryview | None]:
        """Where a DATA body goes: (transfer, reserved view), or (None, None) to read and drop it.

        Runs in the reader thread (``later`` = ``loop.call_soon_threadsafe``) or on the loop
        (``later`` calls at once); every write to a connection happens through ``later``.
        """
        server, tid = self.server, header.transfer_id
        if tid in server._recent:
            later(self._reconfirm, header)  # a resend after a lost END: confirm again
            return None, None
        transfer = server._transfers.get(tid)
        try:
            if transfer is None or transfer.owner != self.session:
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
        self._pending, target = self.lookup(header, lambda fn, *args: fn(*args))
        return target

    def on_data(self, conn, header: FrameHeader, target: memoryview | None, ok: bool | None = None,
                transfer: IncomingTransfer | None = None) -> None:
        """A body is in ``target``; ``ok`` is the reader thread's checksum verdict (None: check here)."""
        if target is None:
            return
        if transfer is None:
            transfer, self._pending = self._pending, None
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
            if completed == VERIFY_PART:
                task = asyncio.ensure_future(self._verify_part(transfer, header.stream))
                self.server._tasks.add(task)
                task.add_done_callback(self.server._tasks.discard)
            elif completed:
                self._flush()
                self.server._finish(self, transfer)

    async def _verify_part(self, transfer: IncomingTransfer, index: int) -> None:
        """Judge a whole part that arrived without chunk checksums; resend it whole if it fails."""
        server = self.server
        buf = transfer.part_view(index)
        try:
            ok = await asyncio.get_running_loop().run_in_executor(None, server.part_verifier, buf)
        except Exception:  # a verifier that raises has found nothing it can vouch for
            ok = False
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


class TransferServer:
    """Listens for senders and receives their transfers.

    ``fingerprints``: the layout fingerprints accepted at the handshake (None accepts any; the
    application then checks the payloads it unpacks). ``secret`` enables the HMAC handshake;
    ``ssl`` an ``ssl.SSLContext`` for TLS. ``allocator(nbytes)`` returns the writable buffer a part
    lands in (default: host memory). ``part_verifier(buffer) -> bool`` judges whole parts sent
    without chunk checksums (announced at the handshake, so senders on the default setting skip
    them); a part it fails is resent whole, within the sender's retry limit.
    """

    def __init__(self, config: TransportConfig | None = None, fingerprints: Iterable[bytes] | None = None,
                 secret: bytes | None = None, ssl: _ssl.SSLContext | None = None,
                 allocator: Allocator = default_allocator, part_verifier: Callable[[memoryview], bool] | None = None):
        self.config = config or TransportConfig()
        self.fingerprints = None if fingerprints is None else {bytes(f) for f in fingerprints}
        self.secret = secret
        self.ssl = ssl
        self.allocator = allocator
        self.part_verifier = part_verifier
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_ServerConn] = set()
        self._transfers: dict[int, IncomingTransfer] = {}
        self._recent: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._accept_q: asyncio.Queue[IncomingTransfer] = asyncio.Queue(self.config.accept_backlog)
        self._waiters: dict[int, list] = {}  # transfer id -> [future, number of waiters]
        self._reserved = 0
        self._reaper: asyncio.Task | None = None
        self.stats = collections.Counter()
        self.address: tuple[str, int] | None = None
        self.reader_threads = True  # one reader thread per plain-TCP connection (see reader.py)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind and listen (loopback unless told otherwise); returns the bound (host, port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrameConnection(_ServerConn(self), self.config.max_chunk_bytes), host, port, ssl=self.ssl,
            backlog=256)
        self.address = self._server.sockets[0].getsockname()[:2]
        self._reaper = asyncio.create_task(self._reap_idle())
        return self.address

    async def close(self) -> None:
        """Stop listening, drop every connection and fail unfinished transfers."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for c in conns:
            c.conn.abort()
        for t in list(self._transfers.values()):
            t.fail(TransportError("receiver closed"))
        self._transfers.clear()
        readers = [c.reader for c in conns if c.reader is not None]
        for reader in readers:
            reader.close()
        if readers:
            await asyncio.to_thread(lambda: [r.join() for r in readers])
        if self._server is not None:
            await self._server.wait_closed()

    async def accept(self) -> IncomingTransfer:
        """The next transfer a peer began (streaming: its parts may still be arriving)."""
        return await self._accept_q.get()

    async def transfer(self, transfer_id: int) -> IncomingTransfer:
        """Wait for the transfer with this id to begin (the decode side knows ids from routing)."""
        if transfer_id in self._transfers:
            return self._transfers[transfer_id]
        entry = self._waiters.get(transfer_id)
        if entry is None:
            entry = self._waiters[transfer_id] = [asyncio.get_running_loop().create_future(), 0]
        entry[1] += 1
        try:
            return await asyncio.shield(entry[0])
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._waiters.get(transfer_id) is entry:
                del self._waiters[transfer_id]  # nobody waits any more (done, cancelled or timed out)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    # -- protocol actions (called by _ServerConn) ---------------------------------------------
    def _begin(self, sc: _ServerConn, tid: int, body: bytes) -> None:
        if tid in self._recent:
            sc.conn.send(FrameType.END, transfer_id=tid)
            return
        begin = hs.decode(body, {"parts": int, "chunk": int, "meta": dict})
        existing = self._transfers.get(tid)
        if existing is not None:
            if existing.owner != sc.session or (existing.num_parts, existing.chunk) != (begin["parts"], begin["chunk"]):
                raise TransferRejected(f"transfer {tid:#x} already exists with other settings")
            return
        if not 1 <= begin["parts"] <= 1 << 20:
            raise TransferRejected(f"{begin['parts']} parts is out of range")
        if not 4096 <= begin["chunk"] <= self.config.max_chunk_bytes:
            raise TransferRejected(f"chunk size {begin['chunk']} is out of range")
        if self._accept_q.full():
            raise TransferRejected("receiver backlog is full")
        t = IncomingTransfer(tid, sc.session, begin["parts"], begin["chunk"], begin["meta"], self._give_back)
        t.canceller = lambda: self._cancel_to_peer(t)
        t.peer = sc.conn.transport.get_extra_info("peername")
        self._transfers[tid] = t
        self.stats["transfers"] += 1
        self._accept_q.put_nowait(t)
        if (entry := self._waiters.pop(tid, None)) is not None and not entry[0].done():
            entry[0].set_result(t)

    def _part(self, sc: _ServerConn, tid: int, index: int, body: bytes) -> None:
        if tid in self._recent:
            return
        t = self._transfers.get(tid)
        if t is None or t.owner != sc.session:
            raise TransferRejected(f"unknown transfer {tid:#x}")
        obj = hs.decode(body, {})
        if "parts" in obj:  # several parts announced at once: [[index, length], ...]
            pairs = obj["parts"]
            if not isinstance(pairs, list) or len(pairs) > t.num_parts or not all(
                    isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pairs):
                raise TransferRejected("PART body 'parts' must be [index, length] pairs")
        else:
            pairs = [[index, hs.decode(body, {"length": int})["length"]]]
        for index, length in pairs:
            self._announce(t, index, length)
        if t.complete:
            self._finish(sc, t)

    def _announce(self, t: IncomingTransfer, index: int, length: int) -> None:
        if length < 0:
            raise TransferRejected("negative part length")
        if t.announced(index):
            t.announce(index, length, self.allocator)  # idempotent re-announcement after a reconnect
            return
        if t.reserved + length > self.config.max_transfer_bytes:
            raise TransferRejected(f"transfer would exceed {self.config.max_transfer_bytes} bytes")
        if self._reserved + length > self.config.receive_budget_bytes:
            raise TransferRejected("receiver memory budget exhausted; retry later")
        t.announce(index, length, self.allocator)
        self._reserved += length

    def _finish(self, sc: _ServerConn, t: IncomingTransfer) -> None:
        self._transfers.pop(t.transfer_id, None)
        self._remember(t.transfer_id)
        self.stats["transfers_done"] += 1
        sc.conn.send(FrameType.END, transfer_id=t.transfer_id)

    def _remember(self, tid: int) -> None:
        self._recent[tid] = None
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def _reject(self, sc: _ServerConn, tid: int, exc: KvlinkError) -> None:
        self.stats["rejected"] += 1
        t = self._transfers.get(tid)
        if t is not None and t.owner == sc.session:
            self._transfers.pop(tid, None)
            t.fail(exc if isinstance(exc, TransferRejected) else TransferRejected(str(exc)))
        code = "unknown_transfer" if "unknown transfer" in str(exc) else "rejected"
        sc.conn.send(FrameType.ERROR, transfer_id=tid, body=hs.error_body(code, str(exc)))

    def _cancelled_by_peer(self, sc: _ServerConn, tid: int) -> None:
        from kvlink.errors import TransferCancelled

        t = self._transfers.get(tid)
        if t is not None and t.owner == sc.session:
            self._transfers.pop(tid)
            t.fail(TransferCancelled(f"transfer {tid:#x} cancelled by the sender"))

    def _cancel_to_peer(self, t: IncomingTransfer) -> None:
        self._transfers.pop(t.transfer_id, None)
        for c in self._conns:
            if c.session == t.owner and c.conn.is_open:
                c.conn.send(FrameType.CANCEL, transfer_id=t.transfer_id)
                break

    def _give_back(self, nbytes: int) -> None:
        self._reserved -= nbytes

    async def _reap_idle(self) -> None:
        # A sender that vanished must not pin receiver memory for ever.
        period = min(1.0, self.config.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for t in list(self._transfers.values()):
                if now - t.last_progress > self.config.idle_timeout:
                    self._transfers.pop(t.transfer_id, None)
                    self.stats["timed_out"] += 1
                    t.fail(TransferTimeout(f"transfer {t.transfer_id:#x}: no data for {self.config.idle_timeout} s"))
