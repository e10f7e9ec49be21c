"""Shared by the cluster-wide pool tests: `kvlink pool serve` subprocesses publishing to a Valkey
Cluster's global index, ClusterPoolClients, polling with deadlines, bit-exact checks."""

import asyncio
import json
import signal
import subprocess
import sys
import time

from kvlink.cluster.client import ClusterPoolClient
from kvlink.cluster.index import ClusterHit
from kvlink.config import ClusterConfig
from kvlink.daemon import PoolClient
from kvlink.pool.index import FULL, STATE
from kvlink.spec import MLA, CacheSpec, LinearAttention
from tests.integration.daemon_helpers import FAST, MODEL

TTL = 2.0  # heartbeat_ttl_s of every daemon and client here
PUBLISH = 0.02
# A small hybrid layout (MLA + linear attention) for the restore through DecodeSide: kimi-linear's
# real state (43 MB per checkpoint) is too big for four test daemons.
TINY = CacheSpec("tiny-hybrid", (LinearAttention((4, 32, 32), conv_shape=(64, 4)), MLA(64, 16),
                                 LinearAttention((4, 32, 32), conv_shape=(64, 4)), MLA(64, 16)))


def cfg(vc, prefix: str, cluster: str = "c1", node: str | None = None, **kw) -> ClusterConfig:
    return ClusterConfig(index_nodes=tuple(vc.startup_nodes), cluster=cluster, node=node, key_prefix=prefix,
                         heartbeat_ttl_s=TTL, publish_interval_s=PUBLISH, **kw)


class Proc:
    """A `kvlink pool serve` subprocess publishing to the index."""

    def __init__(self, tmp_path, vc, prefix: str, cluster: str, node: str, root: bool = False):
        tmp_path.joinpath("tiny.json").write_text(json.dumps(TINY.to_dict()))
        path = tmp_path / f"{node}.toml"
        ssd = f'root = "{tmp_path / ("ssd-" + node)}"\n' if root else ""
        path.write_text(f'[daemon]\nmodels = ["{MODEL}"]\n{ssd}receive_arena = 16777216\n'
                        'tenant_arena_bytes = 8388608\nhost_budget_bytes = 67108864\n'
                        f'[specs]\ntiny-hybrid = "{tmp_path / "tiny.json"}"\n'
                        '[pool]\nblock_size = 16\nhost_bytes = 8388608\npage_bytes = 4096\n'
                        + ('write_mode = "through"\n' if root else "")
                        + f'[cluster]\nkey_prefix = "{prefix}"\nheartbeat_ttl_s = {TTL}\n'
                        f'publish_interval_s = {PUBLISH}\n')
        self.name = node
        self.proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(path),
                                      "--http-port", "0", "--data-port", "0", "--index", ",".join(vc.startup_nodes),
                                      "--cluster", cluster, "--node", node], stdout=subprocess.PIPE, text=True)
        self.http_port = self.data_port = 0

    def ready(self) -> "Proc":
        event = json.loads(self.proc.stdout.readline())  # the daemon's "listening" line
        self.http_port, self.data_port = event["http_port"], event["data_port"]
        return self

    def client(self, spec: CacheSpec | None = None) -> PoolClient:
        return PoolClient(spec.name if spec else MODEL, http_port=self.http_port, data_port=self.data_port,
                          transport=FAST, timeout=10.0, reply_arena=16 << 20, spec=spec)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def spawn(tmp_path, vc, prefix, *nodes, root=False) -> list[Proc]:
    """``nodes``: (cluster, name) pairs, started in parallel."""
    procs = [Proc(tmp_path, vc, prefix, c, n, root) for c, n in nodes]
    try:
        return [p.ready() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise


async def poll(check, within: float, what: str, every: float = 0.02):
    """``await check()`` until truthy; AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within} s (last: {value!r})")
        await asyncio.sleep(every)


def holders_of(hit: ClusterHit) -> set[str]:
    return {hit.holders[h].name for h in hit.plan}


def assert_bit_exact(hit, fetched, stored, block_size: int = 16) -> None:
    assert len(fetched) == len(hit.full) + (hit.state is not None)
    for b, key in enumerate(hit.full):
        assert bytes(fetched[(FULL, key)]) == stored[(FULL, b)]
    if hit.state is not None:
        assert bytes(fetched[(STATE, hit.state)]) == stored[(STATE, hit.tokens // block_size - 1)]


async def cluster_client(vc, prefix, local=None, cluster="c1", **kw) -> ClusterPoolClient:
    extra = {} if local is not None else {"block_size": 16}
    c = ClusterPoolClient(MODEL, cfg(vc, prefix, cluster, **kw), local=local, transport=FAST, timeout=5.0, **extra)
    return await c.connect()


def held(cc: ClusterPoolClient, toks, name: str, tokens: int, cluster: str = "c1"):
    """A check for :func:`poll`: ``cc``'s cluster lookup says daemon ``name`` alone restores ``tokens``."""
    async def check():
        hits = await cc.lookup_clusters(toks)
        return cluster in hits and hits[cluster].by_holder.get(name) == tokens
    return check


def registered(cc: ClusterPoolClient, names: set[str]):
    """A check for :func:`poll`: every daemon in ``names`` is registered and live in the index."""
    async def check():
        live = await asyncio.to_thread(cc.index.live_holders, 0.0)
        return names <= {h.name for h in live.values()}
    return check
