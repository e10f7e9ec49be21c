"""The receiving end: a listener that authenticates peers and lands their transfers in place.

A peer's session is the set of connections that presented the same session id (a sender opens
several, and reconnects after faults). A transfer belongs to the (proven key id, session) that
began it; frames for it from anyone else are refused. Limits and memory shares apply per peer:
its proven key id when it has one, else its address. Any frame that cannot be honoured is
answered with an ERROR for its transfer only, and its body is read and dropped, so other
transfers on the same connection carry on.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import ssl as _ssl
import time
from typing import Callable, Iterable

from kvlink.config import TransportConfig, is_loopback
from kvlink.errors import ConfigError, KvlinkError, TransferRejected, TransferTimeout, TransportError
from kvlink.transport import handshake as hs
from kvlink.transport.connection import FrameConnection
from kvlink.transport.frame import FrameType
from kvlink.transport.incoming import IncomingTransfer
from kvlink.transport.parts import Allocator, Scanner, default_allocator
from kvlink.transport.ledger import Ledger
from kvlink.transport.server_conn import ServerConn

_RECENT = 4096  # completed transfer ids remembered, to re-confirm END after a lost one
# Parts one PART frame may announce (senders send 1024: outgoing.PARTS_PER_FRAME); bounds the
# event loop's work per frame however many parts a transfer has.
_PARTS_PER_FRAME = 4096
# Bookkeeping charged to a peer's share and the budget besides part bytes, so that transfers and
# parts that reserve no bytes are not free: roughly what a transfer and an announced part cost.
TRANSFER_OVERHEAD = 4096
PART_OVERHEAD = 256
log = logging.getLogger("kvlink.transport")


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
    (:class:`~kvlink.transport.parts.PartScan`, e.g. :class:`~kvlink.serde.payload.PayloadScan`):
    reader threads advance it as each part's bytes land in order, so a part is judged as its last
    bytes arrive, from bytes still in cache, with no whole-part pass at the end.
    ``secrets`` (key id -> secret), when given, lets peers prove one of several secrets: a peer
    names its key id in HELLO (``TransferClient(key_id=...)``), a peer naming none uses
    ``secret``; each transfer's ``key_id`` records which key its peer proved (e.g. a pool
    daemon's tenant), None for ``secret`` or no authentication. Limits and memory shares apply
    per peer: its proven key id, else its address (see ``TransportConfig``).

    A begun transfer waits, unclaimed, until the application takes it with :meth:`accept` or
    :meth:`transfer` (at most ``accept_backlog`` of them; one nobody claims within ``idle_timeout``
    of its last data is released). Once claimed the receiver keeps no reference to it after it
    ends: the claimer's :meth:`IncomingTransfer.release` frees everything. ``accept_queue=False``
    is for applications that claim only by id (:meth:`transfer`): :meth:`accept` is then an
    error, and a full backlog drops its oldest unclaimed transfer instead of refusing new ones.
    """

    def __init__(self, config: TransportConfig | None = None, fingerprints: Iterable[bytes] | None = None,
                 secret: bytes | None = None, ssl: _ssl.SSLContext | None = None,
                 allocator: Allocator = default_allocator, part_verifier: Callable[[memoryview], bool] | None = None,
                 allocator_for: Callable[[IncomingTransfer], Allocator | None] | None = None,
                 part_scanner: Scanner | None = None, secrets: dict[str, bytes] | None = None,
                 accept_queue: bool = True):
        self.config = config or TransportConfig()
        self.fingerprints = None if fingerprints is None else {bytes(f) for f in fingerprints}
        self.secret = secret
        self.secrets = dict(secrets or {})
        # An unknown key id is challenged with this (nobody holds it), so that it fails at AUTH
        # exactly as a wrong secret does: key ids cannot be enumerated.
        self._unknown_key_secret = os.urandom(32)
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
        self.accept_queue = accept_queue
        # Begun transfers nobody claimed yet, oldest first (bounded by accept_backlog).
        self._unclaimed: collections.OrderedDict[int, IncomingTransfer] = collections.OrderedDict()
        self._unclaimed_ready = asyncio.Event()
        self._waiters: dict[int, list] = {}  # transfer id -> [future, number of waiters]
        self._ledger = Ledger(self.config)  # reserved bytes, in total and per peer id
        self._peer_conns: collections.Counter[str] = collections.Counter()  # peer id -> connections
        # Connections still in the handshake, oldest first (counted apart from _conns).
        self._handshaking: collections.OrderedDict[ServerConn, None] = collections.OrderedDict()
        self._live: collections.Counter[str] = collections.Counter()  # peer id -> transfers in _transfers
        self._reaper: asyncio.Task | None = None
        self.stats = collections.Counter()
        self.address: tuple[str, int] | None = None
        self.reader_threads = True  # one reader thread per plain-TCP connection (see reader.py)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind and listen (loopback unless told otherwise); returns the bound (host, port).

        Logs a warning (logger ``kvlink.transport``) when listening beyond loopback without a
        secret (anyone who reaches the port may send) or without TLS (HMAC covers only the
        handshake: the data path's integrity against an on-path attacker rests on TLS)."""
        loop = asyncio.get_running_loop()
        # TLS: the handshake is bounded too (a silent peer would otherwise be held for 60 s).
        tls = {"ssl_handshake_timeout": self.config.handshake_timeout} if self.ssl is not None else {}
        self._server = await loop.create_server(
            lambda: FrameConnection(ServerConn(self), self.config.max_chunk_bytes), host, port, ssl=self.ssl,
            backlog=256, **tls)
        self.address = self._server.sockets[0].getsockname()[:2]
        if not is_loopback(host):
            if self.secret is None and not self.secrets:
                log.warning("kvlink receiver listens on %s:%d without a secret: any peer that reaches it may "
                            "send transfers", *self.address)
            if self.ssl is None:
                log.warning("kvlink receiver listens on %s:%d without TLS: the HMAC handshake does not protect "
                            "the data that follows from an on-path attacker", *self.address)
        self._reaper = asyncio.create_task(self._reap_idle())
        return self.address

    async def close(self) -> None:
        """Stop listening, drop every connection and fail unfinished transfers."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
        conns = [*self._conns, *self._handshaking]
        for c in conns:
            c.conn.abort()
        for t in list(self._transfers.values()):
            t.fail(TransportError("receiver closed"))
        self._transfers.clear()
        self._live.clear()
        for t in list(self._unclaimed.values()):
            t.release()  # nobody can claim them any more
        self._unclaimed.clear()
        readers = [c.reader for c in conns if c.reader is not None]
        for reader in readers:
            reader.close()
        if readers:
            await asyncio.to_thread(lambda: [r.join() for r in readers])
        if self._server is not None:
            await self._server.wait_closed()

    async def accept(self) -> IncomingTransfer:
        """The next unclaimed transfer a peer began (streaming: its parts may still be arriving).
        Raises :class:`~kvlink.errors.ConfigError` on a server made with ``accept_queue=False``."""
        if not self.accept_queue:
            raise ConfigError("this TransferServer was made with accept_queue=False: claim transfers by id")
        while not self._unclaimed:
            self._unclaimed_ready.clear()
            await self._unclaimed_ready.wait()
        return self._unclaimed.popitem(last=False)[1]

    async def transfer(self, transfer_id: int) -> IncomingTransfer:
        """Wait for the transfer with this id to begin (the decode side knows ids from routing);
        it may have ended already. Bound the wait with ``asyncio.wait_for``."""
        t = self._transfers.get(transfer_id) or self._unclaimed.get(transfer_id)
        if t is not None:
            self._unclaimed.pop(transfer_id, None)  # claimed: the receiver no longer holds it
            return t
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
        return self._ledger.reserved

    def reserved_by(self, peer: str) -> int:
        """Bytes (parts plus bookkeeping) a peer holds reserved, against ``TransportConfig.peer_share``:
        ``peer`` is ``"key:<key id>"`` for a peer that proved a key id, else its address."""
        return self._ledger.by_peer.get(peer, 0)

    # -- protocol actions (called by ServerConn) ---------------------------------------------
    def _begin(self, sc: ServerConn, tid: int, body: bytes) -> None:
        if tid in self._recent:
            sc.conn.send(FrameType.END, transfer_id=tid)
            return
        begin = hs.decode(body, {"parts": int, "chunk": int, "meta": dict})
        existing = self._transfers.get(tid)
        if existing is not None:
            if existing.owner != sc.owner or (existing.num_parts, existing.chunk) != (begin["parts"], begin["chunk"]):
                raise TransferRejected(f"transfer {tid:#x} already exists with other settings")
            return
        if not 1 <= begin["parts"] <= self.config.max_parts:
            raise TransferRejected(f"{begin['parts']} parts is out of range 1..{self.config.max_parts} (max_parts)")
        if not 4096 <= begin["chunk"] <= self.config.max_chunk_bytes:
            raise TransferRejected(f"chunk size {begin['chunk']} is out of range")
        peer, cfg = sc.peer_id, self.config
        if self._live[peer] >= cfg.max_live_transfers_per_peer:
            raise TransferRejected(f"peer {peer} has {self._live[peer]} unfinished transfers "
                                   "(max_live_transfers_per_peer); retry later")
        if len(self._transfers) >= cfg.max_live_transfers:
            raise TransferRejected(f"receiver holds {len(self._transfers)} unfinished transfers "
                                   "(max_live_transfers); retry later")
        self._make_room()
        self._ledger.charge(peer, TRANSFER_OVERHEAD)
        t = IncomingTransfer(tid, sc.owner, begin["parts"], begin["chunk"], begin["meta"],
                             functools.partial(self._ledger.give_back, peer))
        t.overhead = TRANSFER_OVERHEAD  # given back with its parts' bytes when it is freed
        t.canceller = self._cancel_to_peer  # called with t: no closure, no reference cycle
        t.peer = sc.conn.transport.get_extra_info("peername")
        t.key_id, t.peer_id = sc.key_id, peer
        try:
            if self.allocator_for is not None:
                t.allocator = self.allocator_for(t)
        except BaseException:
            t.fail(TransferRejected(f"transfer {tid:#x} refused by the application"))  # gives the charge back
            raise
        t.scanner = self.part_scanner
        self._transfers[tid] = t
        self._live[peer] += 1
        self.stats["transfers"] += 1
        if (entry := self._waiters.pop(tid, None)) is not None and not entry[0].done():
            entry[0].set_result(t)  # claimed by id as it begins: never queued
        else:
            self._unclaimed[tid] = t
            self._unclaimed_ready.set()

    def _make_room(self) -> None:
        """Before a BEGIN: release unclaimed transfers idle past ``idle_timeout``, then, if the
        backlog is still full, refuse (``accept_queue``) or drop the oldest unclaimed one."""
        now, limit = time.monotonic(), self.config.idle_timeout
        while self._unclaimed:
            t = next(iter(self._unclaimed.values()))  # the oldest begun: the rest are younger
            if now - (t.finished or t.last_progress) <= limit:
                break
            self._drop_unclaimed(t)
        if len(self._unclaimed) >= self.config.accept_backlog:
            if self.accept_queue:
                raise TransferRejected("receiver backlog is full (accept_backlog)")
            self._drop_unclaimed(next(iter(self._unclaimed.values())))

    def _drop_unclaimed(self, t: IncomingTransfer) -> None:
        self._unclaimed.pop(t.transfer_id, None)
        self.stats["unclaimed_dropped"] += 1
        t.release()  # cancels it at the peer if it is still running

    def _part(self, sc: ServerConn, tid: int, index: int, body: bytes) -> None:
        if tid in self._recent:
            return
        t = self._transfers.get(tid)
        if t is None or t.owner != sc.owner:
            raise TransferRejected(f"unknown transfer {tid:#x}")
        obj = hs.decode(body, {})
        if "parts" in obj:  # several parts announced at once: [[index, length], ...]
            pairs = obj["parts"]
            if not isinstance(pairs, list) or len(pairs) > min(t.num_parts, _PARTS_PER_FRAME) or not all(
                    isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pairs):
                raise TransferRejected("PART body 'parts' must be [index, length] pairs")
        else:
            pairs = [[index, hs.decode(body, {"length": int})["length"]]]
        for index, length in pairs:
            self._announce(t, index, length)
        if t.complete:
            self._finish(sc, t)

    def _announce(self, t: IncomingTransfer, index: int, length: int) -> None:
        """Reserve and allocate part ``index``. Raises :class:`TransferRejected` for a bad index or
        length, a length beyond the transfer limit, the peer's share or the receive budget (all
        checked before anything is allocated), or an allocator that fails. Each new part costs
        its length plus ``PART_OVERHEAD`` of the peer's share and the budget."""
        if length < 0:
            raise TransferRejected("negative part length")
        if t.announced(index):
            t.announce(index, length, t.allocator or self.allocator)  # idempotent after a reconnect
            return
        cfg = self.config
        if t.reserved + length > cfg.transfer_limit:
            raise TransferRejected(f"transfer would exceed {cfg.transfer_limit} bytes (max_transfer_bytes)")
        cost = length + PART_OVERHEAD
        self._ledger.charge(t.peer_id, cost)
        try:
            t.announce(index, length, t.allocator or self.allocator)
        except BaseException as exc:
            self._ledger.give_back(t.peer_id, cost)
            if isinstance(exc, TransferRejected) or not isinstance(
                    exc, (KvlinkError, MemoryError, ValueError, OverflowError, OSError)):
                raise
            # e.g. numpy's MemoryError: refuse this transfer only; the connection carries on
            raise TransferRejected(f"cannot allocate {length} bytes for part {index}: {exc!r}") from None
        t.overhead += PART_OVERHEAD  # its length is in t.reserved: both go back when t is freed

    def _forget(self, t: IncomingTransfer) -> None:
        """``t`` is no longer live here (finished, failed, cancelled or timed out)."""
        if self._transfers.get(t.transfer_id) is t:
            del self._transfers[t.transfer_id]
            self._live[t.peer_id] -= 1
            if self._live[t.peer_id] <= 0:
                del self._live[t.peer_id]  # no entry kept per peer with nothing live

    def _finish(self, sc: ServerConn, t: IncomingTransfer) -> None:
        self._forget(t)
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
        if t is not None and t.owner == sc.owner:
            self._forget(t)
            t.fail(exc if isinstance(exc, TransferRejected) else TransferRejected(str(exc)))
        code = "unknown_transfer" if "unknown transfer" in str(exc) else "rejected"
        sc.conn.send(FrameType.ERROR, transfer_id=tid, body=hs.error_body(code, str(exc)))

    def _cancelled_by_peer(self, sc: ServerConn, tid: int) -> None:
        from kvlink.errors import TransferCancelled

        t = self._transfers.get(tid)
        if t is not None and t.owner == sc.owner:
            self._forget(t)
            t.fail(TransferCancelled(f"transfer {tid:#x} cancelled by the sender"))

    def _cancel_to_peer(self, t: IncomingTransfer) -> None:
        self._forget(t)
        for c in self._conns:
            if c.owner == t.owner and c.conn.is_open:
                c.conn.send(FrameType.CANCEL, transfer_id=t.transfer_id)
                break

    def _admit_handshake(self, sc: ServerConn) -> None:
        """Count a new connection still in the handshake. When its address (``max_handshakes_per_peer``)
        or everyone (``max_handshakes``) has as many open as allowed, the oldest one, preferring
        those that sent nothing yet, is dropped: silent connections lose their slot to a real
        peer instead of keeping it out."""
        cfg, victims = self.config, []
        mine = [c for c in self._handshaking if c.peer_host == sc.peer_host]
        if len(mine) >= cfg.max_handshakes_per_peer:
            victims = mine
        elif len(self._handshaking) >= cfg.max_handshakes:
            victims = list(self._handshaking)
        if victims:
            victim = next((c for c in victims if c.session is None), victims[0])
            del self._handshaking[victim]
            self.stats["handshakes_dropped"] += 1
            victim.drop("too many connections in the handshake (max_handshakes, max_handshakes_per_peer)")
        self._handshaking[sc] = None

    def _admit(self, sc: ServerConn) -> str | None:
        """Count a connection that completed its handshake against the limits of its peer id;
        the limit it breaks (None: admitted)."""
        self._handshaking.pop(sc, None)
        cfg = self.config
        if len(self._conns) >= cfg.max_connections:
            return f"receiver holds {cfg.max_connections} connections (max_connections)"
        if self._peer_conns[sc.peer_id] >= cfg.max_connections_per_peer:
            return f"peer {sc.peer_id} holds {cfg.max_connections_per_peer} connections (max_connections_per_peer)"
        self._conns.add(sc)
        self._peer_conns[sc.peer_id] += 1
        return None

    def _release_conn(self, sc: ServerConn) -> None:
        self._handshaking.pop(sc, None)
        if sc in self._conns:
            self._conns.discard(sc)
            self._peer_conns[sc.peer_id] -= 1
            if self._peer_conns[sc.peer_id] <= 0:
                del self._peer_conns[sc.peer_id]

    async def _reap_idle(self) -> None:
        # A sender that vanished must not pin receiver memory, nor an idle peer a connection
        # (a thread and a descriptor each), for ever.
        cfg = self.config
        period = min(1.0, cfg.idle_timeout / 4, cfg.conn_idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sc in list(self._conns):
                if sc.authed and now - sc.last_active > cfg.conn_idle_timeout:
                    self.stats["connections_idle_closed"] += 1
                    sc.close_idle()
            for t in list(self._transfers.values()):
                if now - t.last_progress > self.config.idle_timeout:
                    self._forget(t)
                    self.stats["timed_out"] += 1
                    t.fail(TransferTimeout(f"transfer {t.transfer_id:#x}: no data for {self.config.idle_timeout} s"))
