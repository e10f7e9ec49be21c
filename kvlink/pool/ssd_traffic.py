"""The pool's traffic with its SSD tier, apart from the tiers' bookkeeping in :mod:`~kvlink.pool.pool`:
synchronous puts (write-through: one group commit per store) that make room first, and one
background I/O thread for demotions to SSD and promotions after an SSD hit, its queue bounded by
``PoolConfig.io_queue``.
Entries on their way to disk stay readable from ``_pending`` until they are there.
"""

from __future__ import annotations

import concurrent.futures

from kvlink.errors import KvlinkError
from kvlink.pool.report import StoreReport
from kvlink.pool.slab import Landing


def entry_nbytes(data) -> int:
    """Bytes of an entry value: a landing, bytes-like, a tensor, or a list of them back to back."""
    if isinstance(data, Landing):
        return data.nbytes
    if isinstance(data, (list, tuple)):  # buffers stored back to back (e.g. Payload.buffers())
        return sum(entry_nbytes(d) for d in data)
    if hasattr(data, "element_size"):
        return data.numel() * data.element_size()
    return memoryview(data).nbytes


class SsdTraffic:
    """Mixed into :class:`~kvlink.pool.pool.Pool`, whose state it works on: ``ssd``, ``config``,
    ``levels``, ``stats``, ``_lock``, ``_errors`` and the index callbacks ``_forget``,
    ``_pinned`` and ``_put_level``. Kept apart so each module keeps one concern."""

    def _start_io(self) -> None:
        self._pending: dict[bytes, object] = {}  # tier key -> bytes on their way to SSD
        self._futures: set[concurrent.futures.Future] = set()
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvlink-pool-io")

    def _background(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the I/O thread; :meth:`drain` waits for it."""
        fut = self._io.submit(fn, *args)
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)

    def _to_ssd(self, tkey: bytes, data) -> None:
        if len(self._futures) >= self.config.io_queue:
            self.stats["ssd_queue_full"] += 1
            self._forget(tkey)
            return
        self._pending[tkey] = data
        self._background(self._write_ssd, tkey, data)

    def _write_ssd(self, tkey: bytes, data) -> None:
        ok = self._ssd_put(tkey, data)
        with self._lock:
            self._pending.pop(tkey, None)
            if not ok:
                self._forget(tkey)

    def _ssd_put(self, tkey: bytes, data, report: StoreReport | None = None) -> bool:
        """Put one entry on SSD (see :meth:`_ssd_put_many`)."""
        return self._ssd_put_many([(tkey, data)], report)[0]

    def _ssd_put_many(self, items: list, report: StoreReport | None = None) -> list[bool]:
        """Put ``[(tier key, data)]`` on SSD as one group commit (one sync for them all when
        durable); a full tier first drops its oldest entries (pinned ones are kept), and those no
        other tier holds leave the index. Per item, whether it got there; why not goes to
        ``report`` and to :meth:`health`, never raised (the entries may be in memory)."""
        if not items:
            return []
        flags = [False] * len(items)
        try:
            nbytes = sum(entry_nbytes(data) for _, data in items)
            if not self.ssd.fits(nbytes):
                with self._lock:
                    dropped = self.ssd.make_room(nbytes, keep=self._pinned)
                    for victim in dropped:
                        self._forget(victim)
                    self.stats["ssd_evicted"] += len(dropped)
            flags = self.ssd.put_many([(tkey, data, None) for tkey, data in items])
            if all(flags):
                self._errors["ssd"] = None
                return flags
            error = f"ssd: {self.ssd.last_refusal}"
        except KvlinkError as exc:  # a failing disk: the memory tiers keep serving
            error = f"ssd: {exc}"
        with self._lock:
            self.stats["ssd_refused"] += flags.count(False)
            self._errors["ssd"] = error
        if report is not None:
            report.error(error)
        return flags

    def _ssd_delete(self, tkey: bytes) -> None:
        try:
            self.ssd.delete(tkey)
        except KvlinkError as exc:
            self._errors["ssd"] = f"ssd: {exc}"

    def _promote(self, tkey: bytes, data) -> None:
        with self._lock:
            host = len(self.levels) - 1
            if tkey not in self.levels[host][1] and self._put_level(host, tkey, data):
                self.stats["promoted"] += 1

    def drain(self) -> None:
        """Wait for queued SSD writes and promotions."""
        while self._futures:
            concurrent.futures.wait(list(self._futures))
