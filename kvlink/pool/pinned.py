"""Reads that leave entries where they are: views of host-tier pages, pinned until released.

What an engine's :meth:`~kvlink.engine.decode.DecodeSide.load_from_pool` and the daemon's gets
use: a host-tier entry is read in place (no copy, no allocation), and an entry found only on SSD
is read straight into host-tier pages reserved for it, which then become its promoted copy. Only
when the host tier has no room even after eviction (or the top tier is a GPU) does an entry get a
buffer of its own.
"""

from __future__ import annotations

import concurrent.futures

from kvlink.errors import ChecksumMismatch, EntryMissing, KvlinkError, PoolError
from kvlink.pool.index import PrefixHit
from kvlink.pool.readahead import ReadAhead


class PinnedReads:
    """Mixed into :class:`~kvlink.pool.pool.Pool`, whose state it works on (``index``,
    ``levels``, ``policies``, ``ssd``, ``stats``, ``_lock``, ``_pending``) and whose methods it
    calls (``_read``, ``_ssd_failure``, ``_put_level``, ``evict``, ``landing``)."""

    def pin_views(self, keys: list[tuple[str, bytes]], background: bool = False):
        """Entries by (kind, key) without copying: for each, a list of buffers (pages in a host
        tier; for an SSD-only entry, the host pages it was just read and promoted into; else a
        buffer of its own) or None if absent; plus ``release()``, to call once the buffers are no
        longer used (until then the entries cannot be evicted). With ``background`` the SSD-only
        entries are read in order by a reader thread and come as futures of the same (so the
        caller uses the first while the next are read); ``release()`` waits for them. Raises
        :class:`PoolError` for an unknown kind (before pinning anything)."""
        from kvlink.pool.pool import tier_key

        out, pinned, slow = [], [], []
        tkeys = [tier_key(kind, key) for kind, key in keys]
        with self._lock:
            for (kind, key), tkey in zip(keys, tkeys):
                entry = self.index.entry(kind, key)
                if entry is None:
                    out.append(None)
                    continue
                entry.pins += 1
                pinned.append(entry)
                if not self._views_in_memory(tkey, out):
                    slow.append(len(out))
                    out.append(tkey)
        def land(tkey: bytes):
            try:
                # strict: a corrupt entry is counted and forgotten here, not read a second time
                # (by then it is gone from the SSD, and would only be reported missing).
                return self._land_from_ssd(tkey, strict=True) or [self._read(tkey)]
            except KvlinkError:  # lost, corrupt or unreadable: absent to the caller
                return None

        futures: list = []

        def release() -> None:
            concurrent.futures.wait(futures)  # no reader still writes into pages it pinned
            with self._lock:
                for entry in pinned:
                    entry.pins -= 1
                pinned.clear()

        try:
            self._land_all(out, slow, background, land, futures)
        except BaseException:
            release()  # nothing stays pinned for a caller that never gets release()
            raise
        return out, release

    def _land_all(self, out: list, slow: list, background: bool, land, futures: list) -> None:
        if background and slow:
            reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvlink-pool-read")
            for i in slow:
                out[i] = reader.submit(land, out[i])
                futures.append(out[i])
            reader.shutdown(wait=False)  # the thread ends once the queue is read
        else:
            for i in slow:
                out[i] = land(out[i])

    def pin_hit(self, hit: PrefixHit, background: bool = False):
        """Every entry of ``hit`` as :meth:`pin_views` gives them, ``({(kind, key): buffers},
        release)``. Raises :class:`EntryMissing` (pinning nothing) when one is gone: look up again.
        With ``background``, SSD-only entries are futures (resolving to None when the entry was
        lost meanwhile)."""
        keys = hit.keys()
        views, release = self.pin_views(keys, background)
        if any(v is None for v in views):
            release()
            raise EntryMissing(f"an entry of this {hit.tokens}-token hit is no longer in the pool; look up again")
        return dict(zip(keys, views)), release

    def _views_in_memory(self, tkey: bytes, out: list) -> bool:
        """Append the entry's page views if a host tier holds it (caller holds the lock)."""
        for level, (name, tier) in enumerate(self.levels):
            if tkey in tier and tier.device.type == "cpu":
                out.append(tier.views(tkey))
                self.policies[level].touch(tkey)
                self.stats[f"hit_{name}"] += 1
                return True
        return False

    def _land_from_ssd(self, tkey: bytes, strict: bool = False):
        """Read an entry that only the SSD holds into host pages reserved for it and adopt them
        (its promotion, with no copy); their views, or None to leave it to ``_read`` (not on SSD
        only, no room, or the read failed: ``_read`` reports that). ``strict``: a failed read
        raises what ``_read`` would (the entry is gone from the SSD by then: a second read could
        only say it is missing)."""
        if self.ssd is None or self.levels[0][1].device.type != "cpu":
            return None  # a GPU top tier has no landings: evicting from it would only demote others
        with self._lock:
            out: list = []
            if self._views_in_memory(tkey, out):  # promoted meanwhile
                return out[0]
            if any(tkey in tier for _, tier in self.levels) or tkey in self._pending:
                return None
            nbytes = self.ssd.entry_size(tkey)
            if nbytes is None:
                return None
            landing = self.landing(nbytes)
            if landing is None and self.evict(nbytes):
                landing = self.landing(nbytes)
        if landing is None:
            return None
        try:
            self.ssd.get(tkey, out=landing.view)
            with self._lock:
                if tkey in self.levels[0][1] or not self._put_level(0, tkey, landing):
                    return None
                self.stats["hit_ssd"] += 1
                self.stats["promoted_in_place"] += 1
                return self.levels[0][1].views(tkey)
        except (EntryMissing, ChecksumMismatch, PoolError) as exc:
            if strict:
                raise self._ssd_failure(tkey, exc) from exc
            return None
        finally:
            landing.release()  # a no-op once adopted

    def _land_ahead(self, tkeys: list[bytes]) -> dict[bytes, concurrent.futures.Future]:
        """Land the SSD-only entries ``tkeys`` in host pages, in order, on a reader thread, so a
        caller copying them out (``Pool.fetch(hit, out=)``) copies one while the next is read;
        read-ahead as :class:`~kvlink.pool.readahead.ReadAhead` does. Each future resolves to
        the views once the entry is in the host tier, to None when it is left to ``_read`` (no
        room), or raises what ``_read`` would (:class:`EntryMissing`, :class:`PoolError`).
        Cancel and wait for the futures before unpinning the entries."""
        if not tkeys:
            return {}
        ahead = ReadAhead(self.ssd, tkeys)

        def land(tkey: bytes):
            ahead.before(tkey)
            return self._land_from_ssd(tkey, strict=True)

        reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvlink-pool-read")
        futures: dict[bytes, concurrent.futures.Future] = {}
        try:
            for tkey in tkeys:
                futures[tkey] = reader.submit(land, tkey)
        except BaseException:
            for future in futures.values():
                future.cancel()
            concurrent.futures.wait(list(futures.values()))  # none lands once the caller unpins
            raise
        finally:
            reader.shutdown(wait=False)  # the thread ends once the queue is read
        return futures
