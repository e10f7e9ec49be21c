"""The in-process hybrid prefix cache pool: the prefix index over GPU / host / SSD tiers.

Entries (a block's full-attention KV, a block's sliding KV, a state checkpoint) enter the top
memory tier. When a tier is full, its eviction policy picks a victim that is not pinned; the
victim moves down (GPU -> host -> SSD) or, with nowhere to go, leaves the pool (and the index).
Demotions to SSD and promotions after an SSD hit run on a background I/O thread, off the
caller's path; until a demoted entry is on disk it is served from the write queue. With
``write_mode="through"``, :meth:`store` also writes every new entry to SSD before it returns,
so evicting it from memory loses nothing and a crash loses nothing stored; its
:class:`StoreReport` says which entries reached the SSD (a full disk stores them in memory only).
After a restart the index is rebuilt from what the SSD tier holds. An SSD tier that cannot be
opened (damaged index, full or read-only disk) leaves the pool serving its memory tiers, and
:meth:`health` reports it.

Host memory is allocated lazily and charged to a :class:`~kvlink.pool.budget.HostBudget` shared
by every pool of a daemon; ``host_bytes`` is the pool's own quota within it, reserved whole when
the pool is created (so guaranteed) and given back when it is closed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Sequence

from kvlink.config import PoolConfig
from kvlink.errors import ChecksumMismatch, ConfigError, EntryMissing, PoolError, TierUnavailable
from kvlink.pool.budget import HostBudget
from kvlink.pool.eviction import make_policy
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit, PrefixIndex, checkpoint_positions
from kvlink.pool.readahead import ReadAhead
from kvlink.pool.pinned import PinnedReads
from kvlink.pool.report import StoreReport
from kvlink.pool.slab import Landing, SlabTier
from kvlink.pool.ssd import SsdTier
from kvlink.pool.ssd_traffic import SsdTraffic, entry_nbytes
from kvlink.spec import CacheSpec

_CODES = {FULL: b"F", SLIDING: b"W", STATE: b"S"}
_KINDS = {v: k for k, v in _CODES.items()}


def _bytes_of(data):
    """What the SSD tier writes for a piece: a landing's filled view, else the value itself."""
    return data.view if isinstance(data, Landing) else data


def tier_key(kind: str, key: bytes) -> bytes:
    code = _CODES.get(kind)
    if code is None:
        raise PoolError(f"unknown entry kind {kind!r}")
    return code + key


