"""``kvlink cluster up``: a whole PrfaaS deployment on one machine, replaying a real trace.

Two clusters, ``prfaas`` (remote prefill) and ``local`` (PD), each host a network namespace with
its pool daemon and a node agent (:mod:`kvlink.cluster.agent`) standing in for its engine; the
global index is a Valkey Cluster in the root namespace; the inter-cluster link is a tbf-shaped
bridge (:class:`~kvlink.cluster.hosts.ClusterLab`). Without root everything runs on loopback
(no shaping; the report says so).

For each request of the replayed conversations the router (:mod:`kvlink.route.affinity`) asks the
global index for the prefix each cluster holds, picks the cluster by incremental length against
the threshold and the node whose daemon holds the most; that node restores the prefix from its
cluster's pool, computes (synthesises) the rest, stores it, and, when it is in the PrfaaS cluster,
ships the cache to a decode node of the local cluster: only the part the local cluster does not
hold yet. The same requests run first without the pool (a tenant of their own, so nothing is
shared): every offloaded request then ships its whole cache. The report compares the bytes that
crossed the link (the tbf qdiscs' own counters) and gives hit rates per cluster and the decisions.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvlink.config import ClusterConfig
from kvlink.errors import ConfigError, KvlinkError
from kvlink.pool.index import PrefixIndex
from kvlink.presets import get_preset

from kvlink.cluster.replay import load_conversations, tokens_for

CLUSTERS = ("prfaas", "local")


@dataclass
class Options:
    trace: str
    conversations: int = 8
    max_input: int = 16384
    model: str = "kimi-linear-48b-a3b"
    size_scale: float = 1.0
    hosts: tuple[int, int] = (2, 2)        # prfaas, local
    link: float = 5e9
    threshold: int = 4096
    abundant: bool = False
    pool_bytes: int = 2 << 30
    lab: bool | None = None                # None: when root
    block_size: int = 512


@dataclass
class Node:
    name: str
    cluster: str
    addr: str
    http: int
    data: int
    daemon: subprocess.Popen | None = None
    agent: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)


class Deployment:
    """Start with ``with Deployment(opts) as d:``; :meth:`replay` runs the trace; everything stops on exit."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.spec = get_preset(opts.model)
        self.workdir = Path(tempfile.mkdtemp(prefix="kvlink-cluster-"))
        self.secrets = {"pool": secrets.token_hex(12), "nopool": secrets.token_hex(12)}
        self.index_password = secrets.token_hex(12)
        self.lab = None
        self.valkey = None
        self.nodes: list[Node] = []

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        from kvlink.cluster.valkey import ValkeyCluster
        from kvlink.transport.lab import unavailable_reason

        use_lab = self.opts.lab if self.opts.lab is not None else unavailable_reason() is None
        if use_lab:
            from kvlink.cluster.hosts import ClusterLab

            reason = unavailable_reason()
            if reason:
                raise ConfigError(reason)
            self.lab = ClusterLab(dict(zip(CLUSTERS, self.opts.hosts)), self.opts.link)
            self.lab.start()
            index_host = self.lab.index_host(CLUSTERS[1])
        else:
            index_host = "127.0.0.1"
        self.valkey = ValkeyCluster(3, 1, index_host, password=self.index_password, workdir=str(self.workdir / "valkey"))
        self.valkey.start()
        config = self.workdir / "daemon.toml"
        config.write_text(self._daemon_toml())
        port = 24000 + os.getpid() % 2000 * 10 if not use_lab else 7480
        for ci, cluster in enumerate(CLUSTERS):
            for j in range(self.opts.hosts[ci]):
                if self.lab is not None:
                    host = self.lab.host(cluster, j)
                    node = Node(f"{cluster}-{j}", cluster, host.addr, 7480, 7481, extra={"host": host})
                else:
                    node = Node(f"{cluster}-{j}", cluster, "127.0.0.1", port, port + 1)
                    port += 2
                self.nodes.append(node)
                self._start_daemon(node, config)
        for node in self.nodes:
            self._wait_listening(node)
        for node in self.nodes:
            for tenant in ("pool", "nopool"):
                node.extra[f"agent_{tenant}"] = self._start_agent(node, tenant)

    def stop(self) -> None:
        for node in self.nodes:
            for key in ("agent_pool", "agent_nopool"):
                proc = node.extra.get(key)
                if proc is not None and proc.poll() is None:
                    proc.stdin.close()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
            if node.daemon is not None and node.daemon.poll() is None:
                node.daemon.terminate()
                try:
                    node.daemon.wait(10)
                except subprocess.TimeoutExpired:
                    node.daemon.kill()
                    node.daemon.wait(5)
        if self.valkey is not None:
            self.valkey.stop()
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- processes ----------------------------------------------------------------------------------
    def arena_bytes(self) -> int:
        """Room for the largest request's entries (its blocks and one state), with a margin."""
        from kvlink.cluster.replay import entry_sizes

        sizes = entry_sizes(self.spec, self.opts.block_size, self.opts.size_scale)
        blocks = self.opts.max_input // self.opts.block_size
        need = blocks * sizes["full"] + sizes["state"]
        return max(16 << 20, int(need * 1.25) + (4 << 20))

    def _daemon_toml(self) -> str:
        o = self.opts
        arena = self.arena_bytes()
        return (f"[daemon]\nmodels = [\"{o.model}\"]\nreceive_arena = {arena}\ntenant_arena_bytes = {arena}\n"
                f"host_budget_bytes = {2 * o.pool_bytes + (1 << 30)}\n"
                f"[pool]\nblock_size = {o.block_size}\ncheckpoint_every = 1000000\nhost_bytes = {o.pool_bytes}\n"
                f"page_bytes = {1 << 20}\n"
                "[tenants]\n" + "".join(f"{k} = \"{v}\"\n" for k, v in self.secrets.items()))

    def _cluster_settings(self, node: Node) -> dict:
        return {"index_nodes": list(self.valkey.startup_nodes), "cluster": node.cluster, "node": node.name,
                "password": self.index_password, "heartbeat_ttl_s": 3.0, "replicate_after": 0}

    def _popen(self, node: Node, argv: list[str], env: dict, **kw) -> subprocess.Popen:
        if self.lab is not None:
            argv = self.lab.command(node.extra["host"], argv)
        return subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True, **kw)

    def _start_daemon(self, node: Node, config: Path) -> None:
        argv = [sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(config), "--host", node.addr,
                "--http-port", str(node.http), "--data-port", str(node.data), "--index",
                ",".join(self.valkey.startup_nodes), "--cluster", node.cluster, "--node", node.name]
        log = open(self.workdir / f"{node.name}.log", "wb")
        node.daemon = self._popen(node, argv, {"KVLINK_INDEX_PASSWORD": self.index_password}, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_listening(self, node: Node, timeout: float = 60.0) -> None:
        log = self.workdir / f"{node.name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.daemon.poll() is not None:
                raise ConfigError(f"daemon {node.name} exited: {log.read_text(errors='replace')[-800:]}")
            if '"listening"' in log.read_text(errors="replace"):
                return
            time.sleep(0.05)  # polls the daemon's log for its "listening" line
        raise ConfigError(f"daemon {node.name} did not start in {timeout} s")

    def _start_agent(self, node: Node, tenant: str) -> subprocess.Popen:
        settings = {"model": self.opts.model, "secret": self.secrets[tenant], "tenant": tenant,
                    "block_size": self.opts.block_size, "size_scale": self.opts.size_scale,
                    "daemon": [node.addr, node.http, node.data], "cluster": self._cluster_settings(node),
                    "arena": self.arena_bytes()}
        proc = self._popen(node, [sys.executable, "-m", "kvlink.cluster.agent", json.dumps(settings)], {},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(
                               self.workdir / f"{node.name}-{tenant}-agent.log", "wb"), text=True)
        line = proc.stdout.readline()
        if '"ready"' not in line:
            err = (self.workdir / f"{node.name}-{tenant}-agent.log").read_text(errors="replace")[-800:]
            raise ConfigError(f"agent on {node.name} did not start: {line!r} {err}")
        return proc

    def ask(self, node: Node, tenant: str, cmd: dict) -> dict:
        proc = node.extra[f"agent_{tenant}"]
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise ConfigError(f"agent on {node.name} exited")
        return json.loads(line)

    def link_bytes(self) -> int | None:
        """Bytes sent through the inter-cluster tbf qdiscs so far (None on loopback)."""
        if self.lab is None:
            return None
        total = 0
        for cluster in CLUSTERS:
            out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", self.lab.bridge(cluster)],
                                 capture_output=True, text=True).stdout
            m = re.search(r"Sent (\d+) bytes", out)
            total += int(m.group(1)) if m else 0
        return total

    # -- the replay ---------------------------------------------------------------------------------
    def replay(self, progress=None) -> dict:
        from kvlink.cluster.index import GlobalIndex
        from kvlink.route.affinity import AffinityRouter, KvManager, Node as RouteNode
        from kvlink.route.router import Router

        requests = load_conversations(self.opts.trace, self.opts.conversations, self.opts.max_input)
        by_name = {n.name: n for n in self.nodes}
        index = GlobalIndex(ClusterConfig(index_nodes=tuple(self.valkey.startup_nodes), password=self.index_password))
        layout = PrefixIndex(self.spec, self.opts.block_size, "pool", None)
        results = {}
        try:
            for mode in ("nopool", "pool"):
                manager = KvManager(lambda toks: index.lookup(layout, toks), CLUSTERS)
                router = AffinityRouter(Router(self.opts.threshold, local="local", remote="prfaas"),
                                        [RouteNode(n.name, n.cluster, n.name, 4) for n in self.nodes], manager)
                before = self.link_bytes()
                rows = []
                t0 = time.perf_counter()
                for k, req in enumerate(requests):
                    tokens = tokens_for(req.hash_ids, req.input_length)
                    rows.append(self._one(mode, req, tokens, router, index, layout, by_name))
                    if progress:
                        progress(mode, k + 1, len(requests))
                after = self.link_bytes()
                results[mode] = _summary(rows, time.perf_counter() - t0, None if before is None else after - before,
                                         router.stats())
        finally:
            index.close()
        return {"settings": {**self.opts.__dict__, "hosts": list(self.opts.hosts), "lab": self.lab is not None,
                             "requests": len(requests),
                             "prompt_tokens": sum(r.input_length for r in requests)},
                "runs": results}

    def _one(self, mode, req, tokens, router, index, layout, by_name) -> dict:
        use_pool = mode == "pool"
        place = None
        if use_pool:
            place = router.route(tokens, self.opts.abundant)
            decision, node = place.decision, by_name[place.node.name]
            match = router.manager.last
            cached, local_holders = dict(match.tokens), match.holders.get("local", {})
        else:
            decision = router.router.route(len(tokens), {}, False)
            node = self._round_robin(decision.cluster, req.index)
            cached, local_holders = {}, {}
        decode = node if node.cluster == "local" else self._decode_for(local_holders, req.index)
        row = {"request": req.index, "tokens": len(tokens), "cluster": node.cluster, "node": node.name,
               "cached": cached}
        try:
            if decision.transfer is not None and use_pool:
                t = decision.transfer
                row["transfer"] = self.ask(node, mode, {"op": "copy", "hash_ids": list(req.hash_ids),
                                                       "length": req.input_length, "from_cluster": t.source,
                                                       "end": t.end})
            cmd = {"op": "prefill", "hash_ids": list(req.hash_ids), "length": req.input_length,
                   "use_pool": use_pool, "ship_to": None if decode is node else [decode.addr, decode.http, decode.data],
                   "ship_from": cached.get("local", 0) if use_pool else 0}
            row.update(self.ask(node, mode, cmd))
        finally:
            if place is not None:
                router.finished(place)
        if not row.get("ok"):
            raise KvlinkError(f"request {req.index} failed on {node.name}: {row.get('error')}")
        return row

    def _round_robin(self, cluster: str, i: int) -> Node:
        members = [n for n in self.nodes if n.cluster == cluster]
        return members[i % len(members)]

    def _decode_for(self, local_holders: dict, i: int) -> Node:
        """The local node whose daemon holds most of the prompt (round-robin when none holds any)."""
        members = [n for n in self.nodes if n.cluster == "local"]
        best = max(members, key=lambda n: (local_holders.get(n.name, 0), -members.index(n)))
        return best if local_holders.get(best.name, 0) else members[i % len(members)]


