"""The SSD tier's space: FIFO eviction of whole segments (:meth:`make_room`) and reclaiming
dead bytes (deleting empty segments, compacting sparse ones). Mixed into
:class:`~kvlink.pool.ssd.SsdTier`, whose state it works on (``_lock``, ``_where``, ``_live``,
``_total``, ``_writing``, ``_segments``, ``_db``, ``stats``); kept apart so each module keeps one
concern."""

from __future__ import annotations

from kvlink.errors import PoolError


class SsdSpace:
    """Space management of an :class:`~kvlink.pool.ssd.SsdTier` (see the module docstring)."""

    def fits(self, nbytes: int) -> bool:
        with self._lock:
            return self._total + nbytes <= self.capacity

    def make_room(self, nbytes: int, keep=None) -> list[bytes]:
        """Drop entries, oldest segment first, until ``nbytes`` more fit the capacity (FIFO
        eviction: a segment holds what was stored around the same time, and it goes whole).
        Entries for which ``keep(key)`` is true (pinned: being read) are moved to the head
        instead. Returns the keys dropped."""
        dropped: list[bytes] = []
        tried: set[int] = set()
        while True:
            with self._lock:
                if self._total + nbytes <= self.capacity:
                    return dropped
                head = self._segments.head()
                old = sorted(s for s in self._segments.sizes() if s != head and not self._writing[s] and s not in tried)
                if not old:
                    return dropped  # what is left is in the segment being written
                seg = old[0]
                tried.add(seg)
                victims = [(k, w) for k, w in self._where.items() if w[0] == seg]
            for key, where in victims:
                if keep is not None and keep(key):
                    self._move(key, seg)
                    continue
                with self._lock:
                    if self._where.get(key) != where:
                        continue  # replaced or deleted meanwhile
                    self._db.delete(key)
                    del self._where[key]
                    self._dead(where)
                    self.stats["evicted"] += 1
                dropped.append(key)
            self._reclaim()

    def _move(self, key: bytes, seg: int) -> bool:
        """Copy an entry still in ``seg`` to the head; False if it is gone, was dropped as
        corrupt, or was replaced or moved meanwhile."""
        try:
            data = self.get(key)
        except PoolError:
            return False
        where = self._where.get(key)
        return where is not None and where[0] == seg and self._put(key, data, None, expect=where)

    def _dead(self, where: tuple[int, int, int]) -> None:
        """Count an entry's bytes out (under the lock)."""
        self._live[where[0]] -= where[2]
        self._total -= where[2]

    def _reclaim(self) -> None:
        """Delete segments without live entries; while dead bytes pass a quarter of the capacity,
        move the live entries of the sparsest segment that is at most half live to the head and
        delete it. Segments being written to are left alone; one thread compacts at a time."""
        tried: set[int] = set()  # a segment whose entries could not all move is not retried
        while True:
            with self._lock:
                head = self._segments.head()
                sizes = self._segments.sizes()
                idle = [s for s in sizes if s != head and not self._writing[s]]
                for seg in [s for s in idle if self._live[s] <= 0]:
                    self._live.pop(seg, None)
                    self._segments.remove(seg)
                    del sizes[seg]
                    self.stats["segments_reclaimed"] += 1
                if self._compacting or sum(sizes.values()) - self._total <= self.capacity // 4:
                    return
                sparse = [s for s in idle if s in sizes and s not in tried and self._live[s] <= sizes[s] // 2]
                if not sparse:
                    return
                seg = min(sparse, key=lambda s: self._live[s] / sizes[s])
                moving = [k for k, w in self._where.items() if w[0] == seg]
                self._compacting = True
                tried.add(seg)
            try:
                for key in moving:
                    if self._move(key, seg):
                        self.stats["entries_compacted"] += 1
            finally:
                with self._lock:
                    self._compacting = False
