"""The sending end: N connections to one receiver, chunks striped over them, paced and resumed.

One dispatcher task picks the next chunk (:mod:`~kvlink.transport.scheduler`), waits for the link
pacer, and writes it to the connection with the least unacknowledged data that has window left.
Every chunk stays referenced (never copied) until the receiver acknowledges it; a lost
connection puts its unacknowledged chunks back in front of the queue and is re-opened with
backoff, a NACKed chunk is resent, and a ticker feeds the rate controller and enforces timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl as _ssl
import time

from kvlink.config import TransportConfig
from kvlink.errors import (ConfigError, FingerprintMismatch, HandshakeError, KvlinkError, PeerUnreachable,
                           TransferFailed, TransferTimeout, TransportError)
from kvlink.transport import frame_size, handshake as hs
from kvlink.transport.congestion import SAMPLE, LinkSnapshot, RateController
from kvlink.transport.client_conn import MAX_NOTSENT_LOWAT, NOTSENT_LOWAT, ClientConn, open_conn, poll_tcp_info
from kvlink.transport.frame import FrameType
from kvlink.transport.outgoing import Chunk, OutgoingTransfer
from kvlink.transport.pacing import TokenBucket, repace
from kvlink.transport.scheduler import ChunkScheduler


class TransferClient:
    """Sends transfers to one receiver over ``config.connections`` TCP connections.

    ``fingerprint`` is the layout fingerprint presented at the handshake (``CacheSpec.fingerprint``).
    Use as ``async with TransferClient(...) as client:``. :meth:`connect` raises
    :class:`~kvlink.errors.PeerUnreachable`, :class:`~kvlink.errors.HandshakeError`,
    :class:`~kvlink.errors.AuthenticationError` or :class:`~kvlink.errors.FingerprintMismatch`;
    a TLS failure (the server's certificate cannot be verified) is a :class:`~kvlink.errors.HandshakeError`
    at once, never retried.
    """

    def __init__(self, host: str, port: int, fingerprint: bytes, config: TransportConfig | None = None,
                 secret: bytes | None = None, ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None,
                 key_id: str | None = None, local_addr: tuple[str, int] | None = None):
        if len(fingerprint) != 16:
            raise ConfigError("fingerprint must be 16 bytes (CacheSpec.fingerprint)")
        self.host, self.port = host, port
        self.fingerprint = bytes(fingerprint)
        self.config = config or TransportConfig()
        self.secret = secret
        self.key_id = key_id  # names which of a multi-secret receiver's secrets this is (HELLO "key")
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.local_addr = local_addr  # (address, port) to send from, e.g. the NIC of the inter-DC link
        self.session = os.urandom(16)
        cfg = self.config
        self.controller = RateController(None if cfg.rate_cap is None else cfg.rate_cap / 8, cfg.adaptive,
                                         None if cfg.initial_rate is None else cfg.initial_rate / 8)
        self._bucket: TokenBucket | None = None
        self._conns: list[ClientConn | None] = [None] * cfg.connections
        self._reconnecting: dict[int, asyncio.Task] = {}
        self._transfers: dict[int, OutgoingTransfer] = {}
        self._sched = ChunkScheduler()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._rr = 0
        self._early = frame_size.EarlyRate()  # sizes a lone transfer's frames before an estimate
        self.stats = collections.Counter()

    async def __aenter__(self) -> "TransferClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- connections ----------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open every connection (concurrently) and start sending; fails only if none can be opened."""
        self._set_pacing(self.controller.pacing_rate())  # a fixed rate sizes the sockets' queues
        results = await asyncio.gather(*(self._open(i) for i in range(len(self._conns))), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            raise errors[0]
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                if isinstance(r, (HandshakeError, FingerprintMismatch)):
                    await self.close()
                    raise r
                self._reconnecting[i] = asyncio.create_task(self._reconnect(i))
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._tick())]

    async def _open(self, slot: int) -> ClientConn:
        cc = await open_conn(self, slot)
        self._conns[slot] = cc
        self._wake.set()
        return cc

    async def _reconnect(self, slot: int) -> None:
        delay = 0.05
        try:
            for _ in range(self.config.reconnect_attempts):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                try:
                    await self._open(slot)
                    self.stats["reconnects"] += 1
                    return
                except (HandshakeError, FingerprintMismatch) as exc:
                    self._fail_all(exc)
                    return
                except PeerUnreachable:
                    continue
            if not any(c is not None for c in self._conns) and len(self._reconnecting) <= 1:
                self._fail_all(PeerUnreachable(f"{self.host}:{self.port} unreachable after "
                                               f"{self.config.reconnect_attempts} reconnection attempts"))
        finally:
            self._reconnecting.pop(slot, None)

    def _on_conn_lost(self, cc: ClientConn) -> None:
        cc.registered = False
        if self._conns[cc.slot] is cc:
            self._conns[cc.slot] = None
        for t in self._transfers.values():
            t.release_lane(cc.slot)
        for (tid, part, offset), (_, length, t) in cc.inflight.items():
            t.requeue((part, offset, length))
            self._sched.add(t)
            self.stats["bytes_requeued"] += length
        cc.inflight.clear()
        cc.inflight_bytes = 0
        if not self._closing and cc.slot not in self._reconnecting:
            self._reconnecting[cc.slot] = asyncio.create_task(self._reconnect(cc.slot))
        self._wake.set()

    async def close(self) -> None:
        """Stop sending; unfinished transfers fail with :class:`~kvlink.errors.TransportError`."""
        self._closing = True
        for task in [*self._tasks, *self._reconnecting.values()]:
            task.cancel()
        for cc in self._conns:
            if cc is not None and cc.conn is not None:
                cc.registered = False
                if cc.writer is not None:
                    cc.writer.close()
                cc.conn.transport.close()
        self._fail_all(TransportError("sender closed"))
        await asyncio.gather(*self._tasks, *self._reconnecting.values(), return_exceptions=True)
        for cc in self._conns:
            if cc is not None and cc.writer is not None:
                cc.writer.join()

    # -- transfers ------------------------------------------------------------------------------
    def open(self, parts: int, *, weight: float = 1.0, deadline: float | None = None, rate: float | None = None,
             meta: dict | None = None, transfer_id: int | None = None, verifiable: bool = False) -> OutgoingTransfer:
        """Begin a transfer of ``parts`` parts (e.g. one per layer), fed later with ``add_part``.

        ``weight`` sets its share among concurrent transfers; ``deadline`` (seconds from now) puts
        it ahead of all transfers without one, earliest deadline first; ``rate`` caps it (bits/s);
        ``meta`` (JSON-serialisable, < 60 KiB) reaches the receiver as ``IncomingTransfer.meta``.
        ``verifiable``: every part can be judged whole by the receiver's part verifier (kvlink
        payloads, which carry their own checksums); to a receiver that verifies parts, its chunks
        then go without xxh3 (``TransportConfig.chunk_checksums=None``), so each byte is hashed
        once, at the receiver.
        """
        if self._closing:
            raise TransportError("sender closed")
        meta = dict(meta or {})
        if len(hs.encode(meta)) > 60 << 10:
            raise ConfigError("transfer meta must encode to less than 60 KiB of JSON")
        if transfer_id is not None and (transfer_id in self._transfers or not 0 < transfer_id < 1 << 64):
            raise ConfigError(f"transfer id {transfer_id} is in use or out of range")
        t = OutgoingTransfer(self, transfer_id, parts, self.config.grid_bytes, weight, deadline, rate, meta,
                             self._on_ready)
        t.verifiable = verifiable
        self._transfers[t.transfer_id] = t
        self.stats["transfers"] += 1
        return t

    def _run_bytes(self) -> int:
        """Largest frame now (:func:`~kvlink.transport.frame_size.run_bytes`)."""
        return frame_size.run_bytes(self.config.grid_bytes, self._frame_cap(), self._rate(), self._bucket is not None,
                                    self._lone_early(), self._early.rate())

    def _lone_early(self) -> bool:
        """One transfer on this client and no rate estimate yet (not even a stale one)."""
        return len(self._transfers) <= 1 and self.controller.bottleneck is None

    def _frame_cap(self) -> int:
        """The largest frame every connected receiver takes: ``chunk_bytes``, or less where a
        receiver announced a smaller ``max_chunk`` at the handshake."""
        cap = self.config.chunk_bytes
        for cc in self._conns:
            if cc is not None and cc.max_chunk:
                cap = min(cap, cc.max_chunk)
        grid = self.config.grid_bytes
        return max(grid, cap // grid * grid)

    def _rate(self) -> float | None:
        """Bytes/s to size frames and queues by: the pacing rate, else the bottleneck estimate."""
        return self._bucket.rate if self._bucket is not None else self.controller.bottleneck

    def _lowat(self) -> int:
        """Unsent bytes each socket may hold: ~1 ms of data at the current rate, 1-8 MiB."""
        return max(NOTSENT_LOWAT, min(MAX_NOTSENT_LOWAT, int((self._rate() or 0) * 0.001) >> 16 << 16))

    async def send(self, parts: list, **kwargs) -> OutgoingTransfer:
        """Open a transfer, add every part, wait for the receiver to verify it; returns it (stats)."""
        t = self.open(len(parts), **kwargs)
        for i, part in enumerate(parts):
            t.add_part(i, part)
        await t.done()
        return t

    def _on_ready(self, t: OutgoingTransfer) -> None:
        self._sched.add(t)
        self._wake.set()

    def _drop(self, t: OutgoingTransfer) -> None:
        self._transfers.pop(t.transfer_id, None)
        self._sched.remove(t)
        for cc in self._conns:
            if cc is None:
                continue
            cc.announced.pop(t.transfer_id, None)  # nothing per transfer outlives it
            for key in [k for k in cc.inflight if k[0] == t.transfer_id]:
                cc.inflight_bytes -= cc.inflight.pop(key)[1]
        self._wake.set()

    def _fail(self, t: OutgoingTransfer, error: KvlinkError, tell_peer: bool = True) -> None:
        if tell_peer:
            self._cancel(t)
        self._drop(t)
        t.fail(error)

    def _fail_all(self, error: KvlinkError) -> None:
        for t in list(self._transfers.values()):
            self._fail(t, error, tell_peer=False)

    def _cancel(self, t: OutgoingTransfer) -> None:
        for cc in self._conns:
            if cc is not None and cc.registered and t.transfer_id in cc.announced:
                cc.send(FrameType.CANCEL, transfer_id=t.transfer_id)
                break
        self._drop(t)

    # -- events from connections ----------------------------------------------------------------
    def _on_acks(self, cc: ClientConn, entries, nack: bool) -> None:
        now = time.monotonic()
        cc.last_ack = now
        for tid, part, length, offset in entries:
            record = cc.inflight.pop((tid, part, offset), None)
            if record is not None:
                cc.inflight_bytes -= record[1]
            t = self._transfers.get(tid)
            if t is None:
                continue
            if nack:
                self.stats["chunks_nacked"] += 1
                self.controller.on_nack()
                t.retries[(part, offset)] += 1
                if t.retries[(part, offset)] > self.config.chunk_retries:
                    self._fail(t, TransferFailed(f"transfer {tid:#x}: chunk {offset} of part {part} failed its "
                                                 f"checksum {t.retries[(part, offset)]} times"))
                    continue
                # A NACK for bytes already acknowledged rejects a whole part (its verifier failed).
                t.requeue((part, offset, length), unack=record is None, max_run=self._frame_cap())
                self._sched.add(t)
            elif t.acked(part, offset, length):
                self._early.acked(length)
                self.controller.on_ack(length, now - record[0] if record is not None else None)
        self._wake.set()

    def _on_end(self, tid: int) -> None:
        t = self._transfers.get(tid)
        if t is not None:
            self._drop(t)
            t.finish()
            self.stats["transfers_done"] += 1

    def _on_error(self, cc: ClientConn, tid: int, error: KvlinkError) -> None:
        t = self._transfers.get(tid)
        if t is not None:
            self._fail(t, error, tell_peer=False)
        elif tid == 0:
            cc.conn.abort(error)

    def _on_peer_cancel(self, tid: int) -> None:
        from kvlink.errors import TransferCancelled

        t = self._transfers.get(tid)
        if t is not None:
            self._fail(t, TransferCancelled(f"transfer {tid:#x} cancelled by the receiver"), tell_peer=False)

    # -- sending --------------------------------------------------------------------------------
    def _free_conn(self) -> ClientConn | None:
        window, chunk = self.config.window_bytes, self._frame_cap()
        run, lone = self._run_bytes(), self._lone_early()
        best = None
        n = len(self._conns)
        for k in range(n):
            cc = self._conns[(self._rr + k) % n]
            if cc is not None and cc.usable and cc.inflight_bytes + chunk <= window \
                    and frame_size.has_room(cc.backlog, cc.frames, run, lone):
                if best is None or cc.inflight_bytes < best.inflight_bytes:
                    best = cc
        self._rr = (self._rr + 1) % n
        return best

    async def _dispatch(self) -> None:
        while True:
            cc = self._free_conn()
            if cc is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            t, chunk, wait = self._sched.pick(self._run_bytes(), lane=cc.slot)
            if t is None:
                # A connection is free and nothing can go: the application, not the path, limits.
                self.controller.on_app_limited()
                self._wake.clear()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await self._wake.wait()
                continue
            self.controller.on_busy()
            if self._bucket is not None:
                self._bucket.reserve(chunk[2])
                # Wait out the debt in short slices: a rate raised meanwhile shortens the wait.
                while self._bucket is not None and (delay := self._bucket.wait_time(0)) > 0:
                    self.controller.on_paced()
                    await asyncio.sleep(min(delay, SAMPLE / 2))
                if not cc.usable or t.error is not None or t.is_done:
                    if t.error is None and not t.is_done:
                        t.resend.appendleft(chunk)
                        self._sched.add(t)
                    continue
            self._send_chunk(cc, t, chunk)

    def _send_chunk(self, cc: ClientConn, t: OutgoingTransfer, chunk: Chunk) -> None:
        part, offset, length = chunk
        tid = t.transfer_id
        announced = cc.announced.get(tid)
        if announced is None:
            cc.send(FrameType.BEGIN, tid, body=hs.encode({"parts": t.num_parts, "chunk": t.chunk,
                                                          "weight": t.weight, "meta": t.meta}))
            announced = cc.announced[tid] = 0
        if not t.announced_on(part, announced):
            # Announce every part added so far, many per frame (the receiver handles each PART
            # frame with a hop to its event loop, so one per part per connection adds up), in
            # frames of bounded size (thousands of parts would overflow one control frame).
            while announced < t.parts_added:
                pairs = t.announcement(announced)
                cc.send(FrameType.PART, tid, stream=pairs[0][0], body=hs.encode({"parts": pairs}))
                announced += len(pairs)
            cc.announced[tid] = announced
        now = time.monotonic()
        self._early.sent()
        if not cc.inflight:
            cc.last_ack = now  # the progress clock runs only while something is unacknowledged
        cc.inflight[(tid, part, offset)] = (now, length, t)
        cc.inflight_bytes += length
        t.bytes_sent += length
        self.stats["bytes_sent"] += length
        self.stats["frames_sent"] += 1
        cc.send_data(t, part, offset, t.pieces(chunk), cc.checks(t.verifiable))

    # -- control loop ---------------------------------------------------------------------------
    async def _tick(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(SAMPLE)
            now = time.monotonic()
            poll_tcp_info(self._conns, self.controller)
            rate = self.controller.tick(sum(c.inflight_bytes for c in self._conns if c is not None))
            self._set_pacing(rate)
            lowat = self._lowat()
            for cc in self._conns:
                if cc is not None:
                    cc.set_lowat(lowat)
            for cc in self._conns:
                if cc is not None and cc.inflight and now - cc.last_ack > cfg.progress_timeout:
                    self.stats["stalled_connections"] += 1
                    cc.conn.abort(TransportError("no acknowledgement within progress_timeout"))
            # A peer that accepts connections but stops acknowledging would otherwise be retried
            # for ever: a transfer with bytes out and no progress through every reconnection fails.
            stall_limit = cfg.progress_timeout * (cfg.reconnect_attempts + 1)
            for t in list(self._transfers.values()):
                if cfg.transfer_timeout is not None and now - t.opened > cfg.transfer_timeout:
                    self._fail(t, TransferTimeout(f"transfer {t.transfer_id:#x} not done after "
                                                  f"{cfg.transfer_timeout} s"))
                elif t.bytes_sent > t.bytes_acked and now - t.last_progress > stall_limit:
                    self._fail(t, TransferTimeout(f"transfer {t.transfer_id:#x}: no acknowledgement for "
                                                  f"{now - t.last_progress:.1f} s across reconnections"))
            for slot, cc in enumerate(self._conns):
                if cc is None and slot not in self._reconnecting and self._transfers and not self._closing:
                    self._reconnecting[slot] = asyncio.create_task(self._reconnect(slot))

    def _set_pacing(self, rate: float | None) -> None:
        self._bucket = repace(self._bucket, rate, self.config.burst_bytes, self.config.grid_bytes)

    def snapshot(self) -> LinkSnapshot:
        """The rate controller's current view of the link (what a scheduler reads)."""
        return self.controller.snapshot()

    @property
    def live_connections(self) -> int:
        return sum(c is not None and c.registered for c in self._conns)
