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

from kvlink.config import TransportConfig
from kvlink.errors import KvlinkError, TransferRejected, TransferTimeout, TransportError
from kvlink.transport import handshake as hs
from kvlink.transport.connection import FrameConnection
from kvlink.transport.frame import FrameType
from kvlink.transport.incoming import Allocator, IncomingTransfer, Scanner, default_allocator
from kvlink.transport.server_conn import ServerConn

_RECENT = 4096  # completed transfer ids remembered, to re-confirm END after a lost one


class TransferServer:
    """Listens for senders and receives their transfers.

    ``fingerprints``: the layout fingerprints accepted at the handshake (None accepts any; the
    application then checks the payloads it unpacks). ``secret`` enables the HMAC handshake;
    ``ssl`` an ``ssl.SSLContext`` for TLS. ``allocator(nbytes)`` returns the writable buffer a part
    lands in (default: host memory); ``allocator_for(transfer)``, when given, may return another
    allocator for one transfer, chosen from its ``meta`` when it begins (e.g. a pool daemon landing
    puts straight in the pages that will hold them), or None to use ``allocator``.
    ``part_verifier(buffer) -> bool`` judges whole parts of transfers opened ``verifiable``, sent
    without chunk checksums (the receiver announces at the handshake that it verifies parts); a
    part it fails is resent whole, within the sender's retry limit. It may run in a reader thread.
    ``part_scanner(buffer)``, given with ``part_verifier``, is the same judgement in streaming form
    (:class:`~kvlink.transport.incoming.PartScan`, e.g. :class:`~kvlink.serde.payload.PayloadScan`):
    reader threads advance it as each part's bytes land in order, so a part is judged as its last
    bytes arrive, from bytes still in cache, with no whole-part pass at the end.
    """

    def __init__(self, config: TransportConfig | None = None, fingerprints: Iterable[bytes] | None = None,
                 secret: bytes | None = None, ssl: _ssl.SSLContext | None = None,
                 allocator: Allocator = default_allocator, part_verifier: Callable[[memoryview], bool] | None = None,
                 allocator_for: Callable[[IncomingTransfer], Allocator | None] | None = None,
                 part_scanner: Scanner | None = None):
        self.config = config or TransportConfig()
        self.fingerprints = None if fingerprints is None else {bytes(f) for f in fingerprints}
        self.secret = secret
        self.ssl = ssl
        self.allocator = allocator
        self.allocator_for = allocator_for
        self.part_verifier = part_verifier
        self.part_scanner = part_scanner if part_verifier is not None else None
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[ServerConn] = set()
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
            lambda: FrameConnection(ServerConn(self), self.config.max_chunk_bytes), host, port, ssl=self.ssl,
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

    # -- protocol actions (called by ServerConn) ---------------------------------------------
    def _begin(self, sc: ServerConn, tid: int, body: bytes) -> None:
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
        if self.allocator_for is not None:
            t.allocator = self.allocator_for(t)
        t.scanner = self.part_scanner
        self._transfers[tid] = t
        self.stats["transfers"] += 1
        self._accept_q.put_nowait(t)
        if (entry := self._waiters.pop(tid, None)) is not None and not entry[0].done():
            entry[0].set_result(t)

    def _part(self, sc: ServerConn, tid: int, index: int, body: bytes) -> None:
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
            t.announce(index, length, t.allocator or self.allocator)  # idempotent after a reconnect
            return
        if t.reserved + length > self.config.max_transfer_bytes:
            raise TransferRejected(f"transfer would exceed {self.config.max_transfer_bytes} bytes")
        if self._reserved + length > self.config.receive_budget_bytes:
            raise TransferRejected("receiver memory budget exhausted; retry later")
        t.announce(index, length, t.allocator or self.allocator)
        self._reserved += length

    def _finish(self, sc: ServerConn, t: IncomingTransfer) -> None:
        self._transfers.pop(t.transfer_id, None)
        self._remember(t.transfer_id)
        self.stats["transfers_done"] += 1
        sc.conn.send(FrameType.END, transfer_id=t.transfer_id)

    def _remember(self, tid: int) -> None:
        self._recent[tid] = None
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)

    def _reject(self, sc: ServerConn, tid: int, exc: KvlinkError) -> None:
        self.stats["rejected"] += 1
        t = self._transfers.get(tid)
        if t is not None and t.owner == sc.session:
            self._transfers.pop(tid, None)
            t.fail(exc if isinstance(exc, TransferRejected) else TransferRejected(str(exc)))
        code = "unknown_transfer" if "unknown transfer" in str(exc) else "rejected"
        sc.conn.send(FrameType.ERROR, transfer_id=tid, body=hs.error_body(code, str(exc)))

    def _cancelled_by_peer(self, sc: ServerConn, tid: int) -> None:
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
