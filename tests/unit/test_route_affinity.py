"""Cache-affine routing: node choice by holder prefix, capacity, fallbacks, index outage, stats.

The global index is faked by a dict of tiny hit records: the index is not under test here."""

import json
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from kvlink.errors import ConfigError, PoolError, ResourceLimit
from kvlink.route.affinity import AffinityRouter, KvManager, Node, NodeSet
from kvlink.route.router import Router

PROMPT = list(range(100))


@dataclass
class Hit:
    cluster: str
    tokens: int
    by_holder: dict = field(default_factory=dict)


class FakeIndex:
    """Answers every lookup with ``self.hits``, or raises ``self.error``; records the calls."""

    def __init__(self, hits=None):
        self.hits, self.error, self.calls = hits or {}, None, 0

    def __call__(self, tokens):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.hits


def nodes(capacity=2):
    return [Node("l1", "local", "dl1", capacity), Node("l2", "local", "dl2", capacity),
            Node("l3", "local", "dl3", capacity), Node("r1", "remote", "dr1", capacity),
            Node("r2", "remote", "dr2", capacity)]


def build(hits=None, threshold=50, capacity=2, clock=None):
    index = FakeIndex(hits)
    manager = KvManager(index, ["local", "remote"], **({"clock": clock} if clock else {}))
    return AffinityRouter(Router(threshold), nodes(capacity), manager), index


def test_node_whose_holder_has_the_longest_prefix_is_chosen():
    ar, _ = build({"local": Hit("local", 80, {"dl1": 30, "dl2": 80, "dl3": 10}),
                   "remote": Hit("remote", 90, {"dr1": 90})})
    p = ar.route(PROMPT, bandwidth_abundant=False)
    assert p.decision.cluster == "local" and p.decision.prefix == 80 and p.decision.incremental == 20
    assert p.node.name == "l2" and p.node_prefix == 80 and p.reason == "longest prefix"
    assert ar.nodes.in_flight("l2") == 1


def test_capacity_is_respected_then_the_next_longest_holder_then_all_busy():
    ar, _ = build({"local": Hit("local", 80, {"dl1": 30, "dl2": 80})}, capacity=2)
    got = [ar.route(PROMPT, False) for _ in range(7)]
    # l2 (80) until full, then l1 (30) until full, then l3 (no prefix, least loaded)
    assert [p.node.name for p in got[:6]] == ["l2", "l2", "l1", "l1", "l3", "l3"]
    assert [p.reason for p in got[:6]] == ["longest prefix"] * 4 + ["least loaded"] * 2
    assert got[6].reason == "all busy" and got[6].node.name == "l1"  # all at 2/2: ties by name
    assert ar.nodes.in_flight("l1") == 3
    ar.finished(got[0])
    p = ar.route(PROMPT, False)
    assert p.node.name == "l2" and p.reason == "longest prefix"  # a freed slot on the best holder


def test_ties_go_to_the_least_loaded_node_then_the_name():
    ar, _ = build({"local": Hit("local", 60, {"dl1": 60, "dl2": 60})}, capacity=4)
    first = ar.route(PROMPT, False)
    second = ar.route(PROMPT, False)
    assert (first.node.name, second.node.name) == ("l1", "l2")


def test_all_busy_fallback_prefers_the_least_loaded_relative_to_capacity():
    ns = NodeSet([Node("a", "local", "h", 4), Node("b", "local", "h", 1), Node("c", "remote", "h", 1)])
    for node, n in (("a", 4), ("b", 1)):
        for _ in range(n):
            ns.started(node)
    node, _, reason = ns.acquire("local", {})
    assert reason == "all busy" and node.name == "b"  # both at load 1.0: fewer in flight wins
    node, _, reason = ns.acquire("local", {})
    assert reason == "all busy" and node.name == "a"  # a at 4/4 = 1.0 beats b at 2/1
    assert ns.snapshot() == {"a": 5, "b": 2, "c": 0}


def test_overcommit_is_bounded():
    ns = NodeSet([Node("a", "local", "h", 1)], max_overcommit=1)
    ns.acquire("local", {})
    ns.acquire("local", {})
    with pytest.raises(ResourceLimit):
        ns.acquire("local", {})
    ns.finished("a")
    ns.finished("a")
    with pytest.raises(ConfigError):
        ns.finished("a")  # double release


def test_index_down_routes_by_length_only_and_logs_once_per_minute(caplog):
    now = [1000.0]
    hits = {"local": Hit("local", 90, {"dl3": 90})}
    ar, index = build(hits, threshold=50, clock=lambda: now[0])
    assert ar.route(PROMPT, False).decision.cluster == "local"  # 10 incremental tokens
    index.error = PoolError("index unreachable")
    with caplog.at_level(logging.WARNING, logger="kvlink.route.affinity"):
        p = ar.route(PROMPT, False)
        ar.route(PROMPT, False)
        now[0] += 61
        ar.route(PROMPT, False)
    # nothing cached anywhere: 100 incremental > 50 -> remote, no affinity
    assert p.decision.cluster == "remote" and p.decision.prefix == 0 and p.reason == "least loaded"
    lines = [r for r in caplog.records if "KV index lookup failed" in r.getMessage()]
    assert len(lines) == 2 and "1 more since" in lines[1].getMessage()
    assert ar.manager.index_errors == 3 and ar.stats()["index_down"] == 3
    assert ar.manager.last.error.startswith("PoolError")
    index.error = None
    assert ar.route(PROMPT, False).node.name == "l3"  # back to affinity once the index answers


