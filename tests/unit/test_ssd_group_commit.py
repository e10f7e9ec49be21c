"""The SSD tier's group commit (issue 19): a batch of puts costs one data sync per segment it
touched and one index write; a writer killed mid-batch leaves only entries that verify; the
pool's write-through stores a whole call as one batch, tensors included; reads land in the
caller's buffers (bytes-like or CPU tensors)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvlink.config import PoolConfig
from kvlink.errors import ConfigError, LengthError
from kvlink.pool.index import FULL
from kvlink.pool.pool import Pool, tier_key
from kvlink.pool.ssd import SsdTier
from kvlink.presets import get_preset

BS = 16


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"kvlink-g"


class SyncCounter:
    """Counts ``os.fdatasync`` calls (then makes the real call) and the index's batch writes."""

    def __init__(self, monkeypatch):
        self.data_syncs = 0
        real = os.fdatasync

        def fdatasync(fd):
            self.data_syncs += 1
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)


class CountingDb:
    """The tier's RocksDB, counting writes that reach it (every call goes to the real one)."""

    def __init__(self, db):
        self._db, self.batches, self.puts = db, 0, 0

    def write(self, batch, opts):
        self.batches += 1
        return self._db.write(batch, opts)

    def put(self, *args):
        self.puts += 1
        return self._db.put(*args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_a_durable_batch_syncs_each_segment_once_and_writes_the_index_once(tmp_path, monkeypatch):
    with SsdTier(tmp_path, 64 << 20, durable=True, segment_bytes=256 << 10) as tier:
        db = tier._db = CountingDb(tier._db)
        syncs = SyncCounter(monkeypatch)
        blobs = [os.urandom(100 << 10) for _ in range(8)]  # 800 KiB over 256 KiB segments: several
        assert tier.put_many([(key(i), b, None) for i, b in enumerate(blobs)]) == [True] * 8
        segments = {tier.extent(key(i))[0] for i in range(8)}
        assert len(segments) >= 3
        assert syncs.data_syncs == len(segments)  # not one per entry
        assert (db.batches, db.puts) == (1, 0)
        for i, b in enumerate(blobs):
            assert bytes(tier.get(key(i))) == b


def test_a_batch_stores_what_fits_and_says_which(tmp_path):
    with SsdTier(tmp_path, 250 << 10) as tier:
        items = [(key(0), b"a" * (100 << 10), None), (key(1), b"b" * (200 << 10), None),
                 (key(2), b"c" * (100 << 10), None)]
        assert tier.put_many(items) == [True, False, True]  # the second would pass the capacity
        assert "capacity" in tier.last_refusal
        assert bytes(tier.get(key(2))) == b"c" * (100 << 10) and key(1) not in tier
        with pytest.raises(ConfigError):
            tier.put_many([(key(3), b"x", None), (b"", b"y", None)])  # checked before anything is written
        assert key(3) not in tier


def test_a_batch_replacing_its_own_keys_keeps_the_last(tmp_path):
    with SsdTier(tmp_path, 1 << 20) as tier:
        assert tier.put_many([(key(0), b"old", None), (key(0), b"new!", None)]) == [True, True]
        assert bytes(tier.get(key(0))) == b"new!" and tier.used_bytes == 4


WRITER = textwrap.dedent("""
    import os, sys
    from kvlink.pool.ssd import SsdTier
    tier = SsdTier(sys.argv[1], 1 << 34, durable=True, segment_bytes=1 << 20)
    batch = 0
    while True:
        keys = [(batch * 8 + i).to_bytes(8, "little") + b"kvlink-g" for i in range(8)]
        print("start", batch, flush=True)
        assert all(tier.put_many([(k, os.urandom(192 << 10), None) for k in keys]))
        print("done", batch, flush=True)
        batch += 1
""")


def test_sigkill_mid_batch_leaves_every_indexed_entry_whole(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    done = []
    try:
        for line in proc.stdout:
            word, batch = line.split()
            if word == "done":
                done.append(int(batch))
            elif len(done) >= 6:  # a batch has just started: the kill lands inside it
                break
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    assert len(done) >= 6
    with SsdTier(tmp_path, 1 << 34, durable=True, segment_bytes=1 << 20) as tier:
        for b in done:  # every acknowledged batch survived whole
            assert all(key(b * 8 + i) in tier for i in range(8))
        for k in tier.keys():  # and every entry the index names verifies
            assert len(tier.get(k)) == 192 << 10


def pool_config(tmp_path, **kw):
    base = dict(block_size=BS, host_bytes=8 << 20, page_bytes=4096, ssd_dir=str(tmp_path / "ssd"),
                ssd_bytes=64 << 20, ssd_durable=True, write_mode="through")
    base.update(kw)
    return PoolConfig(**base)


def test_write_through_stores_cpu_tensors(tmp_path):
    """Regression: write-through raised TypeError (memoryview of a tensor) for tensor pieces."""
    spec = get_preset("kimi-linear-48b-a3b")
    tokens = [(i * 31) % 50000 for i in range(3 * BS)]
    kv = torch.randn(64, 96, dtype=torch.float32).to(torch.bfloat16)
    head, tail = torch.arange(1000, dtype=torch.int64), b"tail-bytes"
    pieces = {(FULL, 0): kv, (FULL, 1): [head, tail], (FULL, 2): torch.ones(7, dtype=torch.uint8)}
    expect = [kv.view(torch.uint8).numpy().tobytes(), head.numpy().tobytes() + tail, b"\x01" * 7]
    with Pool(spec, pool_config(tmp_path)) as pool:
        report = pool.store(tokens, pieces)
        assert (report.stored, report.on_ssd, report.errors) == (3, 3, [])
        keys = pool.index.hashes(tokens)
    with SsdTier(tmp_path / "ssd", 64 << 20) as tier:  # what reached the disk, read back alone
        for k, data in zip(keys, expect):
            assert bytes(tier.get(tier_key(FULL, k))) == data


def test_write_through_commits_a_store_call_as_one_batch(tmp_path, monkeypatch):
    spec = get_preset("kimi-linear-48b-a3b")
    tokens = [(i * 17) % 50000 for i in range(6 * BS)]
    with Pool(spec, pool_config(tmp_path)) as pool:
        db = pool.ssd._db = CountingDb(pool.ssd._db)
        syncs = SyncCounter(monkeypatch)
        report = pool.store(tokens, {(FULL, b): os.urandom(20 << 10) for b in range(6)})
        assert report.on_ssd == 6
        segments = {pool.ssd.extent(tier_key(FULL, k))[0] for k in pool.index.hashes(tokens)}
        assert syncs.data_syncs == len(segments) == 1 and db.batches == 1


def test_reads_land_in_caller_buffers(tmp_path):
    with SsdTier(tmp_path, 1 << 20) as tier:
        blobs = [os.urandom(1000 + i) for i in range(3)]
        tier.put_many([(key(i), b, None) for i, b in enumerate(blobs)])
        staging = torch.zeros(sum(len(b) for b in blobs), dtype=torch.uint8)
        outs, at = [], 0
        for b in blobs:
            outs.append(staging[at: at + len(b)])
            at += len(b)
        got = list(tier.get_many([key(i) for i in range(3)], outs=outs))
        assert [bytes(g) for g in got] == blobs
        assert staging.numpy().tobytes() == b"".join(blobs)  # in place: no copy was handed back
        buf = bytearray(len(blobs[0]))
        assert tier.get(key(0), out=buf) is not None and bytes(buf) == blobs[0]
        with pytest.raises(LengthError):
            list(tier.get_many([key(0), key(1)], outs=outs[:1]))
        with pytest.raises(ConfigError):
            tier.get(key(0), out=torch.empty(len(blobs[0]), dtype=torch.uint8, device="meta"))
