"""The SSD tier on real files and a real RocksDB: restart, SIGKILL mid-write, corruption, disk full."""

import os
import shutil
import subprocess
import sys
import textwrap
import threading

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


def flip_bit(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_corrupt_and_truncated_entries_are_dropped(tmp_path):
    with SsdTier(tmp_path, 10 << 20) as tier:
        tier.put(key(1), os.urandom(50_000))
        tier.put(key(2), os.urandom(50_000))
        tier.put(key(3), os.urandom(50_000))
        where = {i: tier.locate(key(i)) for i in (1, 2, 3)}
    assert where[1][0] == where[2][0] and where[2][1] == where[1][1] + 50_000  # appended, side by side
    flip_bit(where[2][0], where[2][1] + 1234)
    with open(where[3][0], "r+b") as f:
        f.truncate(where[3][1] + 1000)  # the last entry's bytes cut short
    with SsdTier(tmp_path, 10 << 20) as tier:
        assert key(3) not in tier and tier.stats["recovered_dropped"] == 1  # past its segment's end: found at open
        with pytest.raises(ChecksumMismatch):
            tier.get(key(2))
        assert key(2) not in tier
        assert len(tier.get(key(1))) == 50_000  # its neighbours are untouched
    with SsdTier(tmp_path, 10 << 20) as tier:
        assert tier.keys() == [key(1)]


def test_space_of_dead_entries_comes_back(tmp_path):
    # 1 MiB segments; capacity 8 MiB, so dead bytes over 2 MiB trigger compaction.
    with SsdTier(tmp_path, 8 << 20, segment_bytes=1 << 20) as tier:
        blobs = {i: os.urandom(256 << 10) for i in range(24)}  # 6 MiB over 6 segments
        for i, b in blobs.items():
            assert tier.put(key(i), b)
        for i in range(4):  # a whole segment's entries: the segment goes
            tier.delete(key(i))
        assert tier.stats["segments_reclaimed"] == 1 and tier.stats["entries_compacted"] == 0
        for i in range(4, 24, 2):  # half of every other segment: dead bytes pass 2 MiB
            tier.delete(key(i))
        assert tier.stats["entries_compacted"] > 0
        assert tier.disk_bytes - tier.used_bytes <= 2 << 20
        for i in range(5, 24, 2):
            assert bytes(tier.get(key(i))) == blobs[i]
    with SsdTier(tmp_path, 8 << 20, segment_bytes=1 << 20) as tier:  # and after a restart
        assert sorted(tier.keys()) == sorted(key(i) for i in range(5, 24, 2))
        assert all(bytes(tier.get(key(i))) == blobs[i] for i in range(5, 24, 2))


def test_replaced_entry_reads_its_new_bytes_and_frees_the_old(tmp_path):
    with SsdTier(tmp_path, 4 << 20, segment_bytes=1 << 20) as tier:
        assert tier.put(key(1), b"a" * (600 << 10))
        assert tier.put(key(1), b"b" * (700 << 10))  # does not fit the first segment: a new one
        assert bytes(tier.get(key(1))) == b"b" * (700 << 10)
        assert tier.used_bytes == 700 << 10 and tier.disk_bytes == 700 << 10


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


CHURNER = textwrap.dedent("""
    import os, random, sys
    from kvlink.pool.ssd import SsdTier
    # A small capacity and keys replaced in random order: segments are left part dead, so
    # compaction keeps moving entries.
    tier = SsdTier(sys.argv[1], 4 << 20)
    rng = random.Random(1)
    i = 0
    while True:
        k = rng.randrange(48).to_bytes(8, "little") + b"kvlink-t"
        tier.delete(k)
        tier.put(k, bytes([i % 251]) * (64 << 10))
        print(i, tier.stats["entries_compacted"], flush=True)
        i += 1
""")


def test_sigkill_during_compaction_leaves_only_complete_entries(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHURNER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    compacted = 0
    for line in proc.stdout:
        compacted = int(line.split()[1])
        if compacted >= 20 or int(line.split()[0]) >= 5000:  # well into compaction (bounded)
            break
    proc.kill()
    proc.wait()
    assert compacted >= 20
    with SsdTier(tmp_path, 4 << 20) as tier:
        assert len(tier) > 0
        for k in tier.keys():
            data = bytes(tier.get(k))  # every visible entry verifies
            assert len(data) == 64 << 10 and data == data[:1] * len(data)
        assert tier.disk_bytes <= tier.capacity + (tier.capacity // 4) + (1 << 20)


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
            assert tier.disk_bytes == 100_000  # the failed write's bytes were given back
    finally:
        subprocess.run(["umount", str(mnt)])


def test_reads_during_compaction_never_see_a_moved_entry_as_corrupt(tmp_path):
    # One thread deletes and re-stores entries (the same bytes per key), which keeps compaction
    # moving entries and deleting segments; readers meanwhile get each key: its bytes or a miss.
    blobs = {i: os.urandom(64 << 10) for i in range(48)}
    with SsdTier(tmp_path, 4 << 20, segment_bytes=256 << 10) as tier:
        for i, b in blobs.items():
            assert tier.put(key(i), b)
        failures, stop = [], threading.Event()

        def read() -> None:
            while not stop.is_set():
                for i, b in blobs.items():
                    try:
                        if bytes(tier.get(key(i))) != b:
                            failures.append(f"wrong bytes for {i}")
                    except ChecksumMismatch as exc:
                        failures.append(repr(exc))
                    except PoolError:
                        pass  # deleted at that moment: a miss is fine

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        try:
            for round_ in range(80):
                for i in range(round_ % 2, 48, 2):
                    tier.delete(key(i))
                for i in range(round_ % 2, 48, 2):
                    assert tier.put(key(i), blobs[i])
        finally:
            stop.set()
            for r in readers:
                r.join()
        assert not failures, failures[:3]
        assert tier.stats["entries_compacted"] > 0 and tier.stats["corrupt"] == 0
        assert all(bytes(tier.get(key(i))) == b for i, b in blobs.items())


def test_entries_of_the_file_per_entry_layout_are_dropped_at_open(tmp_path):
    import struct

    from rocksdict import Options, Rdict

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / key(1).hex()).write_bytes(b"x" * 100)
    db = Rdict(str(tmp_path / "index"), Options(raw_mode=True))
    db[key(1)] = struct.pack("<4sBQQd", b"KVLS", 1, 100, 0, 0.0)  # the version-1 record
    db.close()
    with SsdTier(tmp_path, 1 << 20) as tier:
        assert len(tier) == 0 and tier.stats["recovered_dropped"] == 1
        assert not (tmp_path / "data" / key(1).hex()).exists()
        assert tier.put(key(1), b"y" * 100) and bytes(tier.get(key(1))) == b"y" * 100


def test_make_room_drops_the_oldest_segment_and_moves_what_must_stay(tmp_path):
    with SsdTier(tmp_path, 4 << 20, segment_bytes=1 << 20) as tier:
        blobs = {i: os.urandom(256 << 10) for i in range(16)}  # exactly full: 4 segments of 4
        for i, b in blobs.items():
            assert tier.put(key(i), b)
        assert not tier.fits(1)
        dropped = tier.make_room(300 << 10, keep=lambda k: k == key(1))
        assert dropped == [key(0), key(2), key(3)]  # the oldest segment was enough
        assert tier.fits(300 << 10) and tier.stats["evicted"] == 3
        assert bytes(tier.get(key(1))) == blobs[1]  # kept: moved to the newest segment
        assert all(bytes(tier.get(key(i))) == blobs[i] for i in range(4, 16))
        dropped = tier.make_room(2 << 20)  # then the next oldest, whole segments at a time
        assert dropped == [key(i) for i in range(4, 12)] and tier.fits(2 << 20)


class RecordingTier(SsdTier):
    """A real tier that also notes what read-ahead asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def prefetch(self, keys) -> None:
        self.asked.append(list(keys))
        super().prefetch(keys)


def test_read_ahead_leaves_runs_to_the_kernel_and_asks_for_jumps_early(tmp_path):
    from kvlink.pool.readahead import ReadAhead

    with RecordingTier(tmp_path, 8 << 20) as tier:
        blobs = {i: os.urandom(64 << 10) for i in range(8)}
        for i, b in blobs.items():
            tier.put(key(i), b)
        order = [key(i) for i in (0, 1, 2, 5, 6, 3)]  # jumps at 5 and at 3
        reader = ReadAhead(tier, order, ahead=100 << 10)
        seen = []
        for k in order:
            reader.before(k)
            seen.append((k, [a for call in tier.asked for a in call]))
            assert bytes(tier.get(k)) == blobs[int.from_bytes(k[:8], "little")]
        assert seen[0][1] == []  # a sequential run is left to the kernel's read-ahead
        assert seen[1][1] == [key(5)]  # 5 is within 100 KiB of the read of 1: asked for early
        assert seen[3][1] == [key(5), key(3)]
        assert [a for call in tier.asked for a in call] == [key(5), key(3)]  # each once


def test_open_descriptors_stay_bounded_across_many_segments(tmp_path):
    from kvlink.pool.segments import MAX_OPEN

    def open_segments() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").endswith(".kvs") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    blobs = {i: os.urandom(64 << 10) for i in range(3 * MAX_OPEN)}
    with SsdTier(tmp_path, 64 << 20, segment_bytes=64 << 10) as tier:  # one entry per segment
        for i, b in blobs.items():
            assert tier.put(key(i), b)
        assert len(tier._segments.sizes()) == len(blobs)
        assert all(bytes(tier.get(key(i))) == b for i, b in blobs.items())
        assert open_segments() <= MAX_OPEN
    with SsdTier(tmp_path, 64 << 20, segment_bytes=64 << 10) as tier:  # reopened: opened on use
        assert open_segments() == 0
        assert all(bytes(tier.get(key(i))) == b for i, b in blobs.items())
        assert open_segments() <= MAX_OPEN
    assert open_segments() == 0
