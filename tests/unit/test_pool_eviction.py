"""Eviction policies: LRU order, S3-FIFO scan resistance, pins respected."""

import pytest

from kvlink.errors import ConfigError
from kvlink.pool.eviction import LRU, S3FIFO, make_policy


def k(i):
    return i.to_bytes(4, "little")


def run(policy, capacity, trace, size=1):
    """Replay reads of ``trace`` through a cache of ``capacity`` entries; returns the hit ratio."""
    resident, hits = set(), 0
    for key in trace:
        if key in resident:
            hits += 1
            policy.touch(key)
            continue
        while len(resident) >= capacity:
            victim = policy.victim(lambda _: False)
            policy.remove(victim)
            resident.discard(victim)
        policy.admit(key, size)
        resident.add(key)
    return hits / len(trace)


def test_lru_evicts_least_recent_and_skips_pins():
    lru = LRU(3)
    for i in range(3):
        lru.admit(k(i), 1)
    lru.touch(k(0))
    assert lru.victim(lambda key: False) == k(1)
    assert lru.victim(lambda key: key == k(1)) == k(2)


def test_s3fifo_resists_a_scan_that_flushes_lru():
    hot = [k(i) for i in range(20)]
    trace = []
    for round_ in range(30):
        trace += hot
        trace += [k(1000 + round_ * 100 + j) for j in range(60)]  # a scan of one-off prefixes
    lru, s3 = run(LRU(50), 50, trace), run(S3FIFO(50), 50, trace)
    assert s3 > 0.2 and s3 > lru + 0.15, (lru, s3)


def test_s3fifo_never_picks_a_pinned_key_and_reports_none_when_all_are():
    s3 = S3FIFO(10)
    for i in range(5):
        s3.admit(k(i), 1)
    assert s3.victim(lambda key: key != k(3)) == k(3)
    assert s3.victim(lambda key: True) is None


def test_ghost_brings_a_returning_key_into_main():
    s3 = S3FIFO(10)
    s3.admit(k(1), 1)
    victim = s3.victim(lambda key: False)
    assert victim == k(1)
    s3.remove(victim)
    s3.admit(k(1), 1)  # back soon after: goes to main directly
    assert k(1) in s3._main


def test_factory():
    assert isinstance(make_policy("lru", 1), LRU) and isinstance(make_policy("s3fifo", 1), S3FIFO)
    with pytest.raises(ConfigError):
        make_policy("random", 1)
