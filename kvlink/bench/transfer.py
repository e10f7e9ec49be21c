"""``kvlink bench transfer``: model-shaped transfers against a receiver, with a raw-socket baseline.

The payload is a real request cache: a preset's layers filled with KV-like values, packed one
payload per layer (a transfer part each). The baseline in the same run sends the same bytes
with plain ``socket.sendall`` over the same number of connections to the receiver's raw sink
(``recv_into`` into a preallocated buffer), so ``ratio`` is kvlink's goodput over the physical one.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
import socket
import sys
import threading
import time

from kvlink.bench.serde import realistic_cache
from kvlink.bench.sink import RAW_HASH, RAW_HEADER, RAW_REPLY
from kvlink.bench.timing import CpuMeter
from kvlink.codec.checksum import checksum_pieces
from kvlink.config import CodecConfig, TransportConfig
from kvlink.serde.layout import layer_segments
from kvlink.transport.adaptive import CodecAdvisor
from kvlink.presets import get_preset
from kvlink.serde.pack import Packer
from kvlink.serde.paged import CacheRef
from kvlink.transport.sender import TransferClient


def model_payloads(model: str, tokens: int, block_size: int = 16, codec: str = "none",
                   rate: float | None = None) -> tuple[bytes, list]:
    """(fingerprint, one packed Payload per layer) for ``tokens`` tokens of ``model``.

    ``codec``: a codec name for every segment, or ``adaptive``: per segment the codec that
    delivers soonest at ``rate`` bits/s (measured on this cache's data; raw when rate is None)."""
    spec = get_preset(model)
    need = -(-tokens // block_size)
    cache = realistic_cache(spec, need, block_size, 1)
    ref = CacheRef(random.Random(0).sample(range(need), need), tokens, 0)
    if codec == "adaptive":
        advisor = CodecAdvisor()
        advisor.calibrate_cache(cache, ref)
        packer = Packer(cache)
        return spec.fingerprint, [
            packer.pack(ref, [layer], advisor.codecs(layer_segments(spec, layer, 0, tokens), rate))
            for layer in range(spec.num_layers)]
    packer = Packer(cache, CodecConfig(kv_codec=codec, state_codec=codec))
    return spec.fingerprint, [packer.pack_layer(ref, layer) for layer in range(spec.num_layers)]


def raw_baseline(host: str, port: int, buffers: list[memoryview], streams: int, hashed: bool = False) -> float:
    """Seconds to push ``buffers`` with plain sendall over ``streams`` connections (striped).

    ``hashed``: the sink hashes every byte as it lands (xxh3, the hash kvlink payloads carry)
    and each stripe's digest is checked against one computed before the clock starts, the way
    a payload's checksums exist before it is sent: the physical cost of verifying a transfer."""
    total = sum(b.nbytes for b in buffers)
    stripe = -(-total // streams)
    flat = [(sum(x.nbytes for x in buffers[:i]), b) for i, b in enumerate(buffers)]

    def pieces(lo: int, hi: int):
        for start, buf in flat:
            a, b = max(lo, start), min(hi, start + buf.nbytes)
            if a < b:
                yield buf[a - start: b - start]

    bounds = [(i * stripe, min(total, (i + 1) * stripe)) for i in range(streams)]
    expect = [checksum_pieces(pieces(lo, hi)) if hashed else 0 for lo, hi in bounds]
    socks = [socket.create_connection((host, port)) for _ in range(streams)]
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    failures: list[str] = []

    def push(s: socket.socket, lo: int, hi: int, digest: int) -> None:
        s.sendall(RAW_HEADER.pack(lo, hi - lo, RAW_HASH if hashed else 0))
        for piece in pieces(lo, hi):
            s.sendall(piece)
        reply = bytearray()
        while len(reply) < RAW_REPLY.size:
            got = s.recv(RAW_REPLY.size - len(reply))
            if not got:
                break
            reply += got
        if len(reply) != RAW_REPLY.size or RAW_REPLY.unpack(reply)[0] != digest:
            failures.append(f"stripe [{lo}, {hi}): reply {bytes(reply).hex()}, expected {digest:#x}")

    threads = [threading.Thread(target=push, args=(s, lo, hi, d)) for s, (lo, hi), d in zip(socks, bounds, expect)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    for s in socks:
        s.close()
    if failures:
        raise ConnectionError("raw sink: " + "; ".join(failures))
    return seconds


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0 = total, enabled, time.monotonic()

    def show(self, done: int, snap) -> None:
        if not self.enabled:
            return
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(frac * 30)
        rate = done * 8 / max(time.monotonic() - self.t0, 1e-9) / 1e9
        est = "-" if snap.available_bps is None else f"{snap.available_bps / 1e9:.2f}"
        rtt = "-" if snap.rtt_ms is None else f"{snap.rtt_ms:.2f}"
        sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}% {done / 2**30:6.2f} GiB  {rate:6.2f} Gbit/s  "
                         f"est {est} Gbit/s  rtt {rtt} ms  {snap.phase:<7}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def run_transfers(host: str, port: int, fingerprint: bytes, payloads: list, config: TransportConfig,
                        weights: list[float], secret: bytes | None, progress: bool, repeat: int = 1,
                        between=None, meter: CpuMeter | None = None, ssl=None) -> dict:
    """``repeat`` rounds of ``len(weights)`` concurrent copies of the payload set over one client
    (connections stay open, as between a decode cluster and its prefill peers); ``between()``,
    when given, runs in a thread after each round (the baseline's turn). Returns the median
    round's figures (and its timeline), with the median CPU seconds per GiB of each end."""
    meter = meter or CpuMeter()
    async with TransferClient(host, port, fingerprint, config, secret=secret, ssl=ssl) as client:
        rounds, cpus = [], []
        for _ in range(repeat):
            started = meter.start()
            rounds.append(await _round(client, payloads, weights, progress))
            cpus.append(meter.stop(started))
            if between is not None:
                await asyncio.to_thread(between)
    nbytes = rounds[0]["bytes"]
    rounds.sort(key=lambda r: r["seconds"])
    median = rounds[len(rounds) // 2]
    median["round_seconds"] = [r["seconds"] for r in rounds]
    median["cpu_s_per_gib"] = cpu_per_gib(cpus, nbytes)
    return median


def cpu_per_gib(cpus: list[dict], nbytes: int) -> dict:
    """Median CPU seconds per GiB moved, of the sender (this process) and the receiver (when known)."""
    def med(values):
        values = sorted(v for v in values if v is not None)
        return round(values[len(values) // 2] / (nbytes / 2**30), 4) if values else None
    return {"sender": med(c["self"] for c in cpus), "receiver": med(c["peer"] for c in cpus)}


async def _round(client: TransferClient, payloads: list, weights: list[float], progress: bool) -> dict:
    parts = [p.buffers() for p in payloads]
    total = sum(p.nbytes for p in payloads)
    bar = Progress(total * len(weights), progress)
    t0 = time.monotonic()
    # Parts are payloads: a verifying receiver checks each against its own checksums as it lands,
    # inside the timed round.
    transfers = [client.open(len(parts), weight=w, meta={"payload": True, "weight": w}, verifiable=True)
                 for w in weights]
    # Parts are fed one at a time, as a prefill engine produces layers.
    for i, part in enumerate(parts):
        for t in transfers:
            t.add_part(i, part)
    waiters = [asyncio.ensure_future(t.done()) for t in transfers]
    first_done: dict | None = None
    timeline = []
    while not all(w.done() for w in waiters):
        await asyncio.wait(waiters, timeout=0.1, return_when=asyncio.FIRST_EXCEPTION)
        snap = client.snapshot()
        now = time.monotonic() - t0
        timeline.append({"t": round(now, 3), "acked": sum(t.bytes_acked for t in transfers),
                         "acked_each": [t.bytes_acked for t in transfers],
                         "available_bps": snap.available_bps, "pacing_bps": snap.pacing_bps,
                         "delivery_bps": snap.delivery_bps, "rtt_ms": snap.rtt_ms, "phase": snap.phase})
        bar.show(sum(t.bytes_acked for t in transfers), snap)
        if first_done is None and any(w.done() for w in waiters):
            first_done = {"t": round(now, 3), "acked": [t.bytes_acked for t in transfers]}
    bar.close()
    for w in waiters:
        w.result()  # raise the first transfer error, typed
    seconds = time.monotonic() - t0
    snap = client.snapshot()
    return {
        "t0_monotonic": t0, "bytes": total * len(weights), "seconds": round(seconds, 4),
        "goodput_gbps": round(total * len(weights) * 8 / seconds / 1e9, 4),
        "per_transfer": [{"weight": t.weight, "seconds": round(t.finished - t.opened, 4),
                          "bytes_resent": t.bytes_resent} for t in transfers],
        "shares_at_first_completion": first_done,
        "bytes_resent": sum(t.bytes_resent for t in transfers),
        "reconnects": client.stats["reconnects"], "chunks_nacked": client.stats["chunks_nacked"],
        "live_connections": client.live_connections,
        "snapshot": snap.to_dict(), "timeline": timeline,
    }


def run(host: str, port: int, raw_port: int | None, model: str, tokens: int, config: TransportConfig,
        weights: list[float], secret: bytes | None, progress: bool, announce: bool = False, repeat: int = 1,
        codec: str = "none", receiver_pid: int | None = None, hashed_baseline: bool = False,
        use_uvloop: bool = True, ssl=None) -> dict:
    """The whole benchmark: pack, kvlink transfer(s), then the raw baseline on the same bytes.
    With ``receiver_pid`` (a local receiver) the receiver's CPU time is reported too; with
    ``hashed_baseline`` a second baseline whose receiver also hashes every byte (what verifying
    costs by itself, for scale: the goal compares against the plain one). ``use_uvloop``: run the
    sender on uvloop when it is installed (False: the stock asyncio loop, for comparison). ``ssl``:
    a client ``ssl.SSLContext`` for a TLS receiver."""
    from kvlink.transport.loop import run as run_loop

    t0 = time.perf_counter()
    fingerprint, payloads = model_payloads(model, tokens, codec=codec, rate=config.rate_cap)
    pack_s = time.perf_counter() - t0
    raw_bytes = get_preset(model).bytes_at(tokens)
    result = {"model": model, "tokens": tokens, "connections": config.connections, "chunk_bytes": config.chunk_bytes,
              "rate_cap_bps": config.rate_cap, "adaptive": config.adaptive, "weights": weights,
              "payload_bytes": sum(p.nbytes for p in payloads), "pack_seconds": round(pack_s, 3), "codec": codec,
              "cache_bytes": raw_bytes,
              "codecs_used": dict(Counter(s.codec.label for p in payloads for s in p.segments))}
    if announce:
        sys.stderr.write(f"KVLINK-START {time.monotonic()}\n")
        sys.stderr.flush()
    # Rounds alternate kvlink / baseline(s) so drift on a shared machine hits both alike.
    buffers = [b for p in payloads for b in p.buffers()] * len(weights)
    baselines = {"raw_baseline": False, "raw_hashed_baseline": True} if hashed_baseline else {"raw_baseline": False}
    raw_rounds: dict[str, list[float]] = {name: [] for name in baselines}
    raw_cpus: dict[str, list[dict]] = {name: [] for name in baselines}
    meter = CpuMeter(receiver_pid)

    def baseline_round() -> None:
        for name, hashed in baselines.items():
            started = meter.start()
            raw_rounds[name].append(raw_baseline(host, raw_port, buffers, config.connections, hashed))
            raw_cpus[name].append(meter.stop(started))

    between = baseline_round if raw_port is not None else None
    result["host_cpus"] = os.cpu_count()
    result["kvlink"] = run_loop(run_transfers(host, port, fingerprint, payloads, config, weights, secret, progress,
                                              repeat, between=between, meter=meter, ssl=ssl), use_uvloop)
    for name in baselines if raw_port is not None else ():
        rounds = sorted(raw_rounds[name])
        seconds = rounds[len(rounds) // 2]
        raw_gbps = result["payload_bytes"] * len(weights) * 8 / seconds / 1e9
        result[name] = {"seconds": round(seconds, 4), "goodput_gbps": round(raw_gbps, 4),
                        "round_seconds": [round(r, 4) for r in rounds],
                        "cpu_s_per_gib": cpu_per_gib(raw_cpus[name], sum(b.nbytes for b in buffers))}
        ratio = "ratio_vs_raw" if name == "raw_baseline" else "ratio_vs_raw_hashed"
        result[ratio] = round(result["kvlink"]["goodput_gbps"] / raw_gbps, 3)
    # Goodput in cache bytes: what a codec buys on a slow link.
    result["kvlink"]["cache_goodput_gbps"] = round(raw_bytes * len(weights) * 8 / result["kvlink"]["seconds"] / 1e9, 4)
    return result


def _cpu(figures: dict) -> str:
    cpu = figures.get("cpu_s_per_gib") or {}
    return ", ".join("-" if cpu.get(end) is None else f"{cpu[end]:.3f}" for end in ("sender", "receiver"))


def render(result: dict) -> str:
    k = result["kvlink"]
    lines = [f"{result['model']} {result['tokens']} tokens: {result['payload_bytes'] / 2**20:.1f} MiB x "
             f"{len(result['weights'])} transfer(s), {result['connections']} connections, "
             f"chunk {result['chunk_bytes'] >> 10} KiB, cap {result['rate_cap_bps'] or 'none'}, "
             f"adaptive {result['adaptive']}",
             f"  median of {len(k['round_seconds'])} round(s)",
             f"  {'':22}{'seconds':>10}{'Gbit/s':>10}",
             f"  {'kvlink':22}{k['seconds']:>10.3f}{k['goodput_gbps']:>10.3f}"]
    if result.get("codec", "none") != "none":
        lines.append(f"  codec {result['codec']}: {result['codecs_used']}; payload {result['payload_bytes'] / 2**20:.1f} MiB "
                     f"for {result['cache_bytes'] / 2**20:.1f} MiB of cache: {k['cache_goodput_gbps']:.3f} Gbit/s of cache")
    if "raw_baseline" in result:
        r = result["raw_baseline"]
        lines.append(f"  {'raw sendall/recv_into':22}{r['seconds']:>10.3f}{r['goodput_gbps']:>10.3f}")
    if "raw_hashed_baseline" in result:
        r = result["raw_hashed_baseline"]
        lines.append(f"  {'raw + receiver xxh3':22}{r['seconds']:>10.3f}{r['goodput_gbps']:>10.3f}")
    if "raw_baseline" in result:
        lines.append(f"  ratio kvlink / raw: {result['ratio_vs_raw']:.3f}" +
                     (f" (kvlink / raw + xxh3: {result['ratio_vs_raw_hashed']:.3f})" if "ratio_vs_raw_hashed" in result else ""))
    lines.append(f"  CPU s/GiB (sender, receiver) on {result.get('host_cpus')} cores: kvlink {_cpu(k)}" +
                 (f", raw {_cpu(result['raw_baseline'])}" if "raw_baseline" in result else "") +
                 (f", raw + xxh3 {_cpu(result['raw_hashed_baseline'])}" if "raw_hashed_baseline" in result else ""))
    snap = k["snapshot"]
    est = snap["available_bps"]
    lines.append(f"  estimate {'-' if est is None else f'{est / 1e9:.3f} Gbit/s'}, rtt {snap['rtt_ms']} ms, "
                 f"resent {k['bytes_resent']} B, reconnects {k['reconnects']}, nacked {k['chunks_nacked']}")
    if len(result["weights"]) > 1 and k["shares_at_first_completion"]:
        acked = k["shares_at_first_completion"]["acked"]
        lines.append("  shares when the first finished: " +
                     ", ".join(f"w{w:g}={a / sum(acked):.3f}" for w, a in zip(result["weights"], acked)))
    return "\n".join(lines)
