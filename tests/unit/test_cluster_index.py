"""The global index (kvlink.cluster): ClusterConfig and its TOML table, key slots, the hybrid rule
on hand-built records, and GlobalIndex / IndexStore against a real (small) Valkey Cluster."""

import random
import time

import pytest
import redis

from kvlink.cluster.index import ClusterHit, GlobalIndex, _best, _cluster_hit, block_key
from kvlink.cluster.publisher import IndexPublisher
from kvlink.cluster.store import IndexStore, pack, tagged_slot
from kvlink.cluster.valkey import ValkeyCluster, free_ports
from kvlink.config import ClusterConfig, DaemonConfig
from kvlink.errors import ConfigError, TierUnavailable
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixIndex
from kvlink.presets import get_preset

MODEL = "kimi-linear-48b-a3b"  # full attention (MLA) + linear-attention state


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"cluster": "no spaces"}, {"cluster": ".."}, {"node": "a/b"}, {"node": "x" * 97}, {"key_prefix": "a{b"},
    {"key_prefix": ""}, {"index_nodes": ("localhost",)}, {"index_nodes": (":6379",)},
    {"index_nodes": ("h:0",)}, {"index_nodes": ("h:70000",)}, {"heartbeat_ttl_s": 0.05},
    {"heartbeat_ttl_s": 4000}, {"publish_interval_s": 0}, {"publish_interval_s": 3.0},
    {"publish_batch": 0}, {"publish_batch": 10, "queue_limit": 5}, {"lookup_batch": 0},
    {"replicate_after": -1}, {"timeout_s": 0},
])
def test_cluster_config_refuses(fields):
    with pytest.raises(ConfigError):
        ClusterConfig(**fields)


def test_cluster_config_defaults_and_enabled():
    assert not ClusterConfig().enabled
    c = ClusterConfig(index_nodes=("10.0.0.1:7000", "[::1]:7001"), node="h1:9000", cluster="dc-2")
    assert c.enabled and c.replicate_after == 3 and c.publish_interval_s < c.heartbeat_ttl_s


def test_cluster_table_from_toml(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('[daemon]\nmodels = ["kimi-linear-48b-a3b"]\n'
                    '[cluster]\nindex_nodes = ["10.0.0.1:7000", "10.0.0.2:7000"]\ncluster = "dc1"\n'
                    'heartbeat_ttl_s = 1.5\nkey_prefix = "kv2"\n')
    c = DaemonConfig.from_toml(path).cluster
    assert c.index_nodes == ("10.0.0.1:7000", "10.0.0.2:7000") and c.cluster == "dc1"
    assert c.heartbeat_ttl_s == 1.5 and c.key_prefix == "kv2" and c.node is None
    # CLI flags (the cluster overrides) win over the table, the rest of it stays.
    c = DaemonConfig.from_toml(path, cluster={"cluster": "dc9", "node": "n1"}).cluster
    assert (c.cluster, c.node, c.heartbeat_ttl_s) == ("dc9", "n1", 1.5)
    # No table: the index is off.
    plain = tmp_path / "plain.toml"
    plain.write_text('[daemon]\nmodels = ["kimi-linear-48b-a3b"]\n')
    assert not DaemonConfig.from_toml(plain).cluster.enabled


@pytest.mark.parametrize("table", ['nodes = ["a:1"]', 'heartbeat_ttl_s = 0.01', 'index_nodes = ["nope"]'])
def test_bad_cluster_table_is_a_config_error(tmp_path, table):
    path = tmp_path / "pool.toml"
    path.write_text(f'[daemon]\nmodels = ["kimi-linear-48b-a3b"]\n[cluster]\n{table}\n')
    with pytest.raises(ConfigError):
        DaemonConfig.from_toml(path)


def test_daemon_on_every_interface_needs_an_advertised_address():
    index = ClusterConfig(index_nodes=("127.0.0.1:7000",))
    with pytest.raises(ConfigError, match="advertise_host"):
        DaemonConfig(host="0.0.0.0", models=(MODEL,), cluster=index, allow_insecure=True)
    DaemonConfig(host="0.0.0.0", models=(MODEL,), cluster=ClusterConfig(index_nodes=("127.0.0.1:7000",),
                                                                         advertise_host="10.1.2.3"),
                 allow_insecure=True)


# -- keys and the wire ----------------------------------------------------------------------------------
def test_tagged_slot_matches_redis_for_random_binary_keys():
    from redis.crc import key_slot

    rng = random.Random(18)
    for _ in range(2000):
        prefix = "".join(rng.choice("abcXYZ019_-") for _ in range(rng.randint(1, 16))).encode()
        key = rng.randbytes(16)  # may hold b"{" and b"}" itself: the tag comes first
        full = block_key(prefix, key)
        assert tagged_slot(full) == key_slot(full)
        assert tagged_slot(prefix + b"{m}:alive:%d" % rng.randint(0, 65535)) == key_slot(prefix + b"{m}:ids")


def test_pack_matches_redis_py():
    from redis.connection import Connection

    rng = random.Random(3)
    conn = Connection()
    for _ in range(200):
        # (redis-py splits a first argument with a space in it: "CONFIG GET")
        args = (b"HSET",) + tuple(rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 4)))
        assert pack(args) == b"".join(conn.pack_command(*args))