def _summary(rows: list[dict], seconds: float, link: int | None, router_stats: dict) -> dict:
    out = {"requests": len(rows), "seconds": round(seconds, 2), "link_bytes": link,
           "shipped_bytes": sum(r.get("shipped_bytes", 0) for r in rows),
           "copied_bytes": sum(r.get("transfer", {}).get("copied_bytes", 0) for r in rows),
           "fetched_bytes": sum(r.get("fetched_bytes", 0) for r in rows),
           "verified": all(r.get("verified", True) and r.get("transfer", {}).get("verified", True) for r in rows),
           "router": router_stats, "clusters": {}, "rows": rows}
    for cluster in CLUSTERS:
        mine = [r for r in rows if r["cluster"] == cluster]
        tokens = sum(r["tokens"] for r in mine)
        hit = sum(r.get("hit_tokens", 0) for r in mine)
        out["clusters"][cluster] = {"requests": len(mine), "prompt_tokens": tokens, "hit_tokens": hit,
                                    "hit_rate": round(hit / tokens, 4) if tokens else 0.0,
                                    "computed_tokens": sum(r.get("computed_tokens", 0) for r in mine)}
    return out


def render(report: dict) -> str:
    s = report["settings"]
    lines = [f"kvlink cluster up: {s['requests']} requests ({s['conversations']} conversations, "
             f"{s['prompt_tokens']:,} prompt tokens) of {Path(s['trace']).name}, model {s['model']} "
             f"(entries x{s['size_scale']} of its real size), threshold {s['threshold']} tokens, "
             f"{'tbf link ' + format(s['link'] / 1e9, 'g') + ' Gbit/s between namespaces' if s['lab'] else 'loopback (no root: no namespaces, no shaping)'}",
             "",
             f"{'run':<8} {'link MB':>9} {'shipped MB':>11} {'fetched MB':>11} {'prfaas req':>10} {'local req':>9} "
             f"{'prfaas hit':>10} {'local hit':>9} {'verified':>8} {'s':>6}"]
    for mode, r in report["runs"].items():
        link = "-" if r["link_bytes"] is None else f"{r['link_bytes'] / 1e6:,.1f}"
        c = r["clusters"]
        lines.append(f"{mode:<8} {link:>9} {r['shipped_bytes'] / 1e6:>11,.1f} {r['fetched_bytes'] / 1e6:>11,.1f} "
                     f"{c['prfaas']['requests']:>10} {c['local']['requests']:>9} {c['prfaas']['hit_rate']:>10.1%} "
                     f"{c['local']['hit_rate']:>9.1%} {str(r['verified']):>8} {r['seconds']:>6}")
    runs = report["runs"]
    if "pool" in runs and "nopool" in runs and runs["nopool"]["shipped_bytes"]:
        ratio = runs["pool"]["shipped_bytes"] / runs["nopool"]["shipped_bytes"]
        lines.append(f"\ncache bytes shipped across the link with the pool: {ratio:.2f}x of the no-pool run")
    lines.append(f"router (pool run): {json.dumps(runs.get('pool', {}).get('router', {}))}")
    return "\n".join(lines)


