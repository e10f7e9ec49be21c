"""The cluster lab (kvlink.cluster.hosts) measured with real TCP: hosts of one cluster talk through
their bridge unshaped, hosts of different clusters through the shaped tbf link, and every host
reaches the root namespace (where the global index runs). Needs root and iproute2.
"""

import json
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvlink.cluster.hosts import ClusterLab
from kvlink.errors import ConfigError
from kvlink.transport.lab import unavailable_reason

REASON = unavailable_reason()
needs_lab = pytest.mark.skipif(REASON is not None, reason=REASON or "")

RATE = 200e6  # bits/s
PORT = 5201  # inside a host's own namespace, so nothing else can hold it
TIMEOUT = 15.0  # per subprocess; the scripts set the same bound on their sockets

# Accepts one connection, counts bytes until EOF, answers with the count.
SINK = """
import socket, sys
addr, port, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(t)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(t)
buf = bytearray(1 << 20); n = 0
while True:
    k = c.recv_into(buf)
    if not k:
        break
    n += k
c.sendall(str(n).encode()); c.close()
"""

# Sends n bytes, half-closes, waits for the sink's count: the time covers delivery of every byte.
SOURCE = """
import json, socket, sys, time
addr, port, n, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((addr, port), timeout=t)
chunk = memoryview(bytes(1 << 20)); left = n
t0 = time.monotonic()
while left:
    left -= s.send(chunk[:min(left, len(chunk))])
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    part = s.recv(64)
    if not part:
        break
    reply += part
print(json.dumps({"acked": int(reply), "seconds": time.monotonic() - t0}))
"""

# Connects, sends a line, prints what comes back.
PING = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
s.sendall(b"hello\\n"); print(s.recv(64).decode().strip())
"""


def wait_ready(proc: subprocess.Popen, deadline: float) -> None:
    """Poll the sink's stdout for its 'ready' line (it is listening) until ``deadline``."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
            return
        assert proc.poll() is None, proc.stderr.read()
    raise AssertionError("sink did not start listening in time")


