"""Transport and daemon: kvlink vs Mooncake (Transfer Engine over TCP, Store) vs raw sockets, on
the same payload bytes (one kvlink payload per layer of a model's request cache)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvlink.bench import harness
from kvlink.bench.transfer import model_payloads, raw_baseline, run_transfers
from kvlink.config import TransportConfig
from kvlink.transport.loop import run as run_loop

from local import _interleave
from proc import PeerFailed, Runner, python_of
from stats import Comparison

HOST = "127.0.0.1"
STREAMS = 4


def _payload_file(payloads, where: Path) -> tuple[Path, list[int]]:
    """The payloads' bytes back to back in one file (what the Mooncake runners load)."""
    path = where / "payloads.bin"
    sizes = []
    with open(path, "wb") as f:
        for p in payloads:
            n = 0
            for b in p.buffers():
                n += f.write(b)
            sizes.append(n)
    return path, sizes


def transport(model: str, tokens: int, rounds: int, log) -> Comparison:
    """kvlink loopback transfer (default integrity: the receiver verifies each part against the
    payload's checksums) vs Mooncake TE batch_transfer_sync_write (TCP) vs raw sendall/recv_into."""
    fingerprint, payloads = model_payloads(model, tokens)
    total = sum(p.nbytes for p in payloads)
    cmp = Comparison("transport", total, f"{model} {tokens} tokens, {len(payloads)} payloads (one per layer), "
                     f"loopback, {STREAMS} connections for kvlink and raw")
    cmp.note("kvlink", "TransferClient -> `kvlink transfer serve`: receiver verifies every part's xxh3")
    cmp.note("Mooncake TE", "batch_transfer_sync_write over TCP, one segment per payload; no checksum "
             "(the benchmark compares digests outside the clock)")
    cmp.note("raw sockets", f"sendall over {STREAMS} connections into recv_into of a preallocated buffer; no checksum")
    cmp.note("raw sockets + xxh3", "the same, the receiver hashing every byte it receives (xxh3, checked against "
             "digests made before the clock): the physical cost of verifying a transfer")
    cmp.pair("kvlink", "raw sockets")
    cmp.pair("kvlink", "raw sockets + xxh3")
    cmp.pair("kvlink", "Mooncake TE")
    cmp.pair("Mooncake TE", "raw sockets")
    sink = harness.SinkProcess(harness.serve_argv(HOST, str((total >> 20) * 2 + 64)))
    port, raw_port = sink.listening["port"], sink.listening["raw_port"]
    config = TransportConfig(connections=STREAMS)
    buffers = [b for p in payloads for b in p.buffers()]
    tmp = tempfile.TemporaryDirectory(prefix="kvlink-peers-")
    target = initiator = None
    try:
        source, sizes = _payload_file(payloads, Path(tmp.name))
        try:
            target = Runner("mooncake", "mooncake_runner.py", ("te",), log=log)
            info = target.call("open", size=total, host=HOST)
            initiator = Runner("mooncake", "mooncake_runner.py", ("te",), log=log)
            initiator.call("open", size=total, host=HOST, source=str(source))
            want = initiator.call("digest")["digest"]
        except PeerFailed as exc:
            cmp.skip("Mooncake TE", str(exc))
            target = initiator = None

        def kvlink_round(record: bool) -> None:
            got = run_loop(run_transfers(HOST, port, fingerprint, payloads, config, [1.0], None, False, repeat=1))
            if record:
                cmp.add("kvlink", got["seconds"])

        def raw_round(record: bool) -> None:
            seconds = raw_baseline(HOST, raw_port, buffers, STREAMS)
            if record:
                cmp.add("raw sockets", seconds)

        def raw_hashed_round(record: bool) -> None:
            seconds = raw_baseline(HOST, raw_port, buffers, STREAMS, hashed=True)
            if record:
                cmp.add("raw sockets + xxh3", seconds)

        def mooncake_round(record: bool) -> None:
            nonlocal target, initiator
            if target is None:
                return
            try:
                target.call("zero")
                got = initiator.call("write", target=f"{HOST}:{info['rpc_port']}", peer_addr=info["addr"],
                                     segments=sizes)
                equal = target.call("digest")["digest"] == want
            except PeerFailed as exc:
                cmp.skip("Mooncake TE", str(exc))
                target = initiator = None
                return
            if record:
                cmp.add("Mooncake TE", got["seconds"])
                cmp.verified("Mooncake TE", equal)

        _interleave([kvlink_round, mooncake_round, raw_round, raw_hashed_round], rounds)
    finally:
        for r in (initiator, target):
            if r is not None:
                r.close()
        sink.stop()
        tmp.cleanup()
    return cmp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerFailed(f"{what} exited with code {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polls the port with a deadline
    raise PeerFailed(f"{what} did not listen on {port} within {deadline_s:.0f} s")


def daemon(model: str, tokens: int, rounds: int, log) -> Comparison:
    """``kvlink pool serve`` put/get through PoolClient vs Mooncake Store batch_put_from /
    batch_get_into (a master, a holder process mounting the memory segment, a client without
    one moving the bytes, TCP), same entries."""
    from kvlink.daemon import PoolClient
    from kvlink.daemon.auth import DEFAULT_TENANT
    from kvlink.pool.index import FULL, PrefixHit, PrefixIndex
    from kvlink.presets import get_preset

    _, payloads = model_payloads(model, tokens)
    blobs = [p.tobytes() for p in payloads]
    total = sum(len(b) for b in blobs)
    cmp = Comparison("daemon", total,
                     f"{len(blobs)} entries ({model} {tokens} tokens, one payload per layer), loopback")
    cmp.note("kvlink put", "PoolClient.put -> `kvlink pool serve`: the daemon verifies each payload's xxh3")
    cmp.note("kvlink get", "PoolClient.get of the prompt's keys (hashed before the clock): "
             "the transport verifies every entry")
    cmp.note("Mooncake put", "MooncakeDistributedStore.batch_put_from (registered buffer) into a holder "
             "process's segment; no checksum")
    cmp.note("Mooncake get", "batch_get_into a registered buffer; no checksum (digest compared outside the clock)")
    cmp.pair("kvlink put", "Mooncake put")
    cmp.pair("kvlink get", "Mooncake get")
    bs = 16
    tmp = tempfile.TemporaryDirectory(prefix="kvlink-peers-")
    procs: list[subprocess.Popen] = []
    store = holder = None
    try:
        source, sizes = _payload_file(payloads, Path(tmp.name))
        try:
            mport = _free_port()
            master = Path(str(python_of("mooncake"))).parent.parent
            exe = next(master.glob("lib/python*/site-packages/mooncake/mooncake_master"))
            procs.append(subprocess.Popen([str(exe), f"-rpc_port={mport}", f"-metrics_port={_free_port()}",
                                           "-enable_metric_reporting=false"],
                                          stdout=log, stderr=log))
            _wait_port(mport, procs[-1], 30, "mooncake_master")
            holder = Runner("mooncake", "mooncake_runner.py", ("store",), log=log)
            holder.call("open", host=HOST, master=f"{HOST}:{mport}", segment_bytes=total * 3 + (64 << 20),
                        buffer_bytes=16 << 20)
            store = Runner("mooncake", "mooncake_runner.py", ("store",), log=log)
            store.call("open", host=HOST, master=f"{HOST}:{mport}", segment_bytes=0,
                       buffer_bytes=64 << 20, sizes=sizes, source=str(source))
        except (PeerFailed, StopIteration) as exc:
            cmp.skip("Mooncake Store", str(exc) or "mooncake_master not found in the wheel")
            store = None
        cfg = Path(tmp.name) / "pool.toml"
        # One put of the whole request lands at once: the landing arena must hold it.
        arena = max(512 << 20, total + (64 << 20))
        cfg.write_text(f'[daemon]\nmodels = ["{model}"]\nreceive_arena = {arena}\ntenant_arena_bytes = {arena}\n'
                       f"[pool]\nblock_size = {bs}\nhost_bytes = {total * 3 + (64 << 20)}\n")
        kv = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(cfg),
                               "--http-port", "0", "--data-port", "0"], stdout=subprocess.PIPE, stderr=log, text=True)
        procs.append(kv)
        ports = json.loads(kv.stdout.readline())
        index = PrefixIndex(get_preset(model), bs, DEFAULT_TENANT)  # the daemon's pool namespace is the tenant
        loop = asyncio.new_event_loop()
        client = PoolClient(model, http_port=ports["http_port"], data_port=ports["data_port"], reply_arena=arena)
        loop.run_until_complete(client.__aenter__())
        generation = [0, 0]  # kvlink's prompts, Mooncake's key sets

        def kvlink_round(record: bool) -> None:
            generation[0] += 1
            prompt = [(i * 31 + generation[0] * 100003) % 150000 for i in range(bs * len(blobs))]
            pieces = {(FULL, b): blob for b, blob in enumerate(blobs)}
            t0 = time.perf_counter()
            report = loop.run_until_complete(client.put(prompt, pieces))
            put = time.perf_counter() - t0
            hit = PrefixHit(len(prompt), tuple(index.hashes(prompt)), (), None, len(prompt), "")
            t0 = time.perf_counter()
            got = loop.run_until_complete(client.get(hit))
            get = time.perf_counter() - t0
            with got:
                equal = report.stored == len(blobs) and all(
                    bytes(got[(FULL, k)]) == blob for k, blob in zip(hit.full, blobs))
            loop.run_until_complete(client.evict(1 << 62))
            if record:
                cmp.add("kvlink put", put)
                cmp.add("kvlink get", get)
                cmp.verified("kvlink get", equal)

        def mooncake_round(record: bool) -> None:
            nonlocal store
            if store is None:
                return
            generation[1] += 1  # a new key set every round (a removed key may linger under its lease)
            prefix = f"r{generation[1]}"
            try:
                put = store.call("put", prefix=prefix)["seconds"]
                got = store.call("get", prefix=prefix)
                store.call("remove", prefix=prefix)
            except PeerFailed as exc:
                cmp.skip("Mooncake Store", str(exc))
                store = None
                return
            if record:
                cmp.add("Mooncake put", put)
                cmp.add("Mooncake get", got["seconds"])
                cmp.verified("Mooncake get", got["equal"])

        try:
            _interleave([kvlink_round, mooncake_round], rounds)
        finally:
            loop.run_until_complete(client.__aexit__(None, None, None))
            loop.close()
    finally:
        for r in (store, holder):
            if r is not None:
                r.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        tmp.cleanup()
    return cmp
