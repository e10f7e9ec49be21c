"""Helper processes of benchmarks/cluster.py, run inside a lab host's namespace (or on loopback).

    python benchmarks/cluster_peer.py raw-serve --host ADDR --bytes N
        A raw-socket source: per connection, answers each 8-byte request "send k bytes" with k
        bytes from one preallocated buffer (sendall). Prints {"port": P} once listening.

    python benchmarks/cluster_peer.py client --spec JSON
        Stores one prompt's entries (kvlink payloads: a full-attention entry per 64-token block
        and the state checkpoint at its end) into the holder daemons, then answers commands on
        stdin with one JSON line each: ``kvlink`` (ClusterPoolClient.lookup + get of the whole
        prefix), ``raw S`` (the same byte count pulled from raw-serve over S warm sockets into a
        preallocated buffer with recv_into), ``rawh S`` (the same, hashing every byte with xxh3 as
        it lands: the physical cost of verifying), ``quit``. Prints {"ready": ...} after set-up.
"""

import argparse
import asyncio
import json
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REQUEST = struct.Struct(">Q")


def raw_serve(host: str, nbytes: int) -> None:
    buf = memoryview(bytearray(nbytes))
    server = socket.socket()
    server.bind((host, 0))
    server.listen(16)
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = bytearray(REQUEST.size)
            while True:
                got = 0
                while got < REQUEST.size:
                    k = conn.recv_into(memoryview(head)[got:])
                    if not k:
                        return
                    got += k
                (want,) = REQUEST.unpack(head)
                conn.sendall(buf[:min(want, nbytes)])

    while True:  # ends when the benchmark kills this process
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class RawPuller:
    """``streams`` warm connections to the raw-serve ``sources`` (round robin); :meth:`pull`
    fetches ``nbytes`` striped over them."""

    def __init__(self, sources: list, nbytes: int, streams: int):
        self.socks = [socket.create_connection(tuple(sources[i % len(sources)]), timeout=60) for i in range(streams)]
        for s in self.socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(nbytes))
        self.nbytes = nbytes
        self.pool = ThreadPoolExecutor(streams) if streams > 1 else None

    def _one(self, s: socket.socket, lo: int, hi: int, hashed: bool) -> None:
        from kvlink.codec.checksum import checksum_stream

        hasher = checksum_stream() if hashed else None
        s.sendall(REQUEST.pack(hi - lo))
        view = self.buf[lo:hi]
        while len(view):
            k = s.recv_into(view)
            if not k:
                raise ConnectionError("raw source closed the connection")
            if hasher is not None:  # hash what landed, as a verifying receiver must
                hasher.update(view[:k])
            view = view[k:]

    def pull(self, hashed: bool = False) -> float:
        n, stripe = len(self.socks), -(-self.nbytes // len(self.socks))
        bounds = [(i * stripe, min(self.nbytes, (i + 1) * stripe)) for i in range(n)]
        t0 = time.perf_counter()
        if self.pool is None:
            self._one(self.socks[0], *bounds[0], hashed)
        else:
            for f in [self.pool.submit(self._one, s, lo, hi, hashed) for s, (lo, hi) in zip(self.socks, bounds)]:
                f.result()
        return time.perf_counter() - t0


def entries() -> tuple[bytes, bytes]:
    """(one full-attention block entry, one state checkpoint entry) of kimi-linear at block 64."""
    from kvlink.bench.serde import realistic_cache
    from kvlink.presets import get_preset
    from kvlink.serde.pack import Packer
    from kvlink.serde.paged import CacheRef

    spec = get_preset("kimi-linear-48b-a3b")
    packer = Packer(realistic_cache(spec, 1, 64, 1))
    ref = CacheRef([0], 64, 0)
    return packer.pack(ref, group="full").tobytes(), packer.pack(ref, group="state").tobytes()


async def client(spec: dict) -> None:
    from kvlink.cluster.client import ClusterPoolClient
    from kvlink.config import ClusterConfig, TransportConfig
    from kvlink.daemon.client import PoolClient
    from kvlink.pool.index import FULL, STATE

    model, blocks = spec["model"], spec["blocks"]
    transport = TransportConfig()
    full, state = entries()
    tokens = [(i * 31 + 7) % 50000 for i in range(blocks * 64)]
    pieces = {(FULL, b): full for b in range(blocks)}
    pieces[(STATE, blocks - 1)] = state
    total = len(full) * blocks + len(state)
    for host, http, data in spec["holders"]:
        async with PoolClient(model, host, http, data, transport=transport, timeout=60) as putter:
            report = await putter.put(tokens, pieces)
            if report.stored != len(pieces):
                raise SystemExit(f"daemon {host} stored {report.stored} of {len(pieces)} entries: {report.errors}")
    config = ClusterConfig(index_nodes=tuple(spec["index"]), cluster=spec["cluster"], replicate_after=0)
    async with ClusterPoolClient(model, config, block_size=64, checkpoint_every=16, transport=transport,
                                 timeout=60) as cpc:
        deadline = time.monotonic() + 30  # the daemons publish in the background: poll the index
        while True:
            hit = await cpc.lookup(tokens)
            holders = len(getattr(hit, "plan", {}))
            if hit.tokens == len(tokens) and holders == len(spec["holders"]):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the index never offered the whole prefix: {hit.stopped}, {holders} holders")
            await asyncio.sleep(0.05)  # polling the index for the publishers' records
        fetched = await cpc.get(hit)
        exact = all(bytes(v) == (state if kind == STATE else full) for (kind, _), v in fetched.items())
        fetched.release()
        if not exact:
            raise SystemExit("fetched entries differ from what was stored")
        pullers = {s: RawPuller(spec["raw"], total, s) for s in (1, 4)}
        print(json.dumps({"ready": True, "bytes": total, "entries": len(pieces), "holders": holders}), flush=True)
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            if line[0] == "kvlink":
                t0 = time.perf_counter()
                hit = await cpc.lookup(tokens)
                t1 = time.perf_counter()
                fetched = await cpc.get(hit)
                t2 = time.perf_counter()
                got = sum(len(v) for v in fetched.values())
                fetched.release()
                print(json.dumps({"lookup_s": t1 - t0, "get_s": t2 - t1, "bytes": got}), flush=True)
            else:
                seconds = await asyncio.to_thread(pullers[int(line[1])].pull, line[0] == "rawh")
                print(json.dumps({"raw_s": seconds, "bytes": total}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["raw-serve", "client"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--spec", default="{}")
    args = parser.parse_args()
    if args.mode == "raw-serve":
        raw_serve(args.host, args.bytes)
        return 0
    from kvlink.transport.loop import run

    run(client(json.loads(args.spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
