"""The in-process pool over host and SSD tiers: hybrid hits, demotion, promotion, restart, pins."""

import os

import pytest
import torch

from kvlink.config import PoolConfig
from kvlink.errors import ConfigError
from kvlink.pool.index import FULL, STATE
from kvlink.pool.pool import Pool
from kvlink.presets import get_preset

HYBRID = get_preset("kimi-linear-48b-a3b")
BS = 16


def prompt(n, seed=0):
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def pieces(tokens, state_after, seed=0):
    """Random bytes for each block's KV and each state checkpoint (what an engine would pack)."""
    n = len(tokens) // BS
    out = {(FULL, b): os.urandom(3000 + b) for b in range(n)}
    out.update({(STATE, b): os.urandom(5000) for b in state_after})
    return out


def cfg(tmp_path, **kw):
    base = dict(block_size=BS, host_bytes=64 << 10, page_bytes=4096, ssd_dir=str(tmp_path / "ssd"),
                ssd_bytes=64 << 20, policy="lru")
    base.update(kw)
    return PoolConfig(**base)


def check_fetch(pool, tokens, stored):
    hit = pool.lookup(tokens)
    got = pool.fetch(hit)
    keys = pool.index.hashes(tokens)
    for (kind, block), data in stored.items():
        if (kind, keys[block]) in got:
            assert bytes(got[(kind, keys[block])]) == data
    return hit, got


def test_store_lookup_fetch_exact_and_hybrid_rule(tmp_path):
    tokens = prompt(256)
    stored = pieces(tokens, [7])
    with Pool(HYBRID, cfg(tmp_path)) as pool:
        assert pool.store(tokens, stored).stored == len(stored)
        hit, got = check_fetch(pool, tokens, stored)
        assert hit.tokens == 128 and hit.kv_tokens == 256  # state only at block 7
        assert len(got) == 8 + 1
        assert pool.store(tokens, stored).stored == 0  # already there


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_memory_pressure_demotes_to_ssd_and_hits_promote_back(tmp_path, policy):
    with Pool(HYBRID, cfg(tmp_path, policy=policy)) as pool:
        prompts = [prompt(256, seed=s) for s in range(6)]
        stored = [pieces(p, [15], seed=s) for s, p in enumerate(prompts)]
        for p, s in zip(prompts, stored):
            pool.store(p, s)
        pool.drain()
        first = pool.index.hashes(prompts[0])
        assert pool.where(FULL, first[0]) == ["ssd"]  # pushed out of 64 KiB of host memory
        hit, _ = check_fetch(pool, prompts[0], stored[0])
        assert hit.tokens == 256 and pool.stats["hit_ssd"] > 0
        pool.drain()
        assert "host" in pool.where(FULL, first[-1]) and pool.stats["promoted"] > 0


def test_restart_rebuilds_the_index_from_ssd(tmp_path):
    tokens = prompt(128)
    stored = pieces(tokens, [7])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through")) as pool:
        pool.store(tokens, stored)
        pool.drain()
    with Pool(HYBRID, cfg(tmp_path)) as pool:
        hit, got = check_fetch(pool, tokens, stored)
        assert hit.tokens == 128 and len(got) == 9


def test_write_through_keeps_everything_when_memory_evicts(tmp_path):
    tokens = prompt(256)
    stored = pieces(tokens, [15])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through")) as pool:
        pool.store(tokens, stored)
        pool.drain()
        assert pool.evict(1 << 30) > 0
        assert pool.summary()["tiers"]["host"]["entries"] == 0
        hit, _ = check_fetch(pool, tokens, stored)
        assert hit.tokens == 256


def test_without_ssd_evicted_entries_leave_the_index(tmp_path):
    with Pool(HYBRID, cfg(tmp_path, ssd_dir=None, host_bytes=128 << 10)) as pool:  # 32 pages; a prompt takes 18
        old, new = prompt(256, 1), prompt(256, 2)
        pool.store(old, pieces(old, [15]))
        pool.store(new, pieces(new, [15]))
        assert pool.lookup(old).tokens == 0  # partly evicted: its state or blocks are gone
        assert pool.lookup(new).tokens == 256
        assert pool.stats["dropped"] > 0


