"""Pool benchmark (groundwork): host slab tier put/get of 2 MiB entries vs a same-run memcpy,
SSD tier put/get of 4 MiB entries vs plain sequential file I/O of the same bytes (page cache
dropped for the files before reads, both writes synced), prefix-index lookup of a 128K-token
prompt, and `kvlink pool serve` put/get of model payloads vs raw sockets (interleaved rounds).

    python benchmarks/pool.py [--json] [--dir DIR]   (DIR: where the SSD tier writes; default a temp dir)
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvlink.bench.timing import best_of
from kvlink.pool.index import PrefixIndex, STATE
from kvlink.pool.slab import SlabTier
from kvlink.presets import get_preset


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_ssd(where: Path | None, entry: int = 4 << 20, count: int = 64, rounds: int = 5) -> dict:
    """Rounds alternate plain file I/O and the tier on the same bytes (a shared disk drifts a lot
    between runs); medians of ``rounds``."""
    from kvlink.pool.ssd import SsdTier

    blobs = [os.urandom(entry) for _ in range(count)]
    buf = bytearray(entry)
    times = {"plain_w": [], "tier_w": [], "plain_r": [], "tier_r": []}
    with tempfile.TemporaryDirectory(dir=where) as d, SsdTier(Path(d) / "tier", entry * count * (rounds + 1)) as tier:
        for r in range(rounds):
            base = Path(d) / f"plain{r}.bin"
            t0 = time.perf_counter()
            with open(base, "wb", buffering=0) as f:
                for b in blobs:
                    f.write(b)
                os.fsync(f.fileno())
            times["plain_w"].append(time.perf_counter() - t0)
            keys = [(r * count + i).to_bytes(16, "little") for i in range(count)]
            t0 = time.perf_counter()
            for k, b in zip(keys, blobs):
                tier.put(k, b)
            os.sync()
            times["tier_w"].append(time.perf_counter() - t0)
            _drop_cache(base)
            for segment in (Path(d) / "tier" / "data").iterdir():
                _drop_cache(segment)
            t0 = time.perf_counter()
            with open(base, "rb", buffering=0) as f:
                for _ in blobs:
                    f.readinto(buf)
            times["plain_r"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in tier.get_many(keys, out=buf):  # as Pool.fetch reads a hit's entries
                pass
            times["tier_r"].append(time.perf_counter() - t0)
            base.unlink()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    total = entry * count
    return {"ssd_entry_bytes": entry, "ssd_rounds": rounds,
            "ssd_plain_write_gbps": round(total / med["plain_w"] / 1e9, 3),
            "ssd_put_gbps": round(total / med["tier_w"] / 1e9, 3), "ssd_put_vs_plain": round(med["plain_w"] / med["tier_w"], 3),
            "ssd_plain_read_gbps": round(total / med["plain_r"] / 1e9, 3),
            "ssd_get_gbps": round(total / med["tier_r"] / 1e9, 3), "ssd_get_vs_plain": round(med["plain_r"] / med["tier_r"], 3)}


def bench_daemon(page: int = 512 << 10, rounds: int = 2) -> dict:
    """put/get through `kvlink pool serve` vs raw sockets, same bytes. The entries are what an
    engine stores: kvlink payloads (here each layer of Kimi Linear at 4K tokens, 2.1-4.6 MiB,
    ``rounds`` times over), which the daemon verifies against their own checksums."""
    import asyncio
    import subprocess

    from kvlink.bench import harness
    from kvlink.bench.transfer import model_payloads, raw_baseline
    from kvlink.daemon import PoolClient
    from kvlink.transport.loop import run as run_loop
    from kvlink.pool.index import FULL, PrefixHit

    model, bs = "kimi-linear-48b-a3b", 16
    _, payloads = model_payloads(model, 4096)
    blobs = [p.tobytes() for p in payloads] * rounds
    count = len(blobs)
    tokens = [(i * 31) % 50000 for i in range(bs * count)]
    pieces = {(FULL, b): blob for b, blob in enumerate(blobs)}
    total = sum(len(b) for b in blobs)
    sink = harness.SinkProcess(harness.serve_argv("127.0.0.1", str(2 * total >> 20)))
    raw_port = sink.listening["raw_port"]

    def raw_round() -> float:
        return raw_baseline("127.0.0.1", raw_port, [memoryview(b) for b in pieces.values()], 4)

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "pool.toml"
        cfg.write_text(f'[daemon]\nmodels = ["{model}"]\n[pool]\nblock_size = {bs}\n'
                       f"host_bytes = {total * 8}\npage_bytes = {page}\n")
        proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(cfg),
                                 "--http-port", "0", "--data-port", "0"], stdout=subprocess.PIPE, text=True)
        ports = json.loads(proc.stdout.readline())
        try:
            async def run():
                async with PoolClient(model, http_port=ports["http_port"], data_port=ports["data_port"]) as c:
                    # Warm-up: creates the pool (its slab is allocated on first use) and the
                    # daemon's reply connection, so the figures are steady-state.
                    warm = [(i * 17) % 50000 for i in range(bs)]
                    await c.put(warm, {(FULL, 0): b"w"})
                    (await c.get(PrefixHit(bs, tuple(PrefixIndex(get_preset(model), bs).hashes(warm)), (), None, bs,
                                           ""))).release()
                    puts, gets, raws = [], [], []
                    # Each round: a new prompt (new entries), its get, then the raw-socket baseline
                    # on the same bytes, so drift on a shared machine hits all three alike.
                    for r in range(5):
                        prompt = [(t + r * 7) % 50000 for t in tokens]
                        t0 = time.perf_counter()
                        await c.put(prompt, pieces)
                        puts.append(time.perf_counter() - t0)
                        keys = tuple(PrefixIndex(get_preset(model), bs).hashes(prompt))
                        t0 = time.perf_counter()
                        with await c.get(PrefixHit(len(prompt), keys, (), None, len(prompt), "")) as got:
                            gets.append(time.perf_counter() - t0)
                            assert len(got) == count
                        raws.append(await asyncio.to_thread(raw_round))
                    return sorted(puts)[2], sorted(gets)[2], sorted(raws)[2]
            put_s, get_s, raw_s = run_loop(run())  # uvloop when installed, as kvlink runs its own loops
        finally:
            proc.kill()
            proc.wait()
            sink.stop()
    return {"daemon_entries": count, "daemon_bytes": total,
            "daemon_put_gbps": round(total * 8 / put_s / 1e9, 3), "daemon_get_gbps": round(total * 8 / get_s / 1e9, 3),
            "raw_socket_gbps": round(total * 8 / raw_s / 1e9, 3),
            "daemon_put_vs_raw": round(raw_s / put_s, 3), "daemon_get_vs_raw": round(raw_s / get_s, 3)}


def main() -> int:
    entry, count = 2 << 20, 128
    data = [torch.empty(entry, dtype=torch.uint8).random_() for _ in range(count)]
    dst = torch.empty(entry, dtype=torch.uint8)
    tier = SlabTier(entry * count, page_bytes=entry)
    keys = [i.to_bytes(16, "little") for i in range(count)]

    # Baselines copy the same bytes between the same kinds of places: into (out of) a
    # slab-sized region for put (get), so cache effects match.
    region = torch.empty(entry * count, dtype=torch.uint8).zero_()

    def memcpy_in():
        for i, src in enumerate(data):
            region[i * entry: (i + 1) * entry].copy_(src)

    def memcpy_out():
        for i in range(count):
            dst.copy_(region[i * entry: (i + 1) * entry])

    def put():  # as the pool stores into memory tiers (PoolConfig.verify_memory=False: no digest)
        for key, src in zip(keys, data):
            tier.put(key, src, hashed=False)

    def put_hashed():  # with the digest that verified reads check (verify_memory=True)
        for key, src in zip(keys, data):
            tier.put(key, src)

    def get():  # as the pool reads memory tiers
        for key in keys:
            tier.get(key, out=dst, verify=False)

    def get_verified():
        for key in keys:
            tier.get(key, out=dst)

    total = entry * count
    in_s, out_s = best_of(memcpy_in, 5), best_of(memcpy_out, 5)
    put_s, puth_s = best_of(put, 5), best_of(put_hashed, 5)
    get_s, getv_s = best_of(get, 5), best_of(get_verified, 5)
    spec = get_preset("kimi-linear-48b-a3b")
    index = PrefixIndex(spec, 64, checkpoint_every=16)
    tokens = [(i * 31) % 50000 for i in range(131072)]
    index.insert(tokens, {"full": 1, STATE: 1}, state_after=index.checkpoints_for(2048))
    index.lookup(tokens)
    t0 = time.perf_counter()
    hit = index.lookup(tokens)
    lookup_ms = (time.perf_counter() - t0) * 1e3
    daemon = bench_daemon()
    ssd = bench_ssd(Path(sys.argv[sys.argv.index("--dir") + 1]) if "--dir" in sys.argv else None)
    result = {
        "entry_bytes": entry, "entries": count,
        "memcpy_in_gbps": round(total / in_s / 1e9, 2), "memcpy_out_gbps": round(total / out_s / 1e9, 2),
        "put_gbps": round(total / put_s / 1e9, 2), "put_vs_memcpy": round(in_s / put_s, 3),
        "put_hashed_gbps": round(total / puth_s / 1e9, 2), "put_hashed_vs_memcpy": round(in_s / puth_s, 3),
        "get_gbps": round(total / get_s / 1e9, 2), "get_vs_memcpy": round(out_s / get_s, 3),
        "get_verified_gbps": round(total / getv_s / 1e9, 2), "get_verified_vs_memcpy": round(out_s / getv_s, 3),
        "lookup_128k_tokens_ms": round(lookup_ms, 3), "lookup_hit_tokens": hit.tokens,
        **ssd, **daemon,
    }
    print(json.dumps(result, indent=None if "--json" in sys.argv else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
