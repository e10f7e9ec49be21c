"""The SSD tier on real files and a real RocksDB: restart, SIGKILL mid-write, corruption, disk full."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kvlink.errors import ChecksumMismatch, PoolError
from kvlink.pool.ssd import SsdTier


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") + b"kvlink-t"


def test_roundtrip_and_restart(tmp_path):
    data = {key(i): os.urandom(100_000 + i) for i in range(5)}
    with SsdTier(tmp_path, 10 << 20) as tier:
        for k, v in data.items():
            assert tier.put(k, v)
        assert tier.put(key(9), [b"head", memoryview(b"-and-"), bytearray(b"tail")])
        assert bytes(tier.get(key(9))) == b"head-and-tail"
        assert tier.delete(key(9)) and key(9) not in tier
    with SsdTier(tmp_path, 10 << 20) as tier:  # a new process would see the same
        assert len(tier) == 5 and tier.used_bytes == sum(map(len, data.values()))
        for k, v in data.items():
            out = bytearray(len(v))
            tier.get(k, out=out)
            assert bytes(out) == v
        with pytest.raises(PoolError):
            tier.get(key(9))


def test_capacity_refuses(tmp_path):
    with SsdTier(tmp_path, 1 << 20) as tier:
        assert tier.put(key(1), bytes(600_000))
        assert not tier.put(key(2), bytes(600_000))
        assert tier.put(key(1), bytes(900_000))  # replacing counts the old size out
        assert tier.stats["put_full"] == 1


def test_corrupt_and_truncated_entries_are_dropped(tmp_path):
    with SsdTier(tmp_path, 10 << 20) as tier:
        tier.put(key(1), os.urandom(50_000))
        tier.put(key(2), os.urandom(50_000))
    path = tmp_path / "data" / key(1).hex()
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(raw)
    with open(tmp_path / "data" / key(2).hex(), "r+b") as f:
        f.truncate(1000)
    with SsdTier(tmp_path, 10 << 20) as tier:
        assert key(2) not in tier and tier.stats["recovered_dropped"] == 1  # wrong size: found at open
        with pytest.raises(ChecksumMismatch):
            tier.get(key(1))
        assert key(1) not in tier
    with SsdTier(tmp_path, 10 << 20) as tier:
        assert len(tier) == 0


WRITER = textwrap.dedent("""
    import os, sys
    from kvlink.pool.ssd import SsdTier
    tier = SsdTier(sys.argv[1], 1 << 34)
    i = 0
    while True:
        k = i.to_bytes(8, "little") + b"kvlink-t"
        tier.put(k, os.urandom(1 << 20))
        print(i, flush=True)
        i += 1
""")


def test_sigkill_mid_write_leaves_only_complete_entries(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    done = []
    for line in proc.stdout:
        done.append(int(line))
        if len(done) >= 25:
            break
    proc.kill()  # SIGKILL: mid-write of some later entry
    proc.wait()
    with SsdTier(tmp_path, 1 << 34) as tier:
        for i in done:
            assert key(i) in tier  # every acknowledged put survived the process
        for k in tier.keys():
            assert len(tier.get(k)) == 1 << 20  # and every visible entry verifies
        assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tiny tmpfs")
def test_disk_full_means_not_stored(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        with SsdTier(mnt, 1 << 30) as tier:
            assert not tier.put(key(1), bytes(3 << 20))
            assert tier.stats["disk_full"] == 1 and key(1) not in tier
            assert tier.put(key(2), bytes(100_000))  # still works for what fits
            assert not list((mnt / "tmp").iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])