def test_pinned_hit_survives_pressure_while_fetched(tmp_path):
    with Pool(HYBRID, cfg(tmp_path, ssd_dir=None)) as pool:
        hot = prompt(128, 3)
        pool.store(hot, pieces(hot, [7]))
        hit = pool.lookup(hot)
        lease = pool.index.pin(hit)
        for s in range(4, 10):  # far more than fits
            other = prompt(128, s)
            pool.store(other, pieces(other, [7]))
        assert pool.lookup(hot).tokens == 128
        lease.release()


def big_pieces(tokens, seed):
    n = len(tokens) // BS
    out = {(FULL, b): os.urandom(60_000) for b in range(n)}
    out[(STATE, n - 1)] = os.urandom(60_000)
    return out


def test_full_ssd_drops_its_oldest_entries_but_not_pinned_ones(tmp_path):
    # Host memory holds 24 entries (~1.4 prompts), the SSD tier 4 MiB (~4 prompts): ten prompts
    # do not fit, so the oldest leave the SSD, except a pinned (being fetched) one.
    with Pool(HYBRID, cfg(tmp_path, ssd_bytes=4 << 20, ssd_segment_bytes=512 << 10, host_bytes=24 * 61440)) as pool:
        prompts = [prompt(256, seed=s) for s in range(10)]
        stored = [big_pieces(t, s) for s, t in enumerate(prompts)]
        for t, p in zip(prompts[:3], stored[:3]):
            pool.store(t, p)
            pool.drain()
        assert pool.where(FULL, pool.index.hashes(prompts[0])[0]) == ["ssd"]
        lease = pool.index.pin(pool.lookup(prompts[0]))
        for t, p in zip(prompts[3:], stored[3:]):
            pool.store(t, p)
            pool.drain()
        assert pool.stats["ssd_evicted"] > 0 and pool.stats["ssd_refused"] == 0
        assert pool.ssd.used_bytes <= 4 << 20
        assert len(list((tmp_path / "ssd" / "data").iterdir())) >= 7  # 512 KiB segments, as configured
        assert pool.lookup(prompts[1]).tokens == 0  # the oldest unpinned prompt is gone
        assert pool.lookup(prompts[-1]).tokens == 256  # the newest is all there
        hit, _ = check_fetch(pool, prompts[0], stored[0])  # pinned: kept, and still correct
        assert hit.tokens == 256
        lease.release()


@pytest.mark.parametrize("into", [False, True], ids=["own-buffers", "into-out"])
@pytest.mark.parametrize("block", [0, 2])
def test_corrupt_ssd_entry_is_dropped_not_returned(tmp_path, into, block):
    """A bit flip on SSD is named as a verification failure, whether the entry is read on the
    caller's thread or landed ahead by the reader thread of ``fetch(hit, out=)`` (where it was
    reported as missing), and leaves no entry of the hit pinned."""
    tokens = prompt(64)
    stored = pieces(tokens, [3])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through")) as pool:
        pool.store(tokens, stored)
        pool.drain()
        pool.evict(1 << 30)
        key = pool.index.hashes(tokens)[block]
        path, offset, _ = pool.ssd.locate(b"F" + key)
        with open(path, "r+b") as f:
            f.seek(offset + 10)
            byte = f.read(1)[0]
            f.seek(offset + 10)
            f.write(bytes([byte ^ 1]))
        from kvlink.errors import PoolError
        hit = pool.lookup(tokens)
        with pytest.raises(PoolError, match="verification"):
            pool.fetch(hit, out=bytearray(pool.hit_nbytes(hit)) if into else None)
        assert pool.lookup(tokens).kv_tokens == block * BS  # the hit now stops before the lost block
        assert pool.stats["corrupt"] == 1
        assert all(e.pins == 0 for e in pool.index._entries.values())


def test_fetch_into_a_buffer_larger_than_the_host_tier(tmp_path):
    """``fetch(hit, out=)`` of a hit larger than the host tier: the entries that find no room to
    land in read straight into ``out``, and every byte is right."""
    tokens = prompt(256)
    stored = pieces(tokens, [15])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through", host_bytes=16 << 10)) as pool:
        pool.store(tokens, stored)
        pool.drain()
        pool.evict(1 << 30)
        hit = pool.lookup(tokens)
        assert hit.tokens == 256
        out = bytearray(pool.hit_nbytes(hit))
        got = pool.fetch(hit, out=out)
        keys = pool.index.hashes(tokens)
        for (kind, block), data in stored.items():
            assert bytes(got[(kind, keys[block])]) == data
        assert sum(len(v) for v in got.values()) == len(out)
        assert pool.stats["hit_ssd"] == len(stored)
        assert pool.stats["hit_host"] == 0  # an entry landed for the read is one hit, not two
        assert all(e.pins == 0 for e in pool.index._entries.values())