def test_a_non_kvlink_lookup_failure_is_a_bug_and_propagates():
    ar, index = build()
    index.error = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        ar.route(PROMPT, False)


def test_threshold_crossing_by_incremental_length():
    ar, index = build({"local": Hit("local", 60, {"dl1": 60})}, threshold=50)
    p = ar.route(PROMPT, False)
    assert (p.decision.cluster, p.decision.incremental, p.node.name) == ("local", 40, "l1")
    index.hits = {"local": Hit("local", 40, {"dl1": 40})}
    p = ar.route(PROMPT, False)
    assert (p.decision.cluster, p.decision.incremental, p.decision.prefix) == ("remote", 100, 0)
    assert p.node.cluster == "remote" and p.node_prefix == 0


def test_abundant_bandwidth_orders_a_transfer_and_picks_the_affine_node_in_the_target():
    ar, _ = build({"local": Hit("local", 20, {"dl2": 20}), "remote": Hit("remote", 90, {"dr2": 90})},
                  threshold=50)
    p = ar.route(PROMPT, bandwidth_abundant=True)
    # 10 incremental after taking the remote's 90 -> local, which fetches [20, 90) first
    assert p.decision.cluster == "local" and p.decision.incremental == 10
    t = p.decision.transfer
    assert t is not None and (t.source, t.dest, t.start, t.end) == ("remote", "local", 20, 90)
    assert p.node.name == "l2" and p.node_prefix == 20
    scarce = ar.route(PROMPT, bandwidth_abundant=False)
    assert scarce.decision.transfer is None and scarce.decision.cluster == "remote"
    assert scarce.node.name == "r2" and scarce.node_prefix == 90


def test_impossible_hits_count_as_no_cache():
    ar, index = build({"local": Hit("local", 500, {"dl1": 500}),              # beyond the prompt
                       "remote": Hit("remote", 30, {"dr1": 40, "dr2": 30}),   # dr1 beyond the cluster
                       "elsewhere": Hit("elsewhere", 99)})                     # not ours: ignored
    assert ar.manager.match(PROMPT) == {"local": 0, "remote": 30}
    assert ar.manager.bad_hits == 2
    assert ar.manager.last.holders["remote"] == {"dr2": 30}
    index.hits = {"local": Hit("remote", 10, {"dl1": 10})}  # filed under the wrong cluster
    assert ar.manager.match(PROMPT) == {"local": 0, "remote": 0} and ar.manager.bad_hits == 3
    index.hits = {"local": Hit("local", np.int64(10), {"dl1": np.int32(10), "dl2": True, "dl3": 2.5})}
    assert ar.manager.match(PROMPT) == {"local": 10, "remote": 0} and ar.manager.bad_hits == 5
    assert ar.manager.last.holders["local"] == {"dl1": 10}


def test_stats_are_counted_and_json_able():
    ar, _ = build({"local": Hit("local", 20, {"dl1": 20}), "remote": Hit("remote", 90, {"dr1": 90})})
    a = ar.route(PROMPT, True)
    ar.route(PROMPT, False)
    ar.finished(a)
    s = json.loads(json.dumps(ar.stats()))
    assert s["requests"] == 2 and s["prompt_tokens"] == 200
    assert s["clusters"] == {"local": 1, "remote": 1}
    assert s["reasons"] == {"longest prefix": 2}
    assert s["prefix_tokens_reused"] == 90 + 90 and s["node_prefix_tokens"] == 20 + 90
    assert s["transfers"] == 1 and s["transfer_tokens"] == 70
    assert s["in_flight"] == {"l1": 0, "l2": 0, "l3": 0, "r1": 1, "r2": 0}


def test_concurrent_routes_never_overfill_while_room_remains():
    ar, _ = build({"local": Hit("local", 90, {"dl1": 90})}, capacity=5)
    barrier, out, errors = threading.Barrier(15), [], []

    def worker():
        try:
            barrier.wait(timeout=30)
            out.append(ar.route(PROMPT, False))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(out) == 15
    assert ar.nodes.snapshot() == {"l1": 5, "l2": 5, "l3": 5, "r1": 0, "r2": 0}
    assert all(p.reason != "all busy" for p in out)


def test_configuration_is_validated():
    with pytest.raises(ConfigError):
        Node("a", "local", "h", -1)
    with pytest.raises(ConfigError):
        NodeSet([Node("a", "local", "h", 1), Node("a", "remote", "h", 1)])
    with pytest.raises(ConfigError):
        KvManager(FakeIndex(), ["local", "local"])
    manager = KvManager(FakeIndex(), ["local", "remote"])
    with pytest.raises(ConfigError):  # a node in a cluster the router does not know
        AffinityRouter(Router(10), nodes() + [Node("x", "mars", "h", 1)], manager)
    with pytest.raises(ConfigError):  # the manager names a cluster the router does not know
        AffinityRouter(Router(10), nodes(), KvManager(FakeIndex(), ["local", "mars"]))
    with pytest.raises(ConfigError):  # the remote cluster has no node
        AffinityRouter(Router(10), nodes()[:3], manager)
    ar = AffinityRouter(Router(10), nodes(), manager)
    with pytest.raises(ConfigError):
        ar.route([], False)
    with pytest.raises(ConfigError):
        ar.nodes.started("nope")
