"""The trace loader, the per-cluster prefix pools and the trace-driven PrfaaS run."""

import json
import time
from pathlib import Path

import pytest

from kvlink.errors import ConfigError
from kvlink.route import cases
from kvlink.route.trace import BLOCK_TOKENS, PrefixPool, load_trace, route, run_trace

MOONCAKE = Path(__file__).parents[3] / "shared" / "traces" / "mooncake-conversation.jsonl"


def _write(path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loader_sorts_by_arrival_and_names_the_bad_line(tmp_path):
    good = _write(tmp_path / "t.jsonl", [
        {"timestamp": 2000, "input_length": 1500, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]},
    ])
    trace = load_trace(good)
    assert [r.arrival_s for r in trace] == [0.5, 2.0] and trace[1].hash_ids == (1, 2, 3)
    assert len(load_trace(good, limit=1)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"timestamp": 1, "input_length": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3"):
        load_trace(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")


def test_pool_matches_leading_blocks_and_respects_its_lru_capacity():
    pool = PrefixPool(4)
    pool.insert([1, 2, 3])
    assert pool.lookup([1, 2, 9, 3]) == 2  # a chained identity: the hit stops at the first miss
    assert pool.lookup([2, 3]) == 2 and pool.lookup([9, 1]) == 0
    pool.lookup([1])  # 1 is now the most recently used, 2 the least
    pool.insert([5, 6])
    assert len(pool) == 4 and 2 not in pool and all(b in pool for b in (1, 3, 5, 6))  # 1 survived: refreshed
    off = PrefixPool(0)
    off.insert([1, 2])
    assert len(off) == 0 and off.lookup([1]) == 0
    with pytest.raises(ConfigError):
        PrefixPool(-1)


def test_a_shared_prefix_reduces_the_incremental_length_and_the_bytes_shipped(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 5 * BLOCK_TOKENS, "output_length": 8, "hash_ids": [1, 2, 3, 4, 5]},
        # the next turn of the same conversation: the first four blocks are the same prefix
        {"timestamp": 1000, "input_length": 6 * BLOCK_TOKENS + 100, "output_length": 8,
         "hash_ids": [1, 2, 3, 4, 10, 11, 12]},
        {"timestamp": 2000, "input_length": 700, "output_length": 8, "hash_ids": [20, 21]},
    ]
    trace = load_trace(_write(tmp_path / "t.jsonl", rows))
    with_pool = route(trace, threshold=1000, pool_blocks=100, kv=cases.KV)
    without = route(trace, threshold=1000, pool_blocks=0, kv=cases.KV)
    assert list(without.incremental) == [r.input_length for r in trace]
    assert with_pool.incremental[1] == trace[1].input_length - 4 * BLOCK_TOKENS
    assert with_pool.local_cached[1] == 4 * BLOCK_TOKENS and with_pool.incremental[2] == 700
    # both prompts exceed the threshold from scratch; the pooled second one stays local
    assert without.remote.tolist() == [True, True, False] and with_pool.remote.tolist() == [True, True, False]
    assert with_pool.shipped_bytes[1] == pytest.approx(cases.KV(trace[1].input_length - 4 * BLOCK_TOKENS))
    assert with_pool.shipped_bytes.sum() < without.shipped_bytes.sum()
    local_only = route(trace, threshold=2000, pool_blocks=100, kv=cases.KV)
    assert local_only.remote.tolist() == [True, False, False]  # 1,636 incremental tokens <= 2,000


def test_trace_run_conserves_requests_and_accounts_the_link(tmp_path):
    rows = [{"timestamp": 400 * i, "input_length": 2000 + 3000 * (i % 7), "output_length": 50,
             "hash_ids": [i % 5] + [1000 * i + k for k in range(1, 4 + 6 * (i % 7))]} for i in range(300)]
    path = _write(tmp_path / "t.jsonl", rows)
    result = run_trace(path, pool_blocks=2000, speedup=2.0)
    for run in result["runs"].values():
        assert run["sim"]["finished"] == run["sim"]["arrived"] == 300
        assert run["link_gb_simulated"] == pytest.approx(run["link_gb"], rel=1e-6)
    pooled, plain = result["runs"]["pool"], result["runs"]["no_pool"]
    assert plain["hit_rate_local"] == 0 and pooled["hit_rate_local"] > 0
    assert pooled["mean_incremental"] < plain["mean_incremental"]
    assert result["offered_rps"] == pytest.approx(300 / (299 * 0.4 / 2.0))
    with pytest.raises(ConfigError):
        run_trace(path, speedup=0)


@pytest.mark.skipif(not MOONCAKE.exists(), reason="the Mooncake trace is not checked out")
def test_the_whole_mooncake_trace_simulates_in_seconds():
    started = time.monotonic()
    result = run_trace(MOONCAKE)
    assert time.monotonic() - started < 15
    pooled, plain = result["runs"]["pool"], result["runs"]["no_pool"]
    assert result["requests"] == 12031 and pooled["sim"]["finished"] == 12031
    assert 0 < pooled["hit_rate_local"] < 1 and pooled["link_gb"] < plain["link_gb"]
