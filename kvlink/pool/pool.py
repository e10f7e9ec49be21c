"""The in-process hybrid prefix cache pool: the prefix index over GPU / host / SSD tiers.

Entries (a block's full-attention KV, a block's sliding KV, a state checkpoint) enter the top
memory tier. When a tier is full, its eviction policy picks a victim that is not pinned; the
victim moves down (GPU -> host -> SSD) or, with nowhere to go, leaves the pool (and the index).
Demotions to SSD and promotions after an SSD hit run on a background I/O thread, off the
caller's path; until a demoted entry is on disk it is served from the write queue. With
``write_mode="through"``, :meth:`store` also writes every new entry to SSD before it returns,
so evicting it from memory loses nothing and a crash loses nothing stored. After a restart the index is rebuilt from what the SSD tier holds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Sequence

from kvlink.config import PoolConfig
from kvlink.errors import ChecksumMismatch, PoolError
from kvlink.pool.eviction import make_policy
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit, PrefixIndex
from kvlink.pool.readahead import ReadAhead
from kvlink.pool.slab import Landing, SlabTier
from kvlink.pool.ssd import SsdTier
from kvlink.spec import CacheSpec

_CODES = {FULL: b"F", SLIDING: b"W", STATE: b"S"}
_KINDS = {v: k for k, v in _CODES.items()}


def tier_key(kind: str, key: bytes) -> bytes:
    return _CODES[kind] + key


def _nbytes(data) -> int:
    if isinstance(data, Landing):
        return data.nbytes
    if isinstance(data, (list, tuple)):  # buffers stored back to back (e.g. Payload.buffers())
        return sum(_nbytes(d) for d in data)
    if hasattr(data, "element_size"):
        return data.numel() * data.element_size()
    return memoryview(data).nbytes


class Pool:
    """A prefix cache pool for one layout. Thread-safe; every method returns promptly except
    :meth:`drain` (waits for background SSD work) and :meth:`close`."""

    def __init__(self, spec: CacheSpec, config: PoolConfig | None = None):
        self.config = cfg = config or PoolConfig()
        self.index = PrefixIndex(spec, cfg.block_size, cfg.namespace, cfg.checkpoint_every)
        self.levels: list[tuple[str, SlabTier]] = []
        if cfg.gpu_bytes:
            self.levels.append(("gpu", SlabTier(cfg.gpu_bytes, cfg.page_bytes, device=cfg.gpu_device)))
        self.levels.append(("host", SlabTier(cfg.host_bytes, cfg.page_bytes)))
        self.policies = [make_policy(cfg.policy, tier.capacity) for _, tier in self.levels]
        self.ssd = SsdTier(cfg.ssd_dir, cfg.ssd_bytes, cfg.ssd_durable, cfg.ssd_segment_bytes) if cfg.ssd_dir else None
        self._lock = threading.RLock()
        self._pending: dict[bytes, object] = {}  # tier key -> bytes on their way to SSD
        self._futures: set[concurrent.futures.Future] = set()
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvlink-pool-io")
        self.stats = collections.Counter()
        if self.ssd is not None:
            for tkey in self.ssd.keys():
                if tkey[:1] in _KINDS and len(tkey) == 17:
                    self.index.add(_KINDS[tkey[:1]], tkey[1:], self.ssd.entry_size(tkey))

    # -- queries ----------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest restorable prefix (see :class:`~kvlink.pool.index.PrefixIndex`)."""
        with self._lock:
            return self.index.lookup(tokens)

    def where(self, kind: str, key: bytes) -> list[str]:
        """Tiers holding an entry (for stats and tests)."""
        tkey = tier_key(kind, key)
        with self._lock:
            out = [name for name, tier in self.levels if tkey in tier]
            if tkey in self._pending or (self.ssd is not None and tkey in self.ssd):
                out.append("ssd")
            return out

    # -- storing ----------------------------------------------------------------------------------
    def landing(self, nbytes: int) -> Landing | None:
        """Room in the top memory tier for an entry about to arrive (None when it is not a host
        tier or has no adjacent free pages): fill ``landing.view`` and pass the landing to
        :meth:`store` as the piece's value; it is then kept without a copy. ``release()`` it
        afterwards in every case (a no-op once stored)."""
        return self.levels[0][1].reserve(nbytes)

    def store(self, tokens: Sequence[int], pieces: dict[tuple[str, int], object]) -> int:
        """Store ``{(kind, block index): bytes}`` of a prompt (a value may be a list of buffers,
        stored back to back, or a filled :meth:`landing`); returns how many were new and fit."""
        keys = self.index.hashes(tokens)
        for kind, block in pieces:  # all checked before anything is stored
            if kind not in _CODES or not 0 <= block < len(keys):
                raise PoolError(f"piece ({kind!r}, {block}) does not fit a prompt of {len(keys)} full blocks")
        stored = 0
        through = self.config.write_mode == "through" and self.ssd is not None
        for (kind, block), data in pieces.items():
            key, nbytes = keys[block], _nbytes(data)
            tkey = tier_key(kind, key)
            landed = isinstance(data, Landing)
            if through and landed:
                # Landed bytes go to disk before their pages join the tier, where an eviction
                # could hand them to another entry while the disk write still reads them.
                if self.index.has(kind, key):
                    continue
                self._ssd_put(tkey, data.view)
            with self._lock:
                if self.index.has(kind, key):
                    continue
                if not self._put_level(0, tkey, data):
                    self.stats["store_refused"] += 1
                    continue
                self.index.add(kind, key, nbytes, block)
                stored += 1
            if through and not landed:
                # Write-through is synchronous: once store() returns the entry is on SSD too
                # (outside the lock, so readers are not held up by the disk).
                self._ssd_put(tkey, data)
        return stored

    def _pinned(self, tkey: bytes) -> bool:
        entry = self.index.entry(_KINDS[tkey[:1]], tkey[1:])
        return entry is not None and entry.pins > 0

    def _put_level(self, level: int, tkey: bytes, data) -> bool:
        """Put into memory level ``level``, moving victims down until it fits (caller holds the lock)."""
        name, tier = self.levels[level]
        policy = self.policies[level]
        if isinstance(data, Landing):
            if data.tier is tier:  # already in this tier's pages: keep them
                tier.adopt(tkey, data, hashed=self.config.verify_memory)
                policy.admit(tkey, data.nbytes)
                return True
            data = data.view
        # Digests are only worth computing when memory reads verify them.
        while not tier.put(tkey, data, hashed=self.config.verify_memory):
            victim = policy.victim(self._pinned)
            if victim is None or victim == tkey:
                return False
            self._demote(level, victim)
        policy.admit(tkey, _nbytes(data))
        return True

    def _demote(self, level: int, tkey: bytes) -> None:
        name, tier = self.levels[level]
        try:
            data = tier.get(tkey, verify=self.config.verify_memory)
        except (ChecksumMismatch, PoolError):
            data = None
        tier.delete(tkey)
        self.policies[level].remove(tkey)
        self.stats[f"demoted_from_{name}"] += 1
        if data is None:
            self._forget(tkey)
        elif level + 1 < len(self.levels):
            if not self._put_level(level + 1, tkey, data):
                self._forget(tkey)
        elif self.ssd is not None:
            if tkey not in self.ssd and tkey not in self._pending:
                self._to_ssd(tkey, memoryview(data.numpy()))  # `data` is already our own copy
        else:
            self._forget(tkey)

    def _forget(self, tkey: bytes) -> None:
        """The entry is in no tier any more: drop it from the index."""
        if not self.where(_KINDS[tkey[:1]], tkey[1:]):
            self.index.remove(_KINDS[tkey[:1]], tkey[1:], force=True)
            self.stats["dropped"] += 1

    def _to_ssd(self, tkey: bytes, data) -> None:
        if len(self._futures) >= self.config.io_queue:
            self.stats["ssd_queue_full"] += 1
            self._forget(tkey)
            return
        self._pending[tkey] = data
        fut = self._io.submit(self._write_ssd, tkey, data)
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)

    def _write_ssd(self, tkey: bytes, data) -> None:
        ok = self._ssd_put(tkey, data)
        with self._lock:
            self._pending.pop(tkey, None)
            if not ok:
                self._forget(tkey)

    def _ssd_put(self, tkey: bytes, data) -> bool:
        """Put on SSD; a full tier first drops its oldest entries (pinned ones are kept), and
        those no other tier holds leave the index."""
        nbytes = _nbytes(data)
        if not self.ssd.fits(nbytes):
            with self._lock:
                dropped = self.ssd.make_room(nbytes, keep=self._pinned)
                for victim in dropped:
                    self._forget(victim)
                self.stats["ssd_evicted"] += len(dropped)
        if self.ssd.put(tkey, data):
            return True
        with self._lock:
            self.stats["ssd_refused"] += 1
        return False

    # -- fetching ---------------------------------------------------------------------------------
    def fetch(self, hit: PrefixHit) -> dict[tuple[str, bytes], memoryview]:
        """The bytes of every entry of ``hit``, keyed by (kind, key), each verified. Entries found
        only on SSD are promoted to memory in the background. Raises :class:`PoolError` when an
        entry was lost meanwhile (look up again)."""
        wanted = [(FULL, k) for k in hit.full] + [(SLIDING, k) for k in hit.sliding]
        if hit.state is not None:
            wanted.append((STATE, hit.state))
        with self._lock:
            lease = self.index.pin(hit)
        try:
            ahead = None
            if self.ssd is not None:  # read ahead the entries only the SSD holds
                with self._lock:
                    cold = [t for t in (tier_key(k, key) for k, key in wanted)
                            if not any(t in tier for _, tier in self.levels) and t not in self._pending]
                ahead = ReadAhead(self.ssd, cold)
            out = {}
            for kind, key in wanted:
                tkey = tier_key(kind, key)
                if ahead is not None:
                    ahead.before(tkey)
                out[(kind, key)] = self._read(tkey)
            return out
        finally:
            with self._lock:
                lease.release()

    def pin_views(self, keys: list[tuple[str, bytes]]):
        """Entries by (kind, key) without copying: for each, a list of buffers (pages in a host
        tier, or a fresh buffer read from GPU/SSD) or None if absent; plus ``release()``, to call
        once the buffers are no longer used (until then the entries cannot be evicted)."""
        out, pinned, slow = [], [], []
        with self._lock:
            for kind, key in keys:
                entry, tkey = self.index.entry(kind, key), tier_key(kind, key)
                if entry is None:
                    out.append(None)
                    continue
                entry.pins += 1
                pinned.append(entry)
                for level, (name, tier) in enumerate(self.levels):
                    if tkey in tier and tier.device.type == "cpu":
                        out.append(tier.views(tkey))
                        self.policies[level].touch(tkey)
                        self.stats[f"hit_{name}"] += 1
                        break
                else:
                    slow.append(len(out))
                    out.append(tkey)
        for i in slow:  # GPU or SSD: read into a buffer of its own
            try:
                out[i] = [self._read(out[i])]
            except PoolError:
                out[i] = None

        def release() -> None:
            with self._lock:
                for entry in pinned:
                    entry.pins -= 1
                pinned.clear()

        return out, release

    def _read(self, tkey: bytes) -> memoryview:
        with self._lock:
            for level, (name, tier) in enumerate(self.levels):
                if tkey in tier:
                    try:
                        # Memory is trusted (ECC); checksums guard what crosses a disk or a wire.
                        data = tier.get(tkey, verify=self.config.verify_memory)
                    except ChecksumMismatch:
                        self.policies[level].remove(tkey)
                        self.stats["corrupt"] += 1
                        continue
                    self.policies[level].touch(tkey)
                    self.stats[f"hit_{name}"] += 1
                    return memoryview(data.numpy())
            pending = self._pending.get(tkey)
            if pending is not None:
                self.stats["hit_queue"] += 1
                return memoryview(pending)
        if self.ssd is None or tkey not in self.ssd:
            with self._lock:
                self._forget(tkey)
            raise PoolError(f"entry {tkey.hex()[:18]} is no longer in the pool")
        try:
            data = self.ssd.get(tkey)
        except (ChecksumMismatch, PoolError) as exc:
            with self._lock:
                self.stats["corrupt"] += 1
                self._forget(tkey)
            raise PoolError(f"entry {tkey.hex()[:18]} failed verification and was dropped: {exc}") from exc
        self.stats["hit_ssd"] += 1
        fut = self._io.submit(self._promote, tkey, data)  # a fresh buffer: no copy needed
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return data

    def _promote(self, tkey: bytes, data) -> None:
        with self._lock:
            host = len(self.levels) - 1
            if tkey not in self.levels[host][1] and self._put_level(host, tkey, data):
                self.stats["promoted"] += 1

    # -- maintenance ------------------------------------------------------------------------------
    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` from the top memory tier (victims move down); returns bytes freed."""
        freed = 0
        with self._lock:
            name, tier = self.levels[0]
            while freed < nbytes:
                victim = self.policies[0].victim(self._pinned)
                if victim is None:
                    break
                entry = tier.entry(victim)
                self._demote(0, victim)
                freed += len(entry.pages) * tier.page_bytes if entry else 0
        return freed

    def drain(self) -> None:
        """Wait for queued SSD writes and promotions."""
        while self._futures:
            concurrent.futures.wait(list(self._futures))

    def summary(self) -> dict:
        with self._lock:
            out = {"index": self.index.stats(), "counters": dict(self.stats),
                   "tiers": {name: {"used": tier.used_bytes, "capacity": tier.capacity, "entries": len(tier),
                                    "landed": tier.stats["adopted"]}
                             for name, tier in self.levels}}
            if self.ssd is not None:
                out["tiers"]["ssd"] = {"used": self.ssd.used_bytes, "capacity": self.ssd.capacity,
                                       "entries": len(self.ssd), "queued": len(self._pending),
                                       "disk": self.ssd.disk_bytes}  # live + dead bytes in segments
                out["counters"].update({f"ssd_tier_{k}": v for k, v in self.ssd.stats.items()})
            return out

    def close(self) -> None:
        self.drain()
        self._io.shutdown(wait=True)
        if self.ssd is not None:
            self.ssd.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