def default_trace() -> Path:
    """``../shared/traces/mooncake-conversation.jsonl`` beside the working directory or the checkout."""
    name = Path("shared") / "traces" / "mooncake-conversation.jsonl"
    for base in (Path.cwd().parent, Path(__file__).resolve().parents[3]):
        if (base / name).is_file():
            return base / name
    raise ConfigError(f"no trace given and none at ../{name}")


def main(args) -> int:
    """``kvlink cluster up``."""
    from kvlink.config import parse_rate

    try:
        hosts = tuple(int(x) for x in args.hosts.split(","))
    except ValueError:
        hosts = ()
    if len(hosts) != 2 or min(hosts) < 1:
        raise ConfigError("--hosts takes two positive counts: PrfaaS hosts, local hosts")
    opts = Options(str(args.trace or default_trace()), args.conversations, args.max_input, args.model,
                   args.size_scale, hosts, parse_rate(args.link), args.threshold, args.abundant,
                   lab={"auto": None, "on": True, "off": False}[args.lab])
    with Deployment(opts) as deployment:
        print(f"deployment up: {len(deployment.nodes)} daemons, index {','.join(deployment.valkey.startup_nodes)}"
              f"{', network namespaces' if deployment.lab else ', loopback'}", file=sys.stderr)
        report = deployment.replay(lambda mode, k, n: print(f"\r{mode}: {k}/{n}", end="", file=sys.stderr,
                                                               flush=True))
        print(file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if all(r["verified"] for r in report["runs"].values()) else 1