def transfer(lab: ClusterLab, src, dst, nbytes: int) -> float:
    """Goodput in bits/s of ``nbytes`` sent over TCP from host ``src`` to a sink on host ``dst``."""
    sink = lab.popen(dst, [sys.executable, "-c", SINK, dst.addr, str(PORT), str(TIMEOUT)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(sink, time.monotonic() + TIMEOUT)
        out = subprocess.run(lab.command(src, [sys.executable, "-c", SOURCE, dst.addr, str(PORT), str(nbytes),
                                               str(TIMEOUT)]), capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert sink.wait(timeout=TIMEOUT) == 0, sink.stderr.read()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(timeout=5)
    result = json.loads(out.stdout)
    assert result["acked"] == nbytes
    return nbytes * 8 / result["seconds"]


SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/bridge/bridge-nf-call-iptables")


def read_sysctls() -> dict:
    values = {}
    for path in SYSCTLS:
        try:
            values[path] = open(path).read()
        except OSError:
            values[path] = None
    return values


@pytest.fixture(scope="module")
def lab():
    before = read_sysctls()
    with ClusterLab({"a": 2, "b": 1}, RATE) as lab:
        yield lab
    assert read_sysctls() == before  # close restored what the lab changed


def names_present(names) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    listed = {line.split(" ")[0] for line in netns.splitlines()}
    listed |= {line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if ":" in line}
    return sorted(listed & set(names))


@needs_lab
def test_lab_layout(lab):
    a1, a2, b1 = lab.host("a", 0), lab.host("a", 1), lab.host("b", 0)
    assert [h.cluster for h in lab.hosts] == ["a", "a", "b"]
    assert a1.addr.rsplit(".", 2)[1:] == ["0", "1"] and a2.addr.endswith(".0.2") and b1.addr.endswith(".1.1")
    assert lab.index_host("a").endswith(".0.254") and lab.index_host("b").endswith(".1.254")
    assert lab.command(b1, ["true"]) == ["ip", "netns", "exec", b1.ns, "true"]
    qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", lab.bridge("b")], capture_output=True, text=True,
                            timeout=10).stdout
    assert "tbf" in qdiscs and "200Mbit" in qdiscs, qdiscs


@needs_lab
def test_same_cluster_traffic_is_switched_unshaped(lab):
    goodput = transfer(lab, lab.host("a", 0), lab.host("a", 1), 64 << 20)
    print(f"a1 -> a2: {goodput / 1e6:.0f} Mbit/s (link {RATE / 1e6:.0f})")
    assert goodput > 2 * RATE, goodput


@needs_lab
def test_cross_cluster_traffic_is_shaped_to_the_link_rate(lab):
    goodput = transfer(lab, lab.host("a", 0), lab.host("b", 0), 24 << 20)  # ~1 s at 200 Mbit/s
    print(f"a1 -> b1: {goodput / 1e6:.0f} Mbit/s (link {RATE / 1e6:.0f})")
    assert 0.5 * RATE <= goodput <= 1.1 * RATE, goodput


@needs_lab
def test_hosts_of_every_cluster_reach_the_root_namespace(lab):
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(4)
    server.settimeout(TIMEOUT)
    port = server.getsockname()[1]
    peers: list[str] = []

    def serve(count: int) -> None:
        for _ in range(count):
            try:
                conn, (peer, _) = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                conn.recv(64)
                conn.sendall(f"hi {peer}\n".encode())
                peers.append(peer)

    # Each host reaches its own cluster's bridge address and the other cluster's (routed).
    pairs = [(h, lab.index_host(c)) for h in lab.hosts for c in ("a", "b")]
    thread = threading.Thread(target=serve, args=(len(pairs),), daemon=True)
    thread.start()
    try:
        for host, index in pairs:
            out = subprocess.run(lab.command(host, [sys.executable, "-c", PING, index, str(port), str(TIMEOUT)]),
                                 capture_output=True, text=True, timeout=TIMEOUT)
            assert out.returncode == 0, (host, index, out.stderr)
            assert out.stdout.strip() == f"hi {host.addr}", out.stdout
    finally:
        server.close()
        thread.join(timeout=TIMEOUT)
    assert sorted(peers) == sorted(h.addr for h, _ in pairs)


# Run in a child process: a process holds one open lab at a time, and the module's lab is open.
CLOSE_CHILD = """
import json, subprocess, sys
from kvlink.cluster.hosts import ClusterLab
lab = ClusterLab({"x": 1, "y": 2}, 1e9)
# Leftovers of a crashed run with this pid tag are cleaned on start.
subprocess.run(["ip", "netns", "add", lab.tag + "c0h0"], check=True, timeout=10)
subprocess.run(["ip", "link", "add", lab.tag + "br1", "type", "bridge"], check=True, timeout=10)
with lab:
    names = [h.ns for h in lab.hosts] + [lab.bridge("x"), lab.bridge("y"), lab.tag + "c0v0", lab.tag + "c1v0",
                                         lab.tag + "c1v1"]
    inside = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    inside += subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
    forward = open("/proc/sys/net/ipv4/ip_forward").read().strip()
    sleeper = lab.popen(lab.host("y", 1), [sys.executable, "-c", "import time; time.sleep(60)"])
stopped = sleeper.poll() is not None
lab.close()  # idempotent
print(json.dumps({"names": names, "inside": inside, "forward": forward, "stopped": stopped}))
"""


@needs_lab
def test_close_removes_everything():
    out = subprocess.run([sys.executable, "-c", CLOSE_CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert all(name in child["inside"] for name in child["names"]), child
    assert child["forward"] == "1"
    assert child["stopped"]  # close stopped the lab's own process
    assert names_present(child["names"]) == []


FAILING_CHILD = """
import json, subprocess
from kvlink.cluster.hosts import ClusterLab
from kvlink.errors import ConfigError
lab = ClusterLab({"x": 2, "y": 1}, 1e15)  # tc refuses the burst this rate needs, after the first bridge exists
try:
    lab.start()
    error = None
except ConfigError as exc:
    error = str(exc)
print(json.dumps({"error": error, "names": [lab.tag + s for s in ("c0h0", "c0h1", "c1h0", "br0", "br1", "c0v0")]}))
"""


@needs_lab
def test_a_failed_start_raises_config_error_and_leaves_nothing():
    before = read_sysctls()
    out = subprocess.run([sys.executable, "-c", FAILING_CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert child["error"] and "tc qdisc add" in child["error"], child
    assert names_present(child["names"]) == []
    assert read_sysctls() == before  # what the child changed it restored


@needs_lab
def test_set_rate_changes_every_bridge(lab):
    try:
        lab.set_rate(50e6)
        for cluster in ("a", "b"):
            qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", lab.bridge(cluster)], capture_output=True,
                                    text=True, timeout=10).stdout
            assert "50Mbit" in qdiscs, qdiscs
    finally:
        lab.set_rate(RATE)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError):
        ClusterLab({}, 1e9)
    with pytest.raises(ConfigError):
        ClusterLab({"a": 0}, 1e9)
    with pytest.raises(ConfigError):
        ClusterLab({"a": 1}, 0)
    lab = ClusterLab({"a": 1}, 1e9)
    with pytest.raises(ConfigError):
        lab.index_host("a")  # not started
