"""The hybrid prefix index: a hit ends where KV and state (and sliding windows) all exist."""

import time

import pytest

from kvlink.errors import ConfigError, PoolError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixIndex, block_hashes, prefix_root
from kvlink.presets import get_preset
from kvlink.spec import CacheSpec, FullAttention, LinearAttention, SlidingWindow

HYBRID = get_preset("kimi-linear-48b-a3b")       # MLA + linear attention
DENSE = get_preset("llama-3-70b")                # full attention only
SLIDE = CacheSpec("slide", (FullAttention(2, 8), SlidingWindow(2, 8, window=100),
                            LinearAttention((2, 4, 4), "float32", None)))
SIZES = {FULL: 1000, SLIDING: 100, STATE: 5000}


def prompt(n, seed=0):
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_chained_hashes_depend_on_the_whole_prefix_model_and_namespace():
    a, b = prompt(64), prompt(64)
    b[3] += 1
    ha, hb = block_hashes(a, 16, b"r" * 16), block_hashes(b, 16, b"r" * 16)
    assert len(ha) == 4 and ha[0] != hb[0] and all(x != y for x, y in zip(ha, hb))  # a change ripples down
    assert block_hashes(a[:63], 16, b"r" * 16) == ha[:3]                             # partial block: no hash
    assert prefix_root(HYBRID) != prefix_root(DENSE) != prefix_root(DENSE, "tenant-b")
    with pytest.raises(ConfigError):
        block_hashes([-1], 1, b"r")


def test_dense_model_hits_on_the_longest_cached_block_run():
    index = PrefixIndex(DENSE, 16)
    index.insert(prompt(160), SIZES)
    hit = index.lookup(prompt(160) + [1, 2, 3])
    assert hit.tokens == 160 and len(hit.full) == 10 and hit.state is None
    shared = prompt(100) + [9] * 60  # diverges inside block 6
    assert index.lookup(shared).tokens == 96


def test_hybrid_hit_stops_at_the_last_boundary_with_state():
    index = PrefixIndex(HYBRID, 16)
    tokens = prompt(256)
    index.insert(tokens, SIZES, state_after=[3, 9])  # checkpoints at tokens 64 and 160
    hit = index.lookup(tokens)
    assert hit.kv_tokens == 256 and hit.tokens == 160
    assert hit.state == index.hashes(tokens)[9] and len(hit.full) == 10
    assert "state" in hit.stopped
    # KV present, state missing everywhere: no hit at all, never KV without its state.
    other = PrefixIndex(HYBRID, 16)
    other.insert(tokens, SIZES)
    assert other.lookup(tokens).tokens == 0
    # A shorter prompt sharing the prefix can use the checkpoint at 64 only.
    assert index.lookup(tokens[:150]).tokens == 64


def test_state_alone_is_useless_without_the_kv_before_it():
    index = PrefixIndex(HYBRID, 16)
    tokens = prompt(128)
    index.insert(tokens, SIZES, full_blocks=range(4), state_after=[7])
    assert index.lookup(tokens).tokens == 0


def test_sliding_window_blocks_must_cover_the_window_at_the_boundary():
    index = PrefixIndex(SLIDE, 16)  # window 100 tokens -> 7 blocks of 16
    tokens = prompt(320)
    assert index.window_blocks == 7
    # Sliding KV only for the last window of the prompt, state at the end and at block 9.
    index.insert(tokens, SIZES, state_after=[9, 19])
    assert index.lookup(tokens).tokens == 320
    hit = index.lookup(tokens[:200])  # boundary at block 10 (160 tokens): its window is not stored
    assert hit.tokens == 0 and "sliding" in hit.stopped
    index.insert(tokens, SIZES, sliding_blocks=range(3, 10))
    hit = index.lookup(tokens[:200])
    assert hit.tokens == 160 and hit.sliding == tuple(index.hashes(tokens)[3:10])


def test_models_and_namespaces_never_match():
    tokens = prompt(64)
    a = PrefixIndex(DENSE, 16)
    a.insert(tokens, SIZES)
    b = PrefixIndex(DENSE, 16, namespace="tenant-b")
    assert not set(a.hashes(tokens)) & set(b.hashes(tokens))
    c = PrefixIndex(get_preset("qwen3-235b-a22b"), 16)
    assert not set(a.hashes(tokens)) & set(c.hashes(tokens))


def test_pinned_entries_survive_eviction_pressure():
    index = PrefixIndex(HYBRID, 16)
    hot, cold = prompt(128, seed=1), prompt(128, seed=2)
    index.insert(hot, SIZES, state_after=[7])
    index.insert(cold, SIZES, state_after=[7])
    lease = index.pin(index.lookup(hot))
    dropped = index.evict(10 ** 9)  # evict everything that can go
    assert {e.key for e in dropped} >= set(index.hashes(cold))
    assert index.lookup(hot).tokens == 128 and index.lookup(cold).tokens == 0
    lease.release()
    index.evict(10 ** 9)
    assert index.lookup(hot).tokens == 0 and index.stats()["bytes"] == 0


def test_eviction_is_lru_and_trims_prefixes_from_their_end():
    index = PrefixIndex(DENSE, 16)
    old, new = prompt(64, seed=3), prompt(64, seed=4)
    index.insert(old, SIZES)
    index.insert(new, SIZES)
    index.lookup(new)  # touched: most recent
    dropped = index.evict(1000)
    assert [e.key for e in dropped] == [index.hashes(old)[-1]]
    assert index.lookup(old).tokens == 48 and index.lookup(new).tokens == 64


def test_checkpoint_plan_and_bad_inserts():
    index = PrefixIndex(HYBRID, 16, checkpoint_every=4)
    assert index.checkpoints_for(10) == [3, 7, 9]
    assert PrefixIndex(DENSE, 16).checkpoints_for(10) == []
    with pytest.raises(PoolError):
        index.insert(prompt(32), SIZES, state_after=[5])
    with pytest.raises(PoolError):
        PrefixIndex(DENSE, 16).insert(prompt(32), SIZES, state_after=[0])


def test_lookup_of_a_128k_prompt_is_fast():
    index = PrefixIndex(HYBRID, 64)
    tokens = prompt(131072)
    index.insert(tokens, SIZES, state_after=index.checkpoints_for(2048))
    index.lookup(tokens)
    # Best of several: the bound (~5x the 2-core figure in benchmarks/pool.py) catches a lookup that
    # went quadratic or hashes twice, not the noise of a loaded machine.
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        hit = index.lookup(tokens)
        best = min(best, time.perf_counter() - t0)
    assert hit.tokens == 131072
    assert best < 0.02, best
