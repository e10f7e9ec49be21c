"""Pool hardening (issue 15, items 10, 11, 15, 16): lazy host memory under one shared budget,
honest store reports under a failing disk, typed SSD open failures, contracts (typed errors
only), and state checkpoints handed over by the engine mid-request."""

import contextlib
import os
import resource
import signal
import subprocess
import time

import pytest
import torch

from kvlink.config import PoolConfig
from kvlink.engine import SyncDecodeSide
from kvlink.errors import ConfigError, EntryMissing, KvlinkError, ResourceLimit, TierUnavailable
from kvlink.pool.budget import HostBudget
from kvlink.pool.index import FULL, STATE
from kvlink.pool.pool import Pool
from kvlink.pool.ssd import SsdTier
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, Packer, PagedCache
from tests.integration.test_engine_faults import SPEC

HYBRID = get_preset("kimi-linear-48b-a3b")
BS = 16


def prompt(n, seed=0):
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def pieces(tokens, size=3000, state_after=()):
    out = {(FULL, b): os.urandom(size + b) for b in range(len(tokens) // BS)}
    out.update({(STATE, b): os.urandom(size) for b in state_after})
    return out


def cfg(**kw):
    base = dict(block_size=BS, host_bytes=64 << 10, page_bytes=4096, chunk_bytes=16 << 10, policy="lru")
    base.update(kw)
    return PoolConfig(**base)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- item 10: lazy host memory, one budget -------------------------------------------------------
def test_creating_a_pool_allocates_nothing_and_is_fast():
    before, took = rss_bytes(), []
    pools = []
    for _ in range(3):
        t0 = time.perf_counter()
        pools.append(Pool(HYBRID, PoolConfig(host_bytes=1 << 30)))  # a 1 GiB quota, as the default
        took.append(time.perf_counter() - t0)
    try:
        assert min(took) < 0.05, took
        assert rss_bytes() - before < 8 << 20
        assert all(p.levels[-1][1].allocated_bytes == 0 for p in pools)
    finally:
        for p in pools:
            p.close()


def test_64_pools_on_one_budget_never_exceed_it_nor_take_each_others_memory():
    budget = HostBudget(1 << 20)
    pools = [Pool(HYBRID, cfg(namespace=f"tenant-{i}", host_bytes=16 << 10), budget=budget) for i in range(64)]
    try:
        assert budget.reserved_bytes == budget.total_bytes  # quotas are guaranteed: 64 x 16 KiB
        with pytest.raises(ResourceLimit, match="host budget"):  # no 65th quota to guarantee
            Pool(HYBRID, cfg(host_bytes=16 << 10), budget=budget)
        for i, pool in enumerate(pools):
            tokens = prompt(2 * BS, seed=i)
            report = pool.store(tokens, pieces(tokens, size=6000))  # 2 entries of 2 pages: the whole quota
            assert report.stored == 2 and not report.failed
            assert budget.used_bytes <= budget.total_bytes
            assert budget.used_bytes == sum(p.levels[-1][1].allocated_bytes for p in pools)
        assert budget.used_bytes == budget.total_bytes
        # every pool still holds everything it stored: nobody took its pages
        assert all(len(p.levels[-1][1]) == 2 for p in pools)
        # a pool at its quota makes room from its own entries, then stores
        again = prompt(2 * BS, seed=1000)
        report = pools[0].store(again, pieces(again, size=6000))
        assert report.stored == 2 and not report.failed
        assert all(len(p.levels[-1][1]) == 2 for p in pools[1:])
    finally:
        for p in pools:
            p.close()
    assert budget.used_bytes == 0 and budget.reserved_bytes == 0  # closing gives memory and quota back


def test_chunks_are_allocated_on_demand_and_runs_never_cross_them():
    from kvlink.pool.slab import SlabTier

    budget = HostBudget(6 * 4096)
    tier = SlabTier(8 * 4096, page_bytes=4096, chunk_bytes=2 * 4096, budget=budget)
    assert tier.allocated_bytes == 0 and budget.used_bytes == 0
    data = os.urandom(3 * 4096 - 5)
    assert tier.put(b"a", data)  # three pages over two chunks
    assert tier.allocated_bytes == budget.used_bytes == 4 * 4096
    assert len(tier.views(b"a")) > 1 and b"".join(bytes(v) for v in tier.views(b"a")) == data
    assert bytes(tier.get(b"a").numpy()) == data
    assert tier.reserve(3 * 4096) is None  # a landing must lie in one chunk
    landing = tier.reserve(2 * 4096)  # the third chunk: the last the budget allows
    assert landing is not None and budget.used_bytes == 6 * 4096
    landing.view[:] = os.urandom(2 * 4096)
    tier.adopt(b"b", landing)
    assert not tier.put(b"c", os.urandom(2 * 4096))  # one free page left, and no budget for more
    tier.close()
    assert budget.used_bytes == 0


def test_a_pool_stays_within_its_own_quota():
    budget = HostBudget(64 << 20)
    with Pool(HYBRID, cfg(host_bytes=32 << 10), budget=budget) as pool:
        tokens = prompt(16 * BS)
        report = pool.store(tokens, pieces(tokens, size=3000))  # 16 one-page entries, 8 pages of quota
        assert report.stored == 16 and not report.failed  # the oldest were evicted to make room
        assert len(pool.levels[-1][1]) == 8
        assert budget.used_bytes == pool.levels[-1][1].allocated_bytes == 32 << 10


# -- item 11: honest reports, typed SSD failures ---------------------------------------------------
@contextlib.contextmanager
def file_size_limit(nbytes):
    """No file of this process may grow past ``nbytes`` meanwhile: writes past it fail with EFBIG,
    as they fail with ENOSPC on a full disk (no root needed; only the soft limit is lowered)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_write_through_on_a_full_disk_reports_exactly_what_reached_it(tmp_path):
    config = cfg(host_bytes=4 << 20, ssd_dir=str(tmp_path / "ssd"), ssd_bytes=64 << 20,
                 ssd_segment_bytes=64 << 10, write_mode="through")
    tokens = prompt(6 * BS)
    sizes = [1000, 200 << 10, 2000, 3000, 300 << 10, 250 << 10]  # three entries cannot be written
    with Pool(HYBRID, config) as pool:
        with file_size_limit(128 << 10):
            report = pool.store(tokens, {(FULL, b): os.urandom(n) for b, n in enumerate(sizes)})
        assert (report.stored, report.failed) == (6, 0)  # all in host memory...
        on_ssd = ["ssd" in pool.where(FULL, k) for k in pool.index.hashes(tokens)]
        assert on_ssd == [True, False, True, True, False, False]  # ...and exactly these on SSD too
        assert report.on_ssd == 3
        assert any("disk full" in e for e in report.errors)
        health = pool.health()
        assert health["ssd"]["ok"] is False and "disk full" in health["ssd"]["error"]
        assert health["host"] == {"ok": True, "error": None}
        assert pool.summary()["tiers"]["ssd"]["ok"] is False
        more = prompt(7 * BS)  # room again: the next write succeeds and the tier is healthy
        assert pool.store(more, {(FULL, 6): b"y" * 100}).on_ssd == 1 and pool.health()["ssd"]["ok"]


@contextlib.contextmanager
def tiny_disk(path, size="1m"):
    """A real file system that fills up: a tmpfs of ``size`` (skips where mounting is not allowed)."""
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (not root, or no mount)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def test_a_real_full_disk_under_write_through_and_a_restart_on_it(tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        config = cfg(host_bytes=4 << 20, ssd_dir=str(disk / "ssd"), ssd_bytes=64 << 20,
                     ssd_segment_bytes=64 << 10, write_mode="through")
        tokens = prompt(24 * BS)
        with Pool(HYBRID, config) as pool:
            report = pool.store(tokens, {(FULL, b): os.urandom(100 << 10) for b in range(24)})  # 2.4 MB
            on_ssd = sum("ssd" in pool.where(FULL, k) for k in pool.index.hashes(tokens))
            assert report.stored == 24 and 0 < report.on_ssd == on_ssd < 24
            assert any("disk full" in e for e in report.errors) and not pool.health()["ssd"]["ok"]
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:  # not a byte left
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        with Pool(HYBRID, config) as pool:  # a restart on the full disk (RocksDB cannot write its MANIFEST)
            health = pool.health()["ssd"]
            assert not health["ok"] and "cannot be opened" in health["error"]
            report = pool.store(tokens, {(FULL, 0): b"x" * 100})  # the host tier serves
            assert (report.stored, report.on_ssd) == (1, 0)


def test_write_through_takes_torch_tensors(tmp_path):
    tokens = prompt(3 * BS)
    data = {(FULL, 0): torch.randn(700, dtype=torch.float16), (FULL, 1): torch.randn(300, dtype=torch.bfloat16),
            (FULL, 2): [torch.arange(50, dtype=torch.int32), torch.ones(20, dtype=torch.float32)]}
    want = {b: b"".join(bytes(t.view(torch.uint8).numpy()) for t in (v if isinstance(v, list) else [v]))
            for (_, b), v in data.items()}
    with Pool(HYBRID, cfg(ssd_dir=str(tmp_path / "ssd"), ssd_bytes=16 << 20, write_mode="through")) as pool:
        report = pool.store(tokens, data)
        assert (report.stored, report.on_ssd, report.failed) == (3, 3, 0)
        pool.evict(1 << 30)  # memory emptied: reads come from the SSD copies
        keys = pool.index.hashes(tokens)
        for b, raw in want.items():
            assert pool.where(FULL, keys[b]) == ["ssd"]
            assert bytes(pool.ssd.get(b"F" + keys[b])) == raw


def damage_index(root):
    index = root / "index"
    for path in index.iterdir():
        if path.name == "CURRENT" or path.name.startswith("MANIFEST") or path.suffix in (".sst", ".log"):
            path.write_bytes(os.urandom(max(64, path.stat().st_size)))


def test_a_damaged_ssd_index_is_typed_and_the_host_tier_serves(tmp_path):
    root = tmp_path / "ssd"
    tokens = prompt(4 * BS)
    with Pool(HYBRID, cfg(ssd_dir=str(root), ssd_bytes=16 << 20, write_mode="through")) as pool:
        assert pool.store(tokens, pieces(tokens, state_after=[3])).on_ssd == 5
    damage_index(root)
    with pytest.raises(TierUnavailable):
        SsdTier(root, 16 << 20)
    with Pool(HYBRID, cfg(ssd_dir=str(root), ssd_bytes=16 << 20, write_mode="through")) as pool:
        assert pool.ssd is None
        health = pool.health()
        assert health["ssd"]["ok"] is False and "cannot be opened" in health["ssd"]["error"]
        assert health["host"]["ok"] is True
        assert pool.summary()["tiers"]["ssd"]["ok"] is False
        report = pool.store(tokens, pieces(tokens, state_after=[3]))
        assert (report.stored, report.on_ssd) == (5, 0)
        hit = pool.lookup(tokens)
        assert hit.tokens == 4 * BS and len(pool.fetch(hit)) == 5


def test_recovery_deletes_only_its_own_segment_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    foreign = [data / "notes.txt", data / "seg-1.kvs", data / "backup.kvs", data / "seg-00000001.kvs.bak"]
    for path in foreign:
        path.write_bytes(b"not the pool's")
    (data / "seg-00000007.kvs").write_bytes(b"x" * 10)  # the tier's own name, no live entry: an orphan
    with SsdTier(tmp_path, 1 << 20) as tier:
        assert tier.put(b"k", b"v" * 10)
    assert all(path.read_bytes() == b"not the pool's" for path in foreign)
    assert not (data / "seg-00000007.kvs").exists()


# -- item 15: contracts ------------------------------------------------------------------------------
def test_fetch_after_eviction_raises_entry_missing():
    with Pool(HYBRID, cfg()) as pool:
        tokens = prompt(4 * BS)
        pool.store(tokens, pieces(tokens, state_after=[3]))
        hit = pool.lookup(tokens)
        assert hit.tokens == 4 * BS
        pool.evict(1 << 30)  # no SSD: the entries leave the pool
        with pytest.raises(EntryMissing):
            pool.fetch(hit)


def test_fetch_of_an_entry_whose_segment_file_vanished_raises_entry_missing(tmp_path):
    config = cfg(ssd_dir=str(tmp_path / "ssd"), ssd_bytes=16 << 20, ssd_segment_bytes=64 << 10)
    with Pool(HYBRID, config) as pool:
        tokens = prompt(40 * BS)
        pool.store(tokens, pieces(tokens, size=40 << 10, state_after=[39]))  # a segment per entry
        pool.evict(1 << 30)
        pool.drain()  # all on SSD only; the oldest segments' descriptors are closed (at most 32 stay open)
        hit = pool.lookup(tokens)
        assert hit.tokens == 40 * BS
        for path in (tmp_path / "ssd" / "data").iterdir():
            path.unlink()  # removed behind the pool's back
        with pytest.raises(EntryMissing):
            pool.fetch(hit)
        assert pool.lookup(tokens).tokens == 0  # what was found lost left the index


def test_a_prompt_shorter_than_one_block_says_so():
    with Pool(HYBRID, cfg()) as pool:
        hit = pool.lookup(prompt(BS - 1))
        assert hit.tokens == 0 and "shorter than one block" in hit.stopped


def test_public_methods_raise_only_kvlink_errors():
    with Pool(HYBRID, cfg()) as pool:
        tokens = prompt(2 * BS)
        bad_calls = [lambda: pool.where("bogus", b"k" * 16),
                     lambda: pool.store(tokens, {(FULL, 0): 12345}),
                     lambda: pool.store(tokens, {(FULL, 5): b"x"}),
                     lambda: pool.store(tokens, {("bogus", 0): b"x"}),
                     lambda: pool.lookup([-1] * BS),
                     lambda: pool.pin_views([("bogus", b"k" * 16)])]
        for call in bad_calls:
            with pytest.raises(KvlinkError):
                call()
        assert pool.store(tokens, {(FULL, 0): b"x"}).stored == 1  # nothing of the bad calls was stored before


# -- item 16: state checkpoints ----------------------------------------------------------------------
def test_checkpoint_positions_follow_the_config():
    with Pool(HYBRID, cfg(checkpoint_every=2)) as pool:
        assert pool.checkpoint_positions(100) == [32, 64, 96]
        assert pool.checkpoint_positions(100, start=40) == [64, 96]
        assert pool.checkpoint_positions(15) == []
    with Pool(HYBRID, cfg(checkpoint_every=None)) as pool:
        assert pool.checkpoint_positions(100) == [96]
    with Pool(get_preset("llama-3-70b"), cfg()) as pool:
        assert pool.checkpoint_positions(100) == []  # no state to checkpoint
    with pytest.raises(ConfigError):
        PoolConfig(checkpoint_every=0)


def state_bytes(cache, slot):
    return b"".join(bytes(t[slot].contiguous().view(torch.uint8).reshape(-1).numpy())
                    for pools in (cache.conv, cache.recurrent) for t in pools.values())


def test_next_turn_hits_the_deepest_state_checkpoint_taken_during_decode():
    pool_block = 64
    torch.manual_seed(3)
    src = PagedCache.allocate(SPEC, 24, 16, num_slots=2, fill="randn")
    dst = PagedCache.allocate(SPEC, 24, 16, num_slots=2)
    turn1 = list(range(1000, 1100)) + list(range(7000, 7100))  # 100 prompt tokens, 100 generated
    blocks, slot = list(range(16)), 1
    pool = Pool(SPEC, PoolConfig(block_size=pool_block, host_bytes=16 << 20, checkpoint_every=1))
    engine, other = SyncDecodeSide(src, pool=pool), SyncDecodeSide(dst, pool=pool)
    try:
        positions = engine.checkpoint_positions(len(turn1))
        assert positions == [64, 128, 192]
        snapshots = {}
        for pos in positions:  # the engine reaches each position (prefill, then decode) ...
            for pools in (src.conv, src.recurrent):
                for t in pools.values():
                    t[slot].normal_()  # ... with its state moved on since the last one
            report = engine.store_state(turn1, CacheRef(blocks, pos, slot))
            assert (report.stored, report.failed) == (1, 0)
            snapshots[pos] = state_bytes(src, slot)
        for pools in (src.conv, src.recurrent):
            for t in pools.values():
                t[slot].normal_()  # the state at the request's end (200: not a boundary)
        assert engine.store(turn1, CacheRef(blocks, len(turn1), slot)).stored == 3  # KV of 3 full blocks

        turn2 = turn1 + list(range(9000, 9050))
        hit = other.lookup(turn2)
        assert hit.tokens == 192  # without mid-request checkpoints: 0 (no state at 200)
        dst_ref = CacheRef(list(range(23, 11, -1)), 192, 0)
        assert other.load_from_pool(hit, dst_ref) == 192
        assert state_bytes(dst, 0) == snapshots[192]
        kv = [i for i, layer in enumerate(SPEC.layers) if layer.kind == "mla"]
        assert Packer(dst).pack(dst_ref, kv).tobytes() == Packer(src).pack(CacheRef(blocks, 192, slot), kv).tobytes()
        with pytest.raises(ConfigError):
            engine.store_state(turn1, CacheRef(blocks, 100, slot))  # not a block boundary
    finally:
        engine.close()
        other.close()
        pool.close()
