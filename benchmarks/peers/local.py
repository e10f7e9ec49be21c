"""Host tier and SSD tier: kvlink through the engine's own calls vs LMCache's CPU and disk
backends (its engine, our CPU connector) vs the same-run baselines, on the same KV bytes.

kvlink: a :class:`~kvlink.engine.decode.DecodeSide` on an in-process :class:`~kvlink.pool.Pool`
stores a request from a paged cache (``store``) and restores it into another paged cache
(``lookup`` + ``load_from_pool``). Every round is a new prompt, so nothing is a hit left over
from an earlier one; memory and disk are emptied between rounds outside the clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kvlink.bench.serde import realistic_kv
from kvlink.bench.timing import drop_page_cache
from kvlink.config import PoolConfig
from kvlink.errors import ConfigError
from kvlink.engine.decode import DecodeSide
from kvlink.pool import Pool
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import CacheSpec

from proc import PeerFailed, Runner
from stats import Comparison

CACHE_BLOCK = 16  # the engine's page (vLLM's default block size)


def full_slice(model: str) -> CacheSpec:
    """The full-attention layers of ``model``: what LMCache's KV format can hold (no states)."""
    spec = get_preset(model)
    layers = tuple(layer for layer in spec.layers if layer.kind == "full")
    shapes = {(t.name, t.shape, t.dtype) for layer in layers for t in layer.tokens}
    if not layers or {n for n, _, _ in shapes} != {"k", "v"} or len({(s, d) for _, s, d in shapes}) != 1:
        raise ConfigError(f"{model}: LMCache's KV format needs full-attention layers whose K and V share one "
                          f"shape and dtype (found {sorted(shapes)})")
    return CacheSpec(f"{model}/full-attention", layers, notes=f"full-attention layers of {model}")