class Pool(SsdTraffic, PinnedReads):
    """A prefix cache pool for one layout. Thread-safe; every method returns promptly except
    :meth:`drain` (waits for background SSD work) and :meth:`close`. ``budget``: the host
    memory shared with other pools (None: this pool's ``host_bytes`` alone bounds it). Raises
    :class:`~kvlink.errors.ResourceLimit` when ``budget`` cannot guarantee this pool's quota
    (the live pools' quotas would exceed it)."""

    def __init__(self, spec: CacheSpec, config: PoolConfig | None = None, budget: HostBudget | None = None):
        self.config = cfg = config or PoolConfig()
        # The host tier charges at most its whole pages of host_bytes: that much is reserved now.
        self._quota = cfg.host_bytes // cfg.page_bytes * cfg.page_bytes if budget is not None else 0
        self._budget = budget
        if budget is not None:
            budget.reserve_quota(self._quota)
        try:
            self._open(spec, cfg, budget)
        except BaseException:
            self._give_back_quota()
            raise

    def _open(self, spec: CacheSpec, cfg: PoolConfig, budget: HostBudget | None) -> None:
        self.index = PrefixIndex(spec, cfg.block_size, cfg.namespace, cfg.checkpoint_every)
        self.levels: list[tuple[str, SlabTier]] = []
        if cfg.gpu_bytes:
            self.levels.append(("gpu", SlabTier(cfg.gpu_bytes, cfg.page_bytes, device=cfg.gpu_device,
                                                chunk_bytes=cfg.chunk_bytes)))
        self.levels.append(("host", SlabTier(cfg.host_bytes, cfg.page_bytes, chunk_bytes=cfg.chunk_bytes,
                                             budget=budget)))
        self.policies = [make_policy(cfg.policy, tier.capacity) for _, tier in self.levels]
        self._errors: dict[str, str | None] = {name: None for name, _ in self.levels}  # tier -> last failure
        self.ssd = None
        if cfg.ssd_dir:
            self._errors["ssd"] = None
            try:
                self.ssd = SsdTier(cfg.ssd_dir, cfg.ssd_bytes, cfg.ssd_durable, cfg.ssd_segment_bytes)
            except TierUnavailable as exc:  # serve the memory tiers; health() says why SSD is off
                self._errors["ssd"] = str(exc)
        self._lock = threading.RLock()
        # Called as on_change(op, kind, key, nbytes, tier) with op "add" or "remove" whenever the
        # index gains or loses an entry, under the pool's lock: it must only queue (the global
        # index's publisher sets it).
        self.on_change = None
        self._start_io()
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
        """Tiers holding an entry (for stats and tests). Raises :class:`PoolError` for an unknown kind."""
        tkey = tier_key(kind, key)
        with self._lock:
            out = [name for name, tier in self.levels if tkey in tier]
            if tkey in self._pending or (self.ssd is not None and tkey in self.ssd):
                out.append("ssd")
            return out

    def held(self) -> list[tuple[str, bytes, int, str]]:
        """``(kind, key, nbytes, tier)`` of every entry (its highest tier): what the global index
        is told when it has to be told everything again."""
        with self._lock:
            out = []
            for e in self.index.entries():
                tiers = self.where(e.kind, e.key)
                out.append((e.kind, e.key, e.nbytes, tiers[0] if tiers else "ssd"))
            return out

    # -- storing ----------------------------------------------------------------------------------
    def landing(self, nbytes: int) -> Landing | None:
        """Room in the top memory tier for an entry about to arrive (None when it is not a host
        tier or has no adjacent free pages): fill ``landing.view`` and pass the landing to
        :meth:`store` as the piece's value; it is then kept without a copy. ``release()`` it
        afterwards in every case (a no-op once stored)."""
        return self.levels[0][1].reserve(nbytes)

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        """Token positions in ``(start, end]`` where the pool wants a state checkpoint (hybrid
        models): every ``checkpoint_every`` blocks and the last block boundary. An engine whose
        sequence reaches one hands the state over (``DecodeSide.store_state``); empty when the
        layout has no state."""
        if not self.index.needs_state:
            return []
        return checkpoint_positions(self.config.block_size, self.config.checkpoint_every, end, start)

    def store(self, tokens: Sequence[int], pieces: dict[tuple[str, int], object]) -> StoreReport:
        """Store ``{(kind, block index): bytes}`` of a prompt (a value may be a list of buffers,
        stored back to back, a CPU or device tensor, or a filled :meth:`landing`); returns a
        :class:`StoreReport` of exactly what was kept and where. Raises :class:`PoolError` for a
        piece that does not fit the prompt or is not bytes (nothing is stored then)."""
        keys = self.index.hashes(tokens)
        sizes = {}
        for (kind, block), data in pieces.items():  # all checked before anything is stored
            if kind not in _CODES or not 0 <= block < len(keys):
                raise PoolError(f"piece ({kind!r}, {block}) does not fit a prompt of {len(keys)} full blocks")
            try:
                sizes[(kind, block)] = entry_nbytes(data)
            except (TypeError, ValueError) as exc:
                raise PoolError(f"piece ({kind!r}, {block}) is not bytes: {exc}") from None
        report = StoreReport()
        on_ssd: dict[tuple[str, int], bool] = {}
        if self.config.write_mode == "through" and self.ssd is not None:
            # Write-through: every new piece goes to disk first, as one group commit (one sync
            # for the whole call, outside the lock so readers are not held up by the disk). Landed
            # bytes must go first anyway: once their pages join the tier, an eviction could hand
            # them to another entry while the disk write still reads them.
            new = [(kind, block) for kind, block in pieces if not self.index.has(kind, keys[block])]
            flags = self._ssd_put_many([(tier_key(kind, keys[block]), _bytes_of(pieces[(kind, block)]))
                                        for kind, block in new], report)
            on_ssd = dict(zip(new, flags))
        for (kind, block), data in pieces.items():
            key, nbytes = keys[block], sizes[(kind, block)]
            tkey = tier_key(kind, key)
            with self._lock:
                if self.index.has(kind, key):
                    continue
                if not self._put_level(0, tkey, data):
                    self.stats["store_refused"] += 1
                    report.failed += 1
                    report.error(f"{self.levels[0][0]}: no room within the pool's quota or the host budget")
                    if on_ssd.get((kind, block)):  # not indexed, so nothing would ever find it
                        self._ssd_delete(tkey)
                    continue
                self.index.add(kind, key, nbytes, block)
                report.stored += 1
                if self.on_change is not None:
                    self.on_change("add", kind, key, nbytes, self.levels[0][0])
            report.on_ssd += on_ssd.get((kind, block), False)
        return report

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
        policy.admit(tkey, entry_nbytes(data))
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
            if self.on_change is not None:
                self.on_change("remove", _KINDS[tkey[:1]], tkey[1:], 0, "")

    # -- fetching ---------------------------------------------------------------------------------
    def fetch(self, hit: PrefixHit, out=None) -> dict[tuple[str, bytes], memoryview]:
        """The bytes of every entry of ``hit``, keyed by (kind, key), each verified. ``out``: a
        writable buffer of at least :meth:`hit_nbytes` bytes the entries are read into, back to
        back (reuse it from fetch to fetch: nothing is allocated); without it each entry gets a
        buffer of its own. Entries found only on SSD are promoted to memory. Raises
        :class:`EntryMissing` when an entry was evicted or lost meanwhile (look up again),
        :class:`PoolError` when one failed verification on SSD or could not be read (it is
        dropped), :class:`ConfigError` for an ``out`` too small or read-only."""
        wanted = hit.keys()
        with self._lock:
            try:
                lease = self.index.pin(hit)
            except KeyError:
                raise EntryMissing(f"an entry of this {hit.tokens}-token hit was evicted since the lookup; "
                                   "look up again") from None
            sizes = [self.index.entry(kind, key).nbytes for kind, key in wanted]
        landed: dict = {}
        try:
            view = None
            if out is not None:
                view = memoryview(out).cast("B")
                if view.readonly or view.nbytes < sum(sizes):
                    raise ConfigError(f"fetch needs a writable buffer of {sum(sizes)} bytes, got "
                                      f"{'a read-only one of ' if view.readonly else ''}{view.nbytes}")
            ahead = None
            if self.ssd is not None:  # read ahead the entries only the SSD holds
                with self._lock:
                    cold = [t for t in (tier_key(k, key) for k, key in wanted)
                            if not any(t in tier for _, tier in self.levels) and t not in self._pending]
                if view is not None and self.levels[0][1].device.type == "cpu":
                    # A reader thread lands them in host pages (their promotion) while this one
                    # copies the previous entries out: reading them into `out` here, then copying
                    # each into the host tier, ran at half a plain read's speed.
                    landed = self._land_ahead(cold)
                else:
                    ahead = ReadAhead(self.ssd, cold)
            got, at = {}, 0
            for (kind, key), nbytes in zip(wanted, sizes):
                tkey = tier_key(kind, key)
                counted = False
                if tkey in landed:  # in the host tier now (hit counted), or None: _read reads it itself
                    counted = landed[tkey].result() is not None
                elif ahead is not None:
                    ahead.before(tkey)
                got[(kind, key)] = self._read(tkey, None if view is None else view[at: at + nbytes], counted)
                at += nbytes
            return got
        finally:
            for future in landed.values():
                future.cancel()
            concurrent.futures.wait(list(landed.values()))  # nothing lands into unpinned entries
            with self._lock:
                lease.release()

    def hit_nbytes(self, hit: PrefixHit) -> int:
        """Bytes of every entry of ``hit`` (what :meth:`fetch`'s ``out`` must hold); raises
        :class:`EntryMissing` when one is gone."""
        wanted = hit.keys()
        with self._lock:
            entries = [self.index.entry(kind, key) for kind, key in wanted]
        if any(e is None for e in entries):
            raise EntryMissing(f"an entry of this {hit.tokens}-token hit is no longer in the pool; look up again")
        return sum(e.nbytes for e in entries)

    def _read(self, tkey: bytes, out: memoryview | None = None, counted: bool = False) -> memoryview:
        """One entry's bytes: into ``out`` (exactly its size) when given, else a buffer of its own.
        ``counted``: its hit was counted already (landed from SSD for this read)."""
        with self._lock:
            for level, (name, tier) in enumerate(self.levels):
                if tkey in tier:
                    try:
                        # Memory is trusted (ECC); checksums guard what crosses a disk or a wire.
                        data = tier.get(tkey, out=out, verify=self.config.verify_memory)
                    except ChecksumMismatch:
                        self.policies[level].remove(tkey)
                        self.stats["corrupt"] += 1
                        continue
                    self.policies[level].touch(tkey)
                    self.stats[f"hit_{name}"] += not counted
                    return out if out is not None else memoryview(data.numpy())
            pending = self._pending.get(tkey)
            if pending is not None:
                self.stats["hit_queue"] += 1
                if out is None:
                    return memoryview(pending)
                out[:] = memoryview(pending).cast("B")
                return out
        if self.ssd is None or tkey not in self.ssd:
            with self._lock:
                self._forget(tkey)
            raise EntryMissing(f"entry {tkey.hex()[:18]} is no longer in the pool; look up again")
        try:
            data = self.ssd.get(tkey, out=out)
        except (EntryMissing, ChecksumMismatch, PoolError) as exc:
            raise self._ssd_failure(tkey, exc) from exc
        with self._lock:
            self.stats["hit_ssd"] += 1
        if out is None:
            self._background(self._promote, tkey, data)  # a fresh buffer: no copy needed
        else:
            self._promote(tkey, data)  # the caller reuses `out`: the promotion copies it now (memory speed)
        return data

    def _ssd_failure(self, tkey: bytes, exc: Exception) -> EntryMissing | PoolError:
        """Forget an entry whose SSD read failed; the error for the caller."""
        with self._lock:
            self._forget(tkey)
            if isinstance(exc, EntryMissing):  # evicted since it was looked up
                return EntryMissing(f"entry {tkey.hex()[:18]} is no longer in the pool; look up again")
            self.stats["corrupt"] += 1
            return PoolError(f"entry {tkey.hex()[:18]} failed verification and was dropped: {exc}")

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

    def health(self) -> dict[str, dict]:
        """Tier name -> ``{"ok": bool, "error": str | None}``: an SSD tier that could not be
        opened, or whose last write failed (full disk, I/O error), is not ok."""
        with self._lock:
            return {name: {"ok": error is None, "error": error} for name, error in self._errors.items()}

    def summary(self) -> dict:
        health = self.health()
        with self._lock:
            out = {"index": self.index.stats(), "counters": dict(self.stats),
                   "tiers": {name: {"used": tier.used_bytes, "capacity": tier.capacity, "entries": len(tier),
                                    "allocated": tier.allocated_bytes, "landed": tier.stats["adopted"],
                                    **health[name]}
                             for name, tier in self.levels}}
            if self.ssd is not None:
                out["tiers"]["ssd"] = {"used": self.ssd.used_bytes, "capacity": self.ssd.capacity,
                                       "entries": len(self.ssd), "queued": len(self._pending),
                                       "disk": self.ssd.disk_bytes, **health["ssd"]}  # disk: live + dead bytes
                out["counters"].update({f"ssd_tier_{k}": v for k, v in self.ssd.stats.items()})
            elif "ssd" in health:  # configured, but it could not be opened
                out["tiers"]["ssd"] = {"entries": 0, **health["ssd"]}
            return out

    def close(self) -> None:
        self.drain()
        self._io.shutdown(wait=True)
        if self.ssd is not None:
            self.ssd.close()
        for _, tier in self.levels:
            tier.close()  # memory and its share of the host budget go back
        self._give_back_quota()

    def _give_back_quota(self) -> None:
        budget, self._budget = self._budget, None  # once, however often close() is called
        if budget is not None:
            budget.release_quota(self._quota)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