# -- the hybrid rule on hand-built records ------------------------------------------------------------------
def layout(model=MODEL, every=None) -> PrefixIndex:
    return PrefixIndex(get_preset(model), 16, "default", every)


def records(n, **held):
    """What a lookup decodes: lists[kind][b] = None, or the frozenset of holder ids holding that
    entry; ``held``: kind -> {holder: blocks}."""
    sets = {k: [set() for _ in range(n)] for k in (FULL, SLIDING, STATE)}
    for kind, holders in held.items():
        for holder, blocks in holders.items():
            for b in blocks:
                sets[kind][b].add(holder)
    return {k: [frozenset(h) if h else None for h in v] for k, v in sets.items()}


def hit_of(lay, per, n=10, members=(1, 2)) -> ClusterHit:
    from kvlink.cluster.index import Holder

    keys = [bytes([b]) * 16 for b in range(n)]
    hs = {h: Holder(h, f"h{h}", "c1", "127.0.0.1", 1, 2, 1) for h in members}
    return _cluster_hit(lay, keys, per, "c1", hs, n)


def test_hit_ends_at_a_state_checkpoint_before_the_first_missing_full_block():
    lay = layout()
    per = records(10, full={1: range(10)}, state={1: [4, 9]})
    hit = hit_of(lay, per)
    assert hit.tokens == 160 and hit.stopped == "whole prompt held in the cluster"
    assert hit.by_holder == {"h1": 160, "h2": 0} and set(hit.plan) == {1}
    per = records(10, full={1: [0, 1, 2, 3, 4, 5, 7, 8, 9]}, state={1: [4, 9]})
    hit = hit_of(lay, per)
    assert (hit.tokens, hit.kv_tokens) == (80, 96) and hit.state == bytes([4]) * 16
    assert len(hit.full) == 5 and "full KV to 96" in hit.stopped
    per = records(10, full={1: range(10)})  # no state anywhere: nothing restorable
    assert hit_of(lay, per).tokens == 0
    assert _best(lay, 10, per) == (0, 10) and _best(lay, 10, per, holder=2) == (0, 0)


def test_entries_from_several_holders_combine_and_spread():
    lay = layout()
    # Full KV on h1, the state only on h2: the cluster restores it all, neither daemon alone.
    hit = hit_of(lay, records(10, full={1: range(10)}, state={2: [9]}))
    assert hit.tokens == 160 and hit.by_holder == {"h1": 0, "h2": 0}
    assert [k for k, _ in hit.plan[2]] == [STATE] and len(hit.plan[1]) == 10
    # Both hold everything: the plan deals the entries out over both.
    hit = hit_of(lay, records(10, full={1: range(10), 2: range(10)}, state={1: [9], 2: [9]}))
    assert hit.by_holder == {"h1": 160, "h2": 160}
    assert sorted(len(v) for v in hit.plan.values()) == [5, 6]
    assert {h.name for h in hit.holders.values()} == {"h1", "h2"}