class Shape:
    """The KV both sides hold: ``tokens`` tokens of ``spec`` (K and V of ``heads`` x ``head_dim``)."""

    def __init__(self, model: str, target_bytes: int, chunk: int, lmcache_threads: int = 1):
        self.spec = full_slice(model)
        first = self.spec.layers[0].tokens[0]
        self.heads, self.head_dim = first.shape
        self.layers, self.chunk, self.model = self.spec.num_layers, chunk, model
        per_token = self.spec.kv_bytes_per_token
        self.tokens = max(chunk, target_bytes // per_token // chunk * chunk)
        self.bytes = self.tokens * per_token
        self.lmcache_threads = lmcache_threads

    def runner_args(self) -> dict:
        return {"model": self.spec.name, "layers": self.layers, "heads": self.heads, "head_dim": self.head_dim,
                "block_size": CACHE_BLOCK, "tokens": self.tokens, "chunk": self.chunk, "threads": self.lmcache_threads}


class KvlinkSide:
    """A DecodeSide over a Pool, a source cache holding the request and a destination cache."""

    def __init__(self, shape: Shape, config: PoolConfig):
        nblocks = shape.tokens // CACHE_BLOCK
        self.shape = shape
        self.src = PagedCache.allocate(shape.spec, nblocks, CACHE_BLOCK, fill="zeros")
        for layer in range(shape.layers):
            for _, rows in self.src.planes(layer):
                rows.copy_(realistic_kv(rows.shape[0], rows.shape[1], seed=layer).to(rows.dtype))
        self.dst = PagedCache.allocate(shape.spec, nblocks, CACHE_BLOCK, fill="zeros")
        # The request's blocks are scattered over the cache, as an engine's allocator leaves them.
        perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(7)).tolist()
        self.ref = CacheRef(perm, shape.tokens)
        self.pool = Pool(shape.spec, config)
        self.loop = asyncio.new_event_loop()
        self.side = DecodeSide(self.src, pool=self.pool)
        self.loader = DecodeSide(self.dst, pool=self.pool)
        self.generation = 0

    def digests(self) -> list[str]:
        """blake2b of each layer's K and V planes, in block order (to compare with LMCache's)."""
        return [hashlib.blake2b(rows.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
                for layer in range(self.shape.layers) for _, rows in self.src.planes(layer)]

    def prompt(self) -> list[int]:
        return [(i * 31 + self.generation * 100003) % 150000 for i in range(self.shape.tokens)]

    def store(self) -> float:
        self.generation += 1
        tokens = self.prompt()
        t0 = time.perf_counter()
        report = self.loop.run_until_complete(self.side.store(tokens, self.ref))
        seconds = time.perf_counter() - t0
        if report.failed or report.stored != self.shape.tokens // self.pool.config.block_size:
            raise RuntimeError(f"kvlink store kept {report.stored} entries, failed {report.failed}: {report}")
        return seconds

    def load(self) -> tuple[float, bool]:
        for layer in range(self.shape.layers):
            for _, rows in self.dst.planes(layer):
                rows.zero_()
        tokens = self.prompt()
        t0 = time.perf_counter()
        hit = self.loop.run_until_complete(self.loader.lookup(tokens))
        got = self.loop.run_until_complete(self.loader.load_from_pool(hit, self.ref))
        seconds = time.perf_counter() - t0
        equal = got == self.shape.tokens and all(
            torch.equal(a, b) for layer in range(self.shape.layers)
            for (_, a), (_, b) in zip(self.src.planes(layer), self.dst.planes(layer)))
        return seconds, equal

    def empty(self) -> None:
        """Forget every entry (outside the clock): host pages go back to the tier's free list."""
        self.pool.drain()
        self.pool.evict(1 << 62)
        self.pool.drain()

    def close(self) -> None:
        for side in (self.side, self.loader):
            self.loop.run_until_complete(side.close())
        self.pool.close()
        self.loop.close()


def _drop_page_cache(root: Path) -> int:
    """Drop every file under ``root`` from the page cache; how many there were."""
    files = [path for path in root.rglob("*") if path.is_file()]
    for path in files:
        drop_page_cache(path)
    return len(files)


def _lmcache(shape: Shape, log, cmp: Comparison, kv: "KvlinkSide | None" = None,
             disk: Path | None = None) -> tuple[Runner | None, str | None]:
    try:
        # Passive OpenMP waits: with torch's default spin-waiting, 2 threads on 2 shared cores
        # collapse 5-10x whenever another process holds a core (hundreds of small copies a store).
        runner = Runner("lmcache", "lmcache_runner.py", log=log, env={"OMP_WAIT_POLICY": "PASSIVE"})
        args = shape.runner_args()
        if disk is not None:
            args["disk_dir"] = str(disk)
        info = runner.call("open", timeout=300, **args)
        if info["bytes"] != shape.bytes:
            raise PeerFailed(f"LMCache side holds {info['bytes']} bytes, kvlink {shape.bytes}")
        if kv is not None:
            same = info["digests"] == kv.digests()
            cmp.note("same bytes", "LMCache's source cache holds the very values of kvlink's (digests equal)" if same
                     else "LMCache's source cache differs from kvlink's in values (same shape and byte count)")
        return runner, None
    except PeerFailed as exc:
        return None, str(exc)


def host_tier(shape: Shape, rounds: int, log) -> Comparison:
    """kvlink host tier vs LMCache LocalCPUBackend vs memcpy (torch copy_) of the same bytes."""
    cmp = Comparison("host tier", shape.bytes, f"{shape.spec.name}: {shape.tokens} tokens, {shape.layers} layers, "
                     f"chunk {shape.chunk} tokens, paged cache block {CACHE_BLOCK}")
    cmp.note("kvlink store", "DecodeSide.store: pack (xxh3 per segment, in the payload) into the host tier; no sync")
    cmp.note("kvlink load", "lookup + DecodeSide.load_from_pool: every entry's xxh3 verified "
             "(hashed as it is copied in)")
    cmp.note("LMCache store", f"LMCacheEngine.store, LocalCPUBackend (our CPU connector gathers: torch index_select, "
             f"{shape.lmcache_threads} thread(s)); no checksum")
    cmp.note("LMCache retrieve", "LMCacheEngine.retrieve into the paged cache (our connector scatters: numpy row "
             "assignment); no checksum")
    cmp.note("memcpy", "torch copy_ of the same byte count between two preallocated buffers")
    cmp.pair("kvlink store", "LMCache store")
    cmp.pair("kvlink load", "LMCache retrieve")
    cmp.pair("kvlink store", "memcpy")
    cmp.pair("kvlink load", "memcpy")
    kv = KvlinkSide(shape, PoolConfig(block_size=shape.chunk, host_bytes=int(shape.bytes * 1.3) + (64 << 20),
                                      checkpoint_every=None))
    lm, why = _lmcache(shape, log, cmp, kv)
    if why:
        cmp.skip("LMCache", why)
    a = torch.empty(shape.bytes, dtype=torch.uint8).random_()
    b = torch.zeros(shape.bytes, dtype=torch.uint8)

    def kvlink_round(record: bool) -> None:
        put = kv.store()
        load, ok = kv.load()
        kv.empty()
        if record:
            cmp.add("kvlink store", put)
            cmp.add("kvlink load", load)
            cmp.verified("kvlink load", ok)

    def lmcache_round(record: bool) -> None:
        nonlocal lm
        if lm is None:
            return
        try:
            put = lm.call("store")["store_s"]
            got = lm.call("retrieve")
            lm.call("clear")
        except PeerFailed as exc:
            cmp.skip("LMCache", str(exc))
            lm.close()
            lm = None
            return
        if record:
            cmp.add("LMCache store", put)
            cmp.add("LMCache retrieve", got["retrieve_s"])
            cmp.verified("LMCache retrieve", got["equal"])

    def memcpy_round(record: bool) -> None:
        t0 = time.perf_counter()
        b.copy_(a)
        if record:
            cmp.add("memcpy", time.perf_counter() - t0)

    try:
        _interleave([kvlink_round, lmcache_round, memcpy_round], rounds)
    finally:
        kv.close()
        if lm is not None:
            lm.close()
    return cmp


def _interleave(steps, rounds: int) -> None:
    """One warm-up pass (not recorded), then ``rounds`` passes, the order reversed every other
    round so drift on a shared machine hits every side alike."""
    for step in steps:
        step(False)
    for r in range(rounds):
        for step in (steps if r % 2 == 0 else steps[::-1]):
            step(True)


def ssd_tier(shape: Shape, rounds: int, log, where: str | None) -> Comparison:
    """kvlink SSD tier (durable write-through put, cold fetch) vs LMCache LocalDiskBackend vs
    plain write+fsync and plain cold read of the same bytes."""
    cmp = Comparison("SSD tier", shape.bytes, f"{shape.spec.name}: {shape.tokens} tokens; page cache dropped "
                     "(posix_fadvise DONTNEED) before every cold read")
    cmp.note("kvlink put", "DecodeSide.store, write_mode=through, ssd_durable: data and index synced; xxh3 per entry")
    cmp.note("kvlink cold load", "host tier emptied, lookup + load_from_pool from SSD; every entry's xxh3 verified")
    cmp.note("LMCache disk put", "LMCacheEngine.store + wait until LocalDiskBackend wrote every chunk: "
             "no fsync, no checksum")
    cmp.note("LMCache disk put+sync", "the same plus an fsync of each of its files (durable, for scale)")
    cmp.note("LMCache cold retrieve", "LocalDiskBackend (local_cpu off) read into the paged cache; no checksum")
    cmp.note("plain write+fsync", f"{shape.chunk}-token pieces written to one file, then fsync")
    cmp.note("plain cold read", "the same file read back into a preallocated buffer")
    cmp.pair("kvlink put", "plain write+fsync")
    cmp.pair("kvlink put", "LMCache disk put+sync")
    cmp.pair("kvlink put", "LMCache disk put")
    cmp.pair("kvlink cold load", "plain cold read")
    cmp.pair("kvlink cold load", "LMCache cold retrieve")
    base = Path(tempfile.mkdtemp(prefix="kvlink-peers-", dir=where))
    piece = shape.bytes // (shape.tokens // shape.chunk)
    a = torch.empty(shape.bytes, dtype=torch.uint8).random_()
    b = torch.zeros(shape.bytes, dtype=torch.uint8)
    kv = lm = None
    try:
        ssd_bytes = shape.bytes * (rounds + 2) + (256 << 20)  # every round's entries stay on disk
        kv = KvlinkSide(shape, PoolConfig(block_size=shape.chunk, host_bytes=int(shape.bytes * 1.3) + (64 << 20),
                                          checkpoint_every=None, ssd_dir=str(base / "kvlink"), ssd_bytes=ssd_bytes,
                                          ssd_segment_bytes=min(256 << 20, ssd_bytes // 4),
                                          ssd_durable=True, write_mode="through"))
        (base / "lmcache").mkdir()
        lm, why = _lmcache(shape, log, cmp, kv, base / "lmcache")
        if why:
            cmp.skip("LMCache", why)

        def kvlink_round(record: bool) -> None:
            put = kv.store()
            kv.pool.drain()
            kv.pool.evict(1 << 62)  # host copies go; the SSD copies stay (written through)
            kv.pool.drain()
            _drop_page_cache(base / "kvlink")
            before = kv.pool.stats["hit_ssd"]
            load, ok = kv.load()
            entries = shape.tokens // shape.chunk
            if kv.pool.stats["hit_ssd"] - before != entries:  # else the figure is not a cold fetch
                raise RuntimeError(f"kvlink cold load read {kv.pool.stats['hit_ssd'] - before} of {entries} "
                                   "entries from SSD")
            kv.pool.drain()  # background promotions of the SSD hits, outside the clock
            kv.pool.evict(1 << 62)  # the next round starts with an empty host tier
            if record:
                cmp.add("kvlink put", put)
                cmp.add("kvlink cold load", load)
                cmp.verified("kvlink cold load", ok)

        def lmcache_round(record: bool) -> None:
            nonlocal lm
            if lm is None:
                return
            try:
                put = lm.call("store")
                _drop_page_cache(base / "lmcache")
                got = lm.call("retrieve")
                lm.call("clear")
            except PeerFailed as exc:
                cmp.skip("LMCache", str(exc))
                lm.close()
                lm = None
                return
            if record:
                cmp.add("LMCache disk put", put["written_s"])
                cmp.add("LMCache disk put+sync", put["synced_s"])
                cmp.add("LMCache cold retrieve", got["retrieve_s"])
                cmp.verified("LMCache cold retrieve", got["equal"])

        def plain_round(record: bool) -> None:
            path = base / "plain.bin"
            view = memoryview(a.numpy())
            t0 = time.perf_counter()
            with open(path, "wb", buffering=0) as f:
                for off in range(0, shape.bytes, piece):
                    f.write(view[off: off + piece])
                os.fsync(f.fileno())
            write = time.perf_counter() - t0
            drop_page_cache(path)
            out = memoryview(b.numpy())
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                for off in range(0, shape.bytes, piece):
                    f.readinto(out[off: off + piece])
            read = time.perf_counter() - t0
            ok = torch.equal(a, b)
            path.unlink()
            if record:
                cmp.add("plain write+fsync", write)
                cmp.add("plain cold read", read)
                cmp.verified("plain cold read", ok)

        _interleave([kvlink_round, lmcache_round, plain_round], rounds)
    finally:
        if kv is not None:
            kv.close()
        if lm is not None:
            lm.close()
        shutil.rmtree(base, ignore_errors=True)
    return cmp
