"""The soak benchmark's hostile peer (run by benchmarks/soak.py as a subprocess, so what it costs
the others is what it costs the servers, not the load generator's event loop).

    python benchmarks/soak_hostile.py      (prints "ready"; then reads one line of JSON targets from
                                            stdin, starts, and runs until its stdin closes)

Started early and told its targets later, so its own start-up (imports) does not land in the
phase it is measured in.
On each transport port: 4 idle connections, 2 trickling random bytes, 2 trickling a valid HELLO
header that claims a 60 KiB body (one byte every 250 ms, reconnecting whenever the server drops
them); a handshaken client that opens transfers, sends their first part only and never finishes
them. On the daemon's HTTP port: one malformed request every 50 ms and 4 slow bodies whose
Content-Length lies. Prints its counters as one JSON line when its stdin closes. 127.0.0.1 only.
"""

import asyncio
import collections
import json
import os
import socket
import sys
import threading

from kvlink.config import TransportConfig
from kvlink.daemon.protocol import encode_put
from kvlink.errors import KvlinkError
from kvlink.pool.index import FULL
from kvlink.transport.frame import FrameHeader, FrameType
from kvlink.transport.loop import run as run_loop
from kvlink.transport.sender import TransferClient

HOST = "127.0.0.1"
# The hostile peer is another host: it sends from its own loopback address, so the receivers' per-peer
# limits (live transfers, memory share, connections) tell it apart from the legitimate senders.
SOURCE = ("127.0.0.2", 0)