def test_sliding_window_must_be_whole():
    lay = layout("mimo-v2-flash")
    w = lay.window_blocks
    assert w == 8 and lay.needs_full and not lay.needs_state
    per = records(10, full={1: range(10)}, sliding={1: [b for b in range(10) if b != 5]})
    hit = hit_of(lay, per)
    assert hit.tokens == 80 and len(hit.sliding) == 5  # the window ending at block 5 is whole
    per = records(10, full={1: range(10)}, sliding={1: range(2, 10)})
    hit = hit_of(lay, per)
    assert hit.tokens == 160 and len(hit.sliding) == w


def test_no_blocks():
    hit = _cluster_hit(layout(), [], records(0), "c1", {}, 0)
    assert hit.tokens == 0 and "shorter than one block" in hit.stopped and hit.plan == {}


# -- against a real Valkey Cluster ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def valkey():
    with ValkeyCluster(2, 0) as vc:
        yield vc


def cfg(vc, prefix, **kw) -> ClusterConfig:
    return ClusterConfig(index_nodes=tuple(vc.startup_nodes), key_prefix=prefix, **kw)


def test_register_epochs_heartbeat_retire(valkey):
    index = GlobalIndex(cfg(valkey, "u1", heartbeat_ttl_s=0.3, publish_interval_s=0.05))
    try:
        a = index.register("a", "c1", "127.0.0.1", 1, 2)
        b = index.register("b", "c2", "127.0.0.1", 3, 4)
        a2 = index.register("a", "c1", "127.0.0.1", 5, 6)
        assert a2.id == a.id != b.id and a2.epoch == a.epoch + 1
        live = index.live_holders(0.0)
        assert live[a.id] == a2 and live[b.id] == b
        assert index.heartbeat(a2) and index.heartbeat(a2)  # current: not lapsed
        index.retire(b)
        assert b.id not in index.live_holders(0.0)
        assert not index.heartbeat(b)  # its liveness had gone: the daemon must re-publish
        assert b.id in index.live_holders(0.0)  # (and is back)
        deadline = time.monotonic() + 5
        while a.id in index.live_holders(0.0):  # no more beats: gone within the TTL
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        index.close()


def test_publisher_heartbeats_do_not_lapse(valkey):
    """A live daemon's heartbeats succeed: no re-publish of everything it holds every beat."""
    publisher = IndexPublisher(cfg(valkey, "u4", heartbeat_ttl_s=0.3, publish_interval_s=0.01), "127.0.0.1", 1, 2)
    publisher.start()
    try:
        deadline = time.monotonic() + 5
        while publisher.holder is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        beats_from = time.monotonic()
        while time.monotonic() - beats_from < 0.5:  # heartbeats every 0.1 s: several of them
            assert publisher.flush(2.0)
        assert publisher.stats["lapsed"] == 0 and publisher.stats["resyncs"] == 1
        assert publisher.last_error is None
    finally:
        publisher.close()


def test_publish_lookup_forget(valkey):
    index = GlobalIndex(cfg(valkey, "u2", lookup_batch=4))
    lay = layout()
    toks = list(range(1000, 1160))
    keys = lay.hashes(toks)
    try:
        a = index.register("a", "c1", "127.0.0.1", 1, 2)
        b = index.register("b", "c1", "127.0.0.1", 3, 4)
        d = index.register("d", "c2", "127.0.0.1", 5, 6)
        index.publish(a, [("add", FULL, k, 1000, "host") for k in keys] + [("add", STATE, keys[9], 9, "ssd")])
        index.publish(b, [("add", FULL, k, 1000, "gpu") for k in keys[:5]] + [("add", STATE, keys[4], 9, "host")])
        hits = index.lookup(lay, toks + [1, 2])
        assert set(hits) == {"c1", "c2"} and hits["c2"].tokens == 0
        assert hits["c1"].tokens == 160 and hits["c1"].by_holder == {"a": 160, "b": 80}
        # b's records of an old epoch are not offered once b registers again.
        index.register("b", "c1", "127.0.0.1", 3, 4)
        index._live_at = -1e9
        assert index.lookup(lay, toks)["c1"].by_holder["b"] == 0
        # "remove" and forget() delete records.
        index.publish(a, [("remove", STATE, keys[9], 0, "")])
        assert index.lookup(lay, toks)["c1"].tokens == 0
        index.publish(a, [("add", STATE, keys[9], 9, "host")])
        assert index.lookup(lay, toks)["c1"].tokens == 160
        index.forget(a, [(FULL, keys[3])])
        hit = index.lookup(lay, toks)["c1"]
        assert (hit.tokens, hit.kv_tokens) == (0, 48)
        assert d.id in index.live_holders(0.0)
    finally:
        index.close()


