"""The link lab: two network namespaces joined by a veth pair, shaped with ``tc ... tbf``.

For tests and benchmarks only. Every address lives inside namespaces the lab creates (a /30 in
10.213.0.0/16) and everything is deleted on exit, also after errors. Needs root and iproute2;
:func:`unavailable_reason` says why it cannot run here. (``netem`` is not available on the
kernels this runs on, so there is rate shaping but no emulated delay or loss.)
"""

from __future__ import annotations

import os
import shutil
import subprocess

from kvlink.errors import ConfigError


def unavailable_reason() -> str | None:
    """None when the lab can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "the link lab needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the link lab needs the '{tool}' tool (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' does not work here: {probe.stderr.strip()}"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ConfigError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


class LinkLab:
    """``with LinkLab(1e9) as lab:`` gives namespaces ``lab.ns_a``/``lab.ns_b`` at ``lab.addr_a``/
    ``lab.addr_b``, each direction shaped to ``rate`` bits/s by a tbf qdisc."""

    def __init__(self, rate: float, queue_ms: float = 50.0, mtu: int = 1500):
        if rate <= 0:
            raise ConfigError("lab rate must be positive")
        self.rate = rate
        self.queue_ms = queue_ms
        self.mtu = mtu
        tag = f"{os.getpid() % 100000}"
        self.ns_a, self.ns_b = f"kvl{tag}a", f"kvl{tag}b"
        self.dev_a, self.dev_b = f"kvl{tag}va", f"kvl{tag}vb"
        net = os.getpid() % 16000
        base = f"10.213.{net // 64}.{(net % 64) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.addr_a, self.addr_b = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"

    def __enter__(self) -> "LinkLab":
        reason = unavailable_reason()
        if reason:
            raise ConfigError(reason)
        try:
            _sh("ip", "netns", "add", self.ns_a)
            _sh("ip", "netns", "add", self.ns_b)
            _sh("ip", "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.dev_b,
                "netns", self.ns_b)
            for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a), (self.ns_b, self.dev_b, self.addr_b)):
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", *self._tbf(self.rate))
        except BaseException:
            self.close()
            raise
        return self

    def _tbf(self, rate: float) -> list[str]:
        # burst: at least 4 ms at the rate (the kernel needs rate/HZ), queue: queue_ms of data.
        burst = max(int(rate / 8 * 0.004), 32 << 10)
        return ["rate", f"{int(rate)}bit", "burst", str(burst), "latency", f"{self.queue_ms}ms"]

    def set_rate(self, rate: float) -> None:
        """Change both directions' rate now (``tc qdisc change``), mid-transfer if need be."""
        for ns, dev in ((self.ns_a, self.dev_a), (self.ns_b, self.dev_b)):
            _sh("tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "tbf", *self._tbf(rate))
        self.rate = rate

    def command(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside namespace ``side`` ("a" or "b")."""
        ns = {"a": self.ns_a, "b": self.ns_b}[side]
        return ["ip", "netns", "exec", ns, *argv]

    def close(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _sh("ip", "netns", "del", ns, check=False)  # deleting a namespace removes its veth end

    def __exit__(self, *exc) -> None:
        self.close()
