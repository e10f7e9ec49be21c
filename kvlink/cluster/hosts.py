"""A multi-host, multi-cluster network lab: one Linux bridge per cluster, one namespace per host.

For tests and benchmarks only (like :mod:`kvlink.transport.lab`). Layout, for clusters
``{"prfaas": 2, "local": 2}``::

    root namespace (forwards between bridges; the global index runs here)
    ├── bridge kvl<tag>br0  10.<a>.0.254/24  ── tbf ──▶ veth ── netns kvl<pid>c0h0 10.<a>.0.1
    │                                               └─▶ veth ── netns kvl<pid>c0h1 10.<a>.0.2
    └── bridge kvl<tag>br1  10.<a>.1.254/24  ── tbf ──▶ ...     netns kvl<pid>c1h0 10.<a>.1.1

The inter-cluster link is a tbf qdisc on each bridge device's egress. Only packets the root
namespace sends into a bridge pass that qdisc: traffic routed from another cluster (and traffic
from servers in the root namespace, such as the index) is shaped to ``link_rate``, while traffic
between hosts of one cluster is switched inside the bridge from port to port and is not shaped.

``<a>`` is picked per lab so that its 10.<a>.0.0/16 overlaps no route of the root namespace.
Everything is deleted on close, also after errors and at interpreter exit; names carry the pid
tag so a crashed earlier run with the same pid is cleaned on start.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

from kvlink.errors import ConfigError
from kvlink.transport.lab import _sh, unavailable_reason

_IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"
# Second octets tried for the lab's 10.<a>.0.0/16 (10.213/16 is LinkLab's, inside its namespaces).
_OCTETS = range(100, 200)
_MAX_CLUSTERS = 100  # keeps interface names within IFNAMSIZ (15 characters)
_MAX_HOSTS = 100


@dataclass(frozen=True)
class Host:
    """One host of the lab: ``ns`` is its network namespace, ``addr`` its IPv4 address."""

    cluster: str
    index: int
    ns: str
    addr: str


def _tbf_args(rate: float, queue_ms: float) -> list[str]:
    # Same sizing as LinkLab: burst at least 4 ms at the rate (the kernel needs rate/HZ),
    # queue: queue_ms of data.
    burst = max(int(rate / 8 * 0.004), 32 << 10)
    return ["rate", f"{int(rate)}bit", "burst", str(burst), "latency", f"{queue_ms}ms"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc


class ClusterLab:
    """``with ClusterLab({"prfaas": 2, "local": 2}, 10e9) as lab:`` builds the clusters; ``lab.hosts``
    lists them, ``lab.command``/``lab.popen`` run programs inside a host, ``lab.index_host(cluster)``
    is the root namespace's address on that cluster's bridge.

    Raises :class:`ConfigError` for bad arguments, when the lab cannot run here (not root, no
    ``ip``/``tc``), when another ClusterLab is open in this process (names carry only the pid) and
    when a set-up command fails (everything created so far is deleted first).

    ``ip_forward`` (and ``bridge-nf-call-iptables``, set to 0) are host-wide: the previous values
    come back on close, so two labs in different processes must not overlap in time.
    """

    _active: "ClusterLab | None" = None

    def __init__(self, clusters: Mapping[str, int], link_rate: float, queue_ms: float = 50.0):
        if not clusters:
            raise ConfigError("a cluster lab needs at least one cluster")
        if len(clusters) > _MAX_CLUSTERS:
            raise ConfigError(f"a cluster lab holds at most {_MAX_CLUSTERS} clusters, got {len(clusters)}")
        for name, count in clusters.items():
            if not isinstance(count, int) or not 1 <= count <= _MAX_HOSTS:
                raise ConfigError(f"cluster {name!r}: host count must be 1..{_MAX_HOSTS}, got {count!r}")
        if link_rate <= 0:
            raise ConfigError("link_rate must be positive (bits/s)")
        if queue_ms <= 0:
            raise ConfigError("queue_ms must be positive")
        self.clusters = dict(clusters)
        self.link_rate = float(link_rate)
        self.queue_ms = queue_ms
        self.tag = f"kvl{os.getpid() % 100000}"
        self._cluster_index = {name: i for i, name in enumerate(self.clusters)}
        self.octet: int | None = None
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen] = []
        self._saved: dict[str, str] = {}  # sysctl path -> value to restore
        self._iptables_rules: list[list[str]] = []
        self._open = False

    # names ------------------------------------------------------------------------------------
    def bridge(self, cluster: str) -> str:
        """Name of ``cluster``'s bridge in the root namespace."""
        return f"{self.tag}br{self._index(cluster)}"

    def _veth(self, i: int, j: int) -> str:
        return f"{self.tag}c{i}v{j}"  # root-namespace end; the host end is "eth0" in its namespace

    def _index(self, cluster: str) -> int:
        try:
            return self._cluster_index[cluster]
        except KeyError:
            raise ConfigError(f"unknown cluster {cluster!r}; the lab has {list(self.clusters)}") from None

    def _leftover(self, name: str) -> bool:
        return re.fullmatch(rf"{self.tag}(br\d+|c\d+v\d+|c\d+h\d+)", name) is not None

    # lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "ClusterLab":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Build the lab (``with`` does this). Raises :class:`ConfigError` when it cannot."""
        if self._open:
            return
        reason = unavailable_reason()
        if reason:
            raise ConfigError(reason)
        if ClusterLab._active is not None:
            raise ConfigError("another ClusterLab is open in this process (names are per pid); close it first")
        ClusterLab._active = self
        self._open = True
        atexit.register(self.close)
        try:
            self._remove_names()  # a crashed earlier run with this pid tag
            self.octet = self._pick_octet()
            self._enable_forwarding()
            for cluster, count in self.clusters.items():
                self._add_cluster(cluster, count)
        except BaseException:
            self.close()
            raise

    def _pick_octet(self) -> int:
        used = []
        for argv in (["ip", "-4", "-o", "route", "show", "table", "all"], ["ip", "-4", "-o", "addr", "show"]):
            for word in _sh(*argv).stdout.split():
                if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word):
                    net = ipaddress.ip_network(word, strict=False)
                    if net.prefixlen > 0:  # a default route overlaps everything and says nothing
                        used.append(net)
        start = os.getpid() % len(_OCTETS)
        for k in range(len(_OCTETS)):
            octet = _OCTETS[(start + k) % len(_OCTETS)]
            mine = ipaddress.ip_network(f"10.{octet}.0.0/16")
            if not any(mine.overlaps(net) for net in used):
                return octet
        raise ConfigError("no free 10.<a>.0.0/16 for the cluster lab (a in 100..199 all routed)")

    def _enable_forwarding(self) -> None:
        for path, want in ((_IP_FORWARD, "1"), (_BRIDGE_NF, "0")):
            # bridge-nf-call-iptables=1 would send bridged (same-cluster) frames through iptables.
            old = _read(path)
            if old is not None and old != want:
                _write(path, want)
                self._saved[path] = old
        if shutil.which("iptables") is None:
            return
        if _sh("iptables", "-S", "FORWARD", check=False).returncode != 0:
            return  # no usable iptables (module missing, nft-only): nothing can drop our packets there
        # Accept the lab's own traffic ahead of whatever policy/rules the host has (a DROP policy, as
        # Docker sets, would cut routing between clusters and hosts' access to the index).
        net = f"10.{self.octet}.0.0/16"
        for chain in ("FORWARD", "INPUT"):
            rule = [chain, "-s", net, "-d", net, "-j", "ACCEPT"]
            _sh("iptables", "-I", *rule)
            self._iptables_rules.append(rule)

    def _add_cluster(self, cluster: str, count: int) -> None:
        i = self._index(cluster)
        br = self.bridge(cluster)
        _sh("ip", "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        _sh("ip", "addr", "add", f"{self.index_host(cluster)}/24", "dev", br)
        _sh("ip", "link", "set", br, "up")
        _sh("tc", "qdisc", "add", "dev", br, "root", "tbf", *_tbf_args(self.link_rate, self.queue_ms))
        for j in range(count):
            host = Host(cluster, j, f"{self.tag}c{i}h{j}", f"10.{self.octet}.{i}.{j + 1}")
            veth = self._veth(i, j)
            _sh("ip", "netns", "add", host.ns)
            self.hosts.append(host)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _sh("ip", "link", "set", veth, "master", br, "up")
            _sh("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _sh("ip", "-n", host.ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", host.ns, "link", "set", "lo", "up")
            _sh("ip", "-n", host.ns, "route", "add", "default", "via", self.index_host(cluster))

    def _remove_names(self) -> None:
        for ns in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name and self._leftover(name):
                _sh("ip", "netns", "del", name, check=False)  # also removes its veth pair
        for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
            parts = line.split(":")
            name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
            if self._leftover(name):
                _sh("ip", "link", "del", name, check=False)  # a bridge takes its qdisc with it

    def close(self) -> None:
        """Stop the lab's processes and delete namespaces, veths, bridges, qdiscs; restore sysctls
        and remove the iptables rules. Idempotent."""
        if not self._open:
            return
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass  # a namespace still in use disappears when its last process exits
        self._procs.clear()
        self._remove_names()
        self.hosts = []
        for rule in reversed(self._iptables_rules):
            _sh("iptables", "-D", *rule, check=False)
        self._iptables_rules.clear()
        # Another process's lab still routing between its bridges needs forwarding on: restoring
        # the old value under it would cut its clusters apart. The last lab to close restores.
        others = re.findall(r"\d+: (kvl\d+br\d+)[:@]", _sh("ip", "-o", "link", "show", check=False).stdout)
        if not others:
            for path, old in self._saved.items():
                try:
                    _write(path, old)
                except ConfigError:
                    pass  # best effort: the lab is already gone
        self._saved.clear()
        self._open = False
        ClusterLab._active = None
        atexit.unregister(self.close)

    # use --------------------------------------------------------------------------------------
    def index_host(self, cluster: str) -> str:
        """The root namespace's address on ``cluster``'s bridge (10.<a>.<i>.254): where hosts of any
        cluster reach a server (e.g. the global index) running in the root namespace."""
        if self.octet is None:
            raise ConfigError("the cluster lab is not started")
        return f"10.{self.octet}.{self._index(cluster)}.254"

    def host(self, cluster: str, index: int) -> Host:
        """Host ``index`` (0-based) of ``cluster``."""
        for h in self.hosts:
            if h.cluster == cluster and h.index == index:
                return h
        raise ConfigError(f"no host {index} in cluster {cluster!r} (is the lab started?)")

    def set_rate(self, rate: float) -> None:
        """Change the inter-cluster rate (every bridge's tbf) now, mid-transfer if need be."""
        if rate <= 0:
            raise ConfigError("link rate must be positive (bits/s)")
        for cluster in self.clusters:
            _sh("tc", "qdisc", "change", "dev", self.bridge(cluster), "root", "tbf", *_tbf_args(rate, self.queue_ms))
        self.link_rate = float(rate)

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def popen(self, host: Host, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; the lab kills it on close if it still runs."""
        proc = subprocess.Popen(self.command(host, argv), **kw)
        self._procs.append(proc)
        return proc