def test_config_checks():
    with pytest.raises(ConfigError):
        PoolConfig(policy="mru")
    with pytest.raises(ConfigError):
        PoolConfig(write_mode="sometimes")
    with pytest.raises(ConfigError):
        PoolConfig(ssd_segment_bytes=0)


def test_verified_memory_falls_back_to_ssd_on_a_damaged_page(tmp_path):
    tokens = prompt(64)
    stored = pieces(tokens, [3])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through", verify_memory=True)) as pool:
        pool.store(tokens, stored)
        host = pool.levels[-1][1]
        key = pool.index.hashes(tokens)[1]
        page = host.entry(b"F" + key).pages[0]
        host._page(page)[7] ^= 0x40  # a bit flip in DRAM
        hit, got = check_fetch(pool, tokens, stored)  # the SSD copy is served, intact
        assert hit.tokens == 64 and pool.stats["corrupt"] == 1 and pool.stats["hit_ssd"] >= 1


def test_landed_pieces_are_kept_in_place_and_written_through(tmp_path):
    tokens = prompt(64)
    stored = pieces(tokens, [3])
    with Pool(HYBRID, cfg(tmp_path, write_mode="through")) as pool:
        landed = {}
        for key, data in stored.items():
            landing = pool.landing(len(data))
            landing.view[:] = data  # as a daemon's receiver writes a put
            landed[key] = landing
        assert pool.store(tokens, landed).stored == len(stored)
        for landing in landed.values():
            landing.release()
        host = pool.levels[0][1]
        assert host.stats["adopted"] == len(stored) and host.stats.get("put_full", 0) == 0
        check_fetch(pool, tokens, stored)
        keys = pool.index.hashes(tokens)
        assert all("ssd" in pool.where(kind, keys[block]) for kind, block in stored)
        # Already stored: the new landing is not adopted, and releasing it frees its pages.
        used = host.used_bytes
        again = pool.landing(3000)
        assert pool.store(tokens, {(FULL, 0): again}).stored == 0
        again.release()
        assert host.used_bytes == used
    with Pool(HYBRID, cfg(tmp_path)) as pool:  # what was written through survives a restart
        check_fetch(pool, tokens, stored)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reading_from_ssd_does_not_demote_gpu_entries(tmp_path):
    """Regression: a GPU top tier has no landings, and reading an SSD-only entry through the
    pinned path (the engine's ``load_from_pool``, the daemon's gets: ``pin_hit``) first evicted
    as many bytes of GPU entries to host, for nothing."""
    a, b = prompt(64), prompt(64, seed=1)
    with Pool(HYBRID, cfg(tmp_path, write_mode="through", gpu_bytes=64 << 10, gpu_device="cuda",
                          host_bytes=16 << 10)) as pool:
        stored = pieces(a, [3])
        pool.store(a, stored)
        pool.drain()
        pool.evict(1 << 30)  # a: GPU -> host, where only part of it fits; the rest is on SSD only
        pool.drain()
        keys_a = pool.index.hashes(a)
        assert any(pool.where(FULL, k) == ["ssd"] for k in keys_a)
        pool.store(b, pieces(b, [3], seed=1))
        keys_b = pool.index.hashes(b)
        assert all(pool.where(FULL, k)[0] == "gpu" for k in keys_b)
        hit = pool.lookup(a)
        views, release = pool.pin_hit(hit)
        try:
            for (kind, block), data in stored.items():
                assert b"".join(bytes(memoryview(v).cast("B")) for v in views[(kind, keys_a[block])]) == data
        finally:
            release()
        assert pool.stats["hit_ssd"] >= 1  # an SSD-only entry was read
        assert all(pool.where(FULL, k)[0] == "gpu" for k in keys_b)  # b untouched on the GPU
