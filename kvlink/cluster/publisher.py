"""A pool daemon's side of the global index: register, heartbeat, publish stores and evictions.

Pools report every index change through ``Pool.on_change`` (under their lock, so it only
queues). A background thread sends the queue in batches every ``publish_interval_s`` and renews
the daemon's heartbeat every third of ``heartbeat_ttl_s``. When the queue overflows, the index is
unreachable, or the heartbeat had lapsed (the daemon's records may have been reaped), the queue
is dropped and everything the pools hold is published again once the index answers: bounded
memory, and the index converges to what the daemon really holds.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from kvlink.config import ClusterConfig
from kvlink.errors import KvlinkError, TierUnavailable

from kvlink.cluster.index import GlobalIndex, Holder

log = logging.getLogger("kvlink.cluster")


class IndexPublisher:
    """Keeps the index in step with one daemon's pools. ``start()`` never fails because of the
    index: a daemon whose index is down serves its own clients and keeps trying."""

    def __init__(self, config: ClusterConfig, host: str, http_port: int, data_port: int):
        self.config = config
        self.host, self.http_port, self.data_port = host, http_port, data_port
        self.name = config.node or f"{host}:{data_port}"
        self.index: GlobalIndex | None = None
        self.holder: Holder | None = None
        self._pools: list = []
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._resync = True
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()
        self._rounds = threading.Condition()  # notified after every publishing round
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvlink-index", daemon=True)
        self._thread.start()

    def attach(self, pool) -> None:
        """Publish ``pool``'s entries now and its changes from now on."""
        with self._lock:
            self._pools.append(pool)
            self._resync = True
        pool.on_change = self._event
        self._wake.set()

    def _event(self, op: str, kind: str, key: bytes, nbytes: int, tier: str) -> None:
        with self._lock:
            if self._resync:
                return  # everything will be published anyway
            if len(self._queue) >= self.config.queue_limit:
                self._queue.clear()
                self._resync = True
                self.stats["overflows"] += 1
                return
            self._queue.append((op, kind, key, nbytes, tier))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what is queued now has been published (tests, shutdown); False on timeout."""
        with self._rounds:
            target = self.stats["rounds"] + 2

            def done() -> bool:
                with self._lock:
                    idle = not self._queue and not self._resync
                return idle and self.stats["rounds"] >= target

            self._wake.set()
            return self._rounds.wait_for(done, timeout)

    def close(self) -> None:
        """Publish what is queued, stop offering this daemon's entries, stop the thread."""
        self.flush(timeout=2.0)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.index is not None:
            try:
                if self.holder is not None:
                    self.index.retire(self.holder)
            except KvlinkError:
                pass
            self.index.close()

    # -- the thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        beat_every = self.config.heartbeat_ttl_s / 3
        next_beat = 0.0
        while not self._stop.is_set():
            try:
                if self.index is None:
                    self.index = GlobalIndex(self.config)
                if self.holder is None:
                    self.holder = self.index.register(self.name, self.config.cluster,
                                                      self.config.advertise_host or self.host,
                                                      self.http_port, self.data_port)
                    log.info("index: registered as %s (id %d, epoch %d) in cluster %s", self.name,
                             self.holder.id, self.holder.epoch, self.config.cluster)
                    next_beat = time.monotonic() + beat_every
                elif time.monotonic() >= next_beat:
                    if not self.index.heartbeat(self.holder):
                        with self._lock:
                            self._queue.clear()
                            self._resync = True
                        self.stats["lapsed"] += 1
                    next_beat = time.monotonic() + beat_every
                self._publish_round()
                self.last_error = None
            except TierUnavailable as exc:
                if self.last_error is None:
                    log.warning("index unreachable, serving locally and retrying: %s", exc)
                self.last_error = str(exc)
                self.stats["errors"] += 1
                with self._lock:
                    self._queue.clear()
                    self._resync = True
                next_beat = 0.0
            with self._rounds:
                self.stats["rounds"] += 1
                self._rounds.notify_all()
            self._wake.wait(self.config.publish_interval_s)
            self._wake.clear()

    def _publish_round(self) -> None:
        with self._lock:
            resync, self._resync = self._resync, False
            if resync:
                self._queue.clear()
            pools = list(self._pools)
        if resync:
            for pool in pools:
                held = pool.held()
                for i in range(0, len(held), self.config.publish_batch):
                    self.index.publish(self.holder, [("add", k, key, n, tier) for k, key, n, tier in
                                                     held[i: i + self.config.publish_batch]])
                self.stats["published"] += len(held)
            self.stats["resyncs"] += 1
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.config.publish_batch))]
            if not batch:
                return
            try:
                self.index.publish(self.holder, batch)
            except TierUnavailable:
                with self._lock:
                    self._resync = True
                raise
            self.stats["published"] += len(batch)