def test_fanout_follows_a_moved_slot(valkey):
    """A stale slot map (resharding, failover): the batch goes again through redis-py's pipeline."""
    store = IndexStore(cfg(valkey, "u3"))
    try:
        keys = [block_key(b"u3", bytes([i]) * 16) for i in range(64)]
        assert store.fanout([(b"HSET", k, b"f", b"%d" % i) for i, k in enumerate(keys)]) == [1] * 64
        slots = store.client.nodes_manager.slots_cache
        nodes = {owners[0].name: owners for owners in slots.values()}
        assert len(nodes) == 2
        first, second = nodes.values()
        for slot, owners in list(slots.items()):  # every slot now points at the wrong primary
            slots[slot] = second if owners is first else first
        replies = store.fanout([(b"HGET", k, b"f") for k in keys])
        assert replies == [b"%d" % i for i in range(64)]
    finally:
        store.close()


def test_unreachable_index_is_tier_unavailable():
    (port,) = free_ports("127.0.0.1", 1, start=36000)
    started = time.monotonic()
    with pytest.raises(TierUnavailable):
        GlobalIndex(ClusterConfig(index_nodes=(f"127.0.0.1:{port}",), timeout_s=0.5))
    assert time.monotonic() - started < 5


def test_replica_takes_over_right_after_start():
    """start() returns once replicas are synced: a replica that never synced refuses to fail over."""
    with ValkeyCluster(3, 1, node_timeout_ms=500) as vc:
        store = IndexStore(ClusterConfig(index_nodes=tuple(vc.startup_nodes[1:]), timeout_s=0.5))
        key = "k{%s}" % next(t for t in map(str, range(100000)) if tagged_slot(b"{%s}" % t.encode()) < 5000)
        try:
            store.call("SET", key, "v")  # slot < 5000: on the first primary
            with redis.Redis(vc.host, vc.nodes[0].port) as first:
                assert first.execute_command("WAIT", 1, 2000) == 1  # the replica has it
            vc.kill(0)
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert store.call("GET", key) == b"v"
                    break
                except TierUnavailable:
                    assert time.monotonic() < deadline, "no failover"
                    time.sleep(0.05)  # poll interval
        finally:
            store.close()


def test_reaping_keeps_records_of_holders_newer_than_the_cached_live_set(valkey):
    """A lookup judges records by a live set cached for TTL/4: a daemon that registered (or renewed
    a lapsed heartbeat) since looks dead to it. Its records must survive the reaping."""
    looker = GlobalIndex(cfg(valkey, "u5"))
    daemon = GlobalIndex(cfg(valkey, "u5"))
    lay = layout()
    toks = list(range(500, 660))
    keys = lay.hashes(toks)
    try:
        b = daemon.register("b", "c1", "127.0.0.1", 3, 4)
        assert set(looker.live_holders()) == {b.id}  # cached: only b
        a = daemon.register("a", "c1", "127.0.0.1", 1, 2)
        daemon.publish(a, [("add", FULL, k, 1000, "host") for k in keys] + [("add", STATE, keys[9], 9, "host")])
        # a is not live as far as the looker knows: a miss, and a's records are met as stale (the
        # first lookup that meets stale records reaps them at once).
        assert looker.lookup(lay, toks)["c1"].tokens == 0
        looker._live_at = -1e9  # the cache expires
        hit = looker.lookup(lay, toks)["c1"]
        assert hit.tokens == 160 and hit.by_holder == {"a": 160, "b": 0}
    finally:
        looker.close()
        daemon.close()
