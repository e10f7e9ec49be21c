"""The SSD tier: entry bytes appended to segment files, RocksDB (rocksdict, raw mode) as the index.

Measured on this machine, RocksDB writes 4 MiB values at ~0.25 GB/s while plain sequential file
writes run at ~1 GB/s, so values do not go into RocksDB: it keeps what it is good at, a small
durable record per entry (where its bytes are, size, xxh3, time). The bytes are appended to
segment files (:mod:`~kvlink.pool.segments`): entries stored together are read back as one
sequential read.

Crash safety comes from the order of writes: the bytes are appended (and, when durable,
synced), and only then is the index record written. Puts are group-committed
(:meth:`SsdTier.put_many`): a batch's bytes are all written, each segment they touched is synced
once, then one RocksDB write batch records them all, so a durable batch costs one data sync and
one index sync, not one of each per entry. A process killed at any point leaves either
no record (the bytes are dead space in their segment) or a record whose bytes are complete. At
open, records pointing past the end of their segment are dropped. Reads verify the xxh3 and
drop an entry that fails. A full disk (told by errno: :func:`~kvlink.pool.ssd_io.disk_full`)
makes :meth:`put` return False ("not stored"), never raise. An index that cannot be opened
(damaged, full or read-only disk) raises :class:`~kvlink.errors.TierUnavailable`; recovery
deletes only this tier's own segment files (``seg-<n>.kvs``), never another file it finds. No
pickle anywhere: records are a fixed struct.

Space: ``capacity`` bounds the live bytes. Bytes of deleted or replaced entries stay in their
segment until it holds no live entry (then it is deleted) or until dead bytes pass a quarter of
the capacity (then the sparsest segment's live entries are moved to the head and it is deleted).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import xxhash
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from kvlink.errors import ChecksumMismatch, ConfigError, EntryMissing, LengthError, PoolError, TierUnavailable
from kvlink.pool.readahead import READ_AHEAD_BYTES, ReadAhead
from kvlink.pool.segments import SegmentFiles, segment_name
from kvlink.pool.ssd_io import (READ_PIECE, RECORD, RECORD_MAGIC, decode_record, disk_full, encode_record,
                                out_view, read_into, views)
from kvlink.pool.ssd_space import SsdSpace

SEGMENT_BYTES = 256 << 20
# Disk writes of a put are started every this many bytes (see ssd_io.start_writeback).
WRITEBACK_BYTES = 8 << 20
# Bytes per write call, each hashed just before it is written (then copied from cache). Larger
# writes measured slower puts on this VM (docs/pool.md, "SSD tier performance").
WRITE_PIECE = 1 << 20


class SsdTier(SsdSpace):
    """Entries under ``root`` up to ``capacity`` live bytes. ``durable``: sync data and index
    before a put returns (survives power loss, not only process death). ``segment_bytes``: the
    target size of a segment file (at most a quarter of the capacity, at least 64 KiB).
    Raises :class:`TierUnavailable` when the directory or the index cannot be opened."""

    def __init__(self, root: str | os.PathLike, capacity: int, durable: bool = False,
                 segment_bytes: int = SEGMENT_BYTES):
        if capacity <= 0 or segment_bytes <= 0:
            raise ConfigError("SSD tier capacity and segment size must be positive")
        self.root = Path(root)
        self.capacity = capacity
        self.durable = durable
        self.last_refusal = ""  # why the latest put returned False
        self._db = None
        try:
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            self._db = Rdict(str(self.root / "index"), Options(raw_mode=True))
            self._open(segment_bytes)
        except Exception as exc:  # rocksdict raises bare Exceptions; OSError from the directory
            if self._db is not None:
                self._db.close()
            raise TierUnavailable(f"SSD tier at {self.root} cannot be opened: {exc}") from exc

    def _open(self, segment_bytes: int) -> None:
        self._write_opts = WriteOptions()
        self._write_opts.sync = self.durable
        self._lock = threading.Lock()
        self.stats = collections.Counter()
        self._segments = SegmentFiles(self.root / "data", max(64 << 10, min(segment_bytes, self.capacity // 4)),
                                      self.durable)
        self._where: dict[bytes, tuple[int, int, int]] = {}  # key -> (segment, offset, nbytes)
        self._live: collections.Counter = collections.Counter()  # segment -> live bytes
        self._writing: collections.Counter = collections.Counter()  # segment -> puts in progress
        self._total = 0  # live bytes: sum of self._live
        self._compacting = False
        self._recover()

    # -- lifecycle --------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Drop records whose bytes are not all there and segments without a live entry; count the rest."""
        sizes = self._segments.sizes()
        for key, raw in list(self._db.items()):
            try:
                where = decode_record(raw)[:3] if len(raw) == RECORD.size else None
            except PoolError:  # another version's record (a file-per-entry layout): dropped
                where = None
            if where is None or where[1] + where[2] > sizes.get(where[0], -1):
                del self._db[key]
                self.stats["recovered_dropped"] += 1
                if raw[:5] == RECORD_MAGIC + b"\x01":  # our version-1 record: its file was named by the key
                    (self.root / "data" / key.hex()).unlink(missing_ok=True)
                continue
            self._where[key] = where
            self._live[where[0]] += where[2]
        self._total = sum(self._live.values())
        for seg in sizes:
            if not self._live[seg]:  # written, killed before any record (only seg-<n>.kvs names)
                self._segments.remove(seg)
                self.stats["recovered_orphans"] += 1
        # Any other file in data/ is left alone: it may not be ours to delete.

    def close(self) -> None:
        self._db.close()
        self._segments.close()

    def __enter__(self) -> "SsdTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        """Live bytes (what ``capacity`` bounds)."""
        with self._lock:
            return self._total

    @property
    def disk_bytes(self) -> int:
        """Bytes in segment files: live plus dead bytes not yet reclaimed."""
        return self._segments.disk_bytes

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._where)

    def extent(self, key: bytes) -> tuple[int, int, int] | None:
        """(segment, offset, length) of an entry's bytes, or None."""
        return self._where.get(key)

    def entry_size(self, key: bytes) -> int | None:
        where = self._where.get(key)
        return None if where is None else where[2]

    def locate(self, key: bytes) -> tuple[Path, int, int] | None:
        """Where an entry's bytes are: (segment file, offset, length); for tools and tests."""
        where = self._where.get(key)
        return None if where is None else (self.root / "data" / segment_name(where[0]), where[1], where[2])

    # -- data -------------------------------------------------------------------------------------
    def put(self, key: bytes, data, digest: int | None = None) -> bool:
        """Store ``data`` (bytes-like, CPU or device tensor, or a list of them) under ``key``;
        False when it did not fit (capacity or a full disk). ``digest``: xxh3 of the bytes if the
        caller has it. Raises :class:`ConfigError` for a bad key, :class:`PoolError` when the disk fails."""
        return self.put_many([(key, data, digest)])[0]

    def put_many(self, items) -> list[bool]:
        """Store several entries as one group commit: ``items`` is ``[(key, data, digest | None)]``.
        All bytes are written, then (durable) each segment they touched is synced once, then one
        index batch records them all (synced once when durable): a batch costs what one put of
        its bytes costs. Returns, per item, whether it was stored (False: capacity or a full
        disk, see ``last_refusal``). Raises :class:`ConfigError` for a bad key (before anything
        is written), :class:`PoolError` when the disk fails (none of the batch is then stored)."""
        items = [(key, views(data), digest) for key, data, digest in items]
        for key, _, _ in items:
            if not key or len(key) > 64:
                raise ConfigError("keys are 1..64 bytes")
        stored = self._put_many(items)
        self._reclaim()
        return stored

    def _put(self, key: bytes, data, digest: int | None, expect: tuple | None = None) -> bool:
        """One entry; with ``expect`` (compaction moving an entry) the record is written only if
        the entry is still where it was: never over a newer put or a delete."""
        return self._put_many([(key, views(data), digest)], expect)[0]

    def _put_many(self, items: list, expect: tuple | None = None) -> list[bool]:
        """Reserve and write each entry (hashing while the bytes are in cache), then sync, then
        record: a record never points at bytes that are not (durably, when durable) there. An
        entry that does not fit (capacity, full disk) is skipped; the others still go in."""
        stored = [False] * len(items)
        written = []  # [item index, seg, offset, nbytes, digest]
        held: list[int] = []  # segments whose _writing count this batch holds
        extra = 0  # live bytes the batch adds once recorded
        try:
            for i, (key, pieces, digest) in enumerate(items):
                nbytes = sum(v.nbytes for v in pieces)
                with self._lock:
                    old = self._where.get(key)
                    grows = nbytes - (old[2] if old else 0)
                    if self._total + extra + grows > self.capacity:
                        self.stats["put_full"] += 1
                        self.last_refusal = "capacity reached"
                        continue
                    try:
                        seg, offset = self._segments.reserve(nbytes)
                    except OSError as exc:
                        self._write_failed(exc)  # raises unless the disk is full
                        continue
                    self._writing[seg] += 1
                    held.append(seg)
                h = xxhash.xxh3_64() if digest is None else None
                try:
                    self._segments.write(seg, offset, pieces, h, WRITE_PIECE, WRITEBACK_BYTES)
                except OSError as exc:
                    self._segments.unreserve(seg, offset, nbytes)
                    self._write_failed(exc)  # raises unless the disk is full: the rest may still fit
                    continue
                written.append((i, seg, offset, nbytes, digest if h is None else h.intdigest()))
                extra += grows
            if self.durable and written:
                try:
                    for seg in dict.fromkeys(w[1] for w in written):  # once per segment, in write order
                        self._segments.sync(seg)
                except OSError as exc:  # nothing of the batch is known to be on disk
                    for _, seg, offset, nbytes, _ in reversed(written):  # reversed: each tail can be cut back
                        self._segments.unreserve(seg, offset, nbytes)
                    self._write_failed(exc)
                    return stored
            if written:
                self._record(items, written, expect, stored)
        finally:
            with self._lock:
                for seg in held:
                    self._writing[seg] -= 1
        return stored

    def _record(self, items: list, written: list, expect: tuple | None, stored: list[bool]) -> None:
        """The batch's index records, in one (durable: synced) write; then the map."""
        now = time.time()
        batch = WriteBatch(raw_mode=True)
        with self._lock:  # record and map change together, so puts and deletes of a key are ordered
            keep = [p for p in written if expect is None or self._where.get(items[p[0]][0]) == expect]
            if not keep:
                return  # compaction's copy lost to a newer put or a delete: its bytes are dead space
            for i, seg, offset, nbytes, digest in keep:
                batch.put(items[i][0], encode_record(seg, offset, nbytes, digest, now))
            try:
                self._db.write(batch, self._write_opts)
            except Exception as exc:  # rocksdict: a bare Exception (full disk, I/O error); bytes are dead space
                self._write_failed(exc)
                return
            for i, seg, offset, nbytes, _ in keep:
                key = items[i][0]
                old = self._where.get(key)
                self._where[key] = (seg, offset, nbytes)
                self._live[seg] += nbytes
                self._total += nbytes
                if old is not None:
                    self._dead(old)
                stored[i] = True
            self.stats["puts"] += len(keep)
            self.stats["index_batches"] += 1

    def _write_failed(self, exc: Exception) -> bool:
        if disk_full(exc):
            self.stats["disk_full"] += 1
            self.last_refusal = f"disk full ({exc})"
            return False
        raise PoolError(f"SSD tier write failed: {exc}") from exc

    def get(self, key: bytes, out=None, verify: bool = True) -> memoryview:
        """The entry's bytes, read straight into ``out`` (bytes-like or a CPU tensor, exactly its
        size: no staging copy) or into a new buffer, hashed piece by piece while in cache.
        Raises :class:`EntryMissing` when missing, :class:`LengthError` for an ``out`` of the
        wrong size, :class:`ConfigError` for a device tensor ``out``, :class:`PoolError` when the
        disk fails; an entry failing its checksum is dropped and :class:`ChecksumMismatch` raised."""
        for _ in range(3):  # an entry that compaction moved meanwhile is looked up again
            try:
                raw = self._db.get(key)
            except Exception as exc:  # rocksdict: a bare Exception
                raise PoolError(f"SSD index read failed: {exc}") from exc
            if raw is None or key not in self._where:
                break
            seg, offset, nbytes, digest, _ = decode_record(raw)
            buf = memoryview(bytearray(nbytes)) if out is None else out_view(out)
            if buf.nbytes != nbytes:
                raise LengthError(f"output holds {buf.nbytes} bytes, entry has {nbytes}")
            try:
                fd = self._segments.acquire(seg)
            except OSError as exc:  # its segment file was removed or cannot be opened
                self._drop(key, (seg, offset, nbytes))
                raise EntryMissing(f"SSD entry {key.hex()[:16]} unreadable: {exc}") from exc
            if fd is None:
                continue
            try:
                got, h = read_into(fd, offset, buf, verify)
            except OSError as exc:
                self._drop(key, (seg, offset, nbytes))
                raise PoolError(f"SSD entry {key.hex()[:16]} unreadable: {exc}") from exc
            finally:
                self._segments.release(seg)
            if got != nbytes or (verify and h != digest):
                self._drop(key, (seg, offset, nbytes))
                self.stats["corrupt"] += 1
                raise ChecksumMismatch(f"SSD entry {key.hex()[:16]}", digest, xxhash.xxh3_64_intdigest(buf[:got]))
            self.stats["hits"] += 1
            return buf
        self.stats["misses"] += 1
        raise EntryMissing(f"no entry {key.hex()[:16]} on SSD")

    def _drop(self, key: bytes, where: tuple[int, int, int]) -> None:
        """Delete a bad entry, unless it was replaced (or moved) since it was read."""
        if self._where.get(key) == where:
            self.delete(key)

    def prefetch(self, keys) -> None:
        """Start reading these entries into the page cache (asynchronously), so the :meth:`get`
        calls that follow find them there or in flight. Adjacent entries are asked for as one range."""
        spans: list[list[int]] = []  # [segment, start, end]
        for key in keys:
            where = self._where.get(key)
            if where is None:
                continue  # missing: get() reports it
            seg, offset, nbytes = where
            if spans and spans[-1][0] == seg and 0 <= offset - spans[-1][2] <= READ_PIECE:
                spans[-1][2] = max(spans[-1][2], offset + nbytes)
            else:
                spans.append([seg, offset, offset + nbytes])
        for seg, start, end in spans:
            self._segments.advise(seg, start, end - start)

    def get_many(self, keys, out=None, outs=None, verify: bool = True, ahead: int = READ_AHEAD_BYTES):
        """Yield each entry's bytes in order, keeping ~``ahead`` bytes of the next entries
        requested from the disk while the current one is read and hashed. ``outs``: one buffer
        per key (e.g. views into a staging buffer or a cache's blocks), each filled in place;
        ``out``: one buffer reused for every entry (each yielded view is valid until the next);
        neither: a new buffer per entry. A generator: nothing is read until it is iterated.
        Raises as :meth:`get`, and :class:`LengthError` when ``outs`` does not match ``keys``."""
        keys = list(keys)
        if outs is not None:
            outs = list(outs)
            if len(outs) != len(keys):
                raise LengthError(f"{len(outs)} output buffers for {len(keys)} entries")
        reader = ReadAhead(self, keys, ahead)
        for i, key in enumerate(keys):
            reader.before(key)
            yield self.get(key, out=outs[i] if outs is not None else out, verify=verify)

    def delete(self, key: bytes) -> bool:
        """Forget an entry (its bytes become dead space); False if there was none."""
        with self._lock:
            try:
                self._db.delete(key)  # record first: a record never points at reclaimed bytes
            except Exception as exc:  # rocksdict: a bare Exception
                raise PoolError(f"SSD index delete failed: {exc}") from exc
            where = self._where.pop(key, None)
            if where is not None:
                self._dead(where)
        self._reclaim()
        return where is not None