def hostile_main(ports: dict) -> None:
    stop, lock, stats = threading.Event(), threading.Lock(), collections.Counter()

    def count(what: str) -> None:
        with lock:
            stats[what] += 1

    def sockets(port: int) -> None:
        """4 idle connections, 2 trickling junk, 2 trickling a valid HELLO header claiming 60 KiB."""
        hello = FrameHeader(FrameType.HELLO, 0, 0, 0, 60000, 0).encode() + os.urandom(60000)
        conns: list = [None] * 8
        sent = [0] * 8
        while not stop.wait(0.25):
            for i in range(8):
                try:
                    if conns[i] is None:
                        conns[i], sent[i] = socket.create_connection((HOST, port), timeout=2, source_address=SOURCE), 0
                        conns[i].setblocking(False)
                        count("sockets_opened")
                    if i < 4:
                        if conns[i].recv(4096) == b"":
                            raise ConnectionResetError
                    else:
                        conns[i].send(os.urandom(1) if i < 6 else hello[sent[i] % len(hello):][:1])
                        sent[i] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    count("sockets_dropped_by_server")
                    if conns[i] is not None:
                        conns[i].close()
                    conns[i] = None
        for c in conns:
            if c is not None:
                c.close()

    async def half_transfers(port: int, fingerprint: bytes, parts: int, first: list, meta,
                             secret: bytes | None = None, key_id: str | None = None) -> None:
        """Opens transfers of ``parts`` parts, sends ``first`` of them only, never finishes them;
        reconnects every 16."""
        n = 0
        while not stop.is_set():
            client = TransferClient(HOST, port, fingerprint, TransportConfig(connections=1), secret=secret,
                                    key_id=key_id, local_addr=SOURCE)
            try:
                await client.connect()
                for _ in range(16):
                    n += 1
                    t = client.open(parts, meta=meta(n))
                    for i, part in enumerate(first):
                        t.add_part(i, [part])
                    count("transfers_left_unfinished")
                    await asyncio.sleep(0.5)
                    if stop.is_set():
                        break
            except KvlinkError as exc:
                count(f"transfer_error:{type(exc).__name__}")
                await asyncio.sleep(0.5)
            finally:
                await client.close()

    def transfers() -> None:
        # To the decode side: an engine-like transfer, layer 0 only. To the daemon, as a tenant that
        # authenticates: a valid put request (part 0) and one of its 4 entries.
        junk = os.urandom(4096)
        put = encode_put(list(range(ports["tokens"])), [(FULL, b) for b in range(4)])

        async def both() -> None:
            await asyncio.gather(
                half_transfers(ports["decode_port"], bytes.fromhex(ports["decode_fingerprint"]), 4, [junk],
                               lambda n: {"request": f"hostile-{n}", "layers": [0, 1, 2, 3]}),
                half_transfers(ports["data_port"], bytes.fromhex(ports["pool_fingerprint"]), 5, [put, junk],
                               lambda n: {"op": "put"}, ports["secret"].encode(), ports["tenant"]))
        run_loop(both())

    def http() -> None:
        """One malformed request every 50 ms; 4 slow bodies (Content-Length lies) kept open."""
        model, key = ports["pool_model"], ports["secret"]  # malformed bodies from a tenant that authenticates

        def post(obj, path: bytes = b"/lookup", secret: str = key) -> bytes:
            return _post(obj if isinstance(obj, bytes) else json.dumps(obj).encode(), path, secret)

        bad = [b"GARBAGE\r\n\r\n", post(b"not json"), post(b"[1, 2]"), post({"model": 5}),
               post({"model": model, "tokens": "x"}), post({"model": "nope", "tokens": [1]}),
               post({"model": model, "tokens": [-1, 2 ** 40]}), post({"model": model, "bytes": "all"}, b"/evict"),
               post({"model": model, "bytes": -1}, b"/evict"), post(b"\xff\xfe\x00"),
               post({"model": model, "tokens": [1] * 16}, secret=""), post({"model": model, "tokens": [1] * 16},
                                                                           secret="not-a-tenant-secret"),
               b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
               b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
               b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{}"]
        slow: list = []
        i = 0
        while not stop.wait(0.05):
            i += 1
            try:
                with socket.create_connection((HOST, ports["http_port"]), timeout=2, source_address=SOURCE) as s:
                    s.sendall(bad[i % len(bad)])
                    status = s.recv(64).split(b" ")[1:2]
                    count(f"http_{status[0].decode(errors='replace')[:3]}" if status else "http_no_answer")
            except OSError:
                count("http_no_answer")
            if i % 5 == 0:  # slow bodies: one byte every 250 ms
                try:
                    while len(slow) < 4:
                        s = socket.create_connection((HOST, ports["http_port"]), timeout=2, source_address=SOURCE)
                        s.sendall(post(b"").replace(b"Content-Length: 0", b"Content-Length: 100000"))
                        slow.append(s)
                    for s in list(slow):
                        try:
                            s.send(b" ")
                        except OSError:
                            count("http_slow_dropped_by_server")
                            slow.remove(s)
                            s.close()
                except OSError:
                    count("http_no_answer")

    threads = [threading.Thread(target=f, args=a, daemon=True)
               for f, a in ((sockets, (ports["decode_port"],)), (sockets, (ports["data_port"],)), (http, ()))]
    threads.append(threading.Thread(target=transfers, daemon=True))
    for t in threads:
        t.start()
    print(json.dumps({"event": "started"}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies: then SIGKILL)
    stop.set()
    for t in threads[:3]:
        t.join(5)
    with lock:
        print(json.dumps(dict(stats)), flush=True)
    os._exit(0)  # the transfer thread's loop may still be in a connect


def _post(body: bytes, path: bytes = b"/lookup", secret: str = "") -> bytes:
    auth = f"Authorization: Bearer {secret}\r\n".encode() if secret else b""
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth + \
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body



def main() -> int:
    """Targets (one JSON line on stdin): decode_port, data_port, http_port, decode_fingerprint,
    pool_fingerprint (hex), pool_model, tokens, tenant and secret (the hostile tenant's)."""
    print(json.dumps({"event": "ready"}), flush=True)
    line = sys.stdin.readline()
    if line:
        hostile_main(json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
