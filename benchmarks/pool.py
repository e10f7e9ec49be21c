"""Pool benchmark (groundwork): host slab tier put/get of 2 MiB entries vs a same-run memcpy,
the SSD tier on ~1 GiB of 256-token DeepSeek-V3 chunks vs plain file I/O of the same bytes
(durable put and write-through ``Pool.store`` vs write + fsync; cold ``get_many`` and cold
``Pool.fetch`` vs a plain cold read; interleaved rounds in alternating order), prefix-index lookup
of a 128K-token prompt, and `kvlink pool serve` put/get of model payloads vs raw sockets.

    python benchmarks/pool.py [--json] [--dir DIR] [--quick] [--rounds N] [--ssd-only] [--unsettled] [--no-prime]

DIR: where the SSD files go (default a temp dir, deleted after). --quick: 8 SSD entries.
--unsettled: do not sync and wait for writeback before each SSD step (shows the round-order effect).
--no-prime: no plain read pass over the files before the timed cold reads (see bench_ssd).
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvlink.bench.timing import best_of, drop_page_cache
from kvlink.pool.index import PrefixIndex, STATE
from kvlink.pool.slab import SlabTier
from kvlink.presets import get_preset


def _meminfo() -> dict:
    """Dirty and Writeback (MiB) from /proc/meminfo: page-cache data not yet on disk."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":")
                if name in ("Dirty", "Writeback"):
                    out[name.lower()] = int(value.split()[0]) >> 10
    except OSError:
        pass
    return out


def _settle(limit_mib: int = 64, deadline_s: float = 30.0) -> dict:
    """Start from a quiet disk: flush what others left dirty (sync), then wait (bounded) until
    Dirty + Writeback is small. Returns the state found before, for the record."""
    before = _meminfo()
    os.sync()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and sum(_meminfo().values()) > limit_mib:
        time.sleep(0.05)  # polling a kernel counter with a deadline, not synchronising threads
    return before


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def bench_ssd(where: Path | None, entry: int, count: int, rounds: int = 3, settle: bool = True,
              prime: bool = True) -> dict:
    """The SSD tier against plain file I/O of the same bytes, in interleaved rounds whose order
    alternates (a shared disk drifts a lot between runs; and see docs/pool.md on round order).

    Writes of the same ``count`` entries of ``entry`` bytes, each round into new files: plain
    write + fsync of one file; ``SsdTier.put_many`` (durable) on a new tier; a durable
    write-through ``Pool.store`` of a new prompt (CPU tensors, as an engine hands them over) on
    one long-lived pool, as a server runs it (its host memory warmed by an untimed first store).
    Reads with the page cache dropped (``POSIX_FADV_DONTNEED`` after the sync): a plain
    ``readinto`` of the file into one reused buffer; ``SsdTier.get_many`` into one reused buffer
    (verified); ``Pool.fetch`` of the round's prompt after it was evicted from memory (only the
    SSD holds it). ``settle``: sync and let writeback finish before each timed step. ``prime``:
    read each step's files once (plain reads, page cache dropped before and after) before the
    timed reads of a round, so that all of them find the disk's own cache in the same state."""
    from kvlink.config import PoolConfig
    from kvlink.pool.index import FULL
    from kvlink.pool.pool import Pool, tier_key
    from kvlink.pool.ssd import SsdTier

    spec, bs = get_preset("deepseek-v3"), 256
    blobs = [torch.frombuffer(bytearray(os.urandom(entry)), dtype=torch.uint8) for _ in range(count)]
    total = entry * count
    buf = torch.empty(entry, dtype=torch.uint8)
    bufv = memoryview(buf.numpy())
    keys = [i.to_bytes(16, "little") for i in range(count)]
    times: dict[str, list[float]] = {k: [] for k in ("plain_w", "tier_w", "pool_w", "plain_r", "tier_r", "pool_r")}
    dirty: dict[str, list[dict]] = {k: [] for k in times}
    first: dict[str, list[float]] = {k: [] for k in ("plain_r", "tier_r", "pool_r")}  # GB/s of the priming pass

    def prompt(r: int) -> list[int]:
        return [(r * 7919 + i * 31) % 50000 for i in range(bs * count)]

    with tempfile.TemporaryDirectory(dir=where) as tmp:
        tmp = Path(tmp)
        config = PoolConfig(block_size=bs, host_bytes=total + (64 << 20), page_bytes=1 << 20, chunk_bytes=64 << 20,
                            ssd_dir=str(tmp / "pool"), ssd_bytes=(rounds + 2) * total, ssd_durable=True,
                            write_mode="through", checkpoint_every=None)
        fetch_buf = memoryview(np.ones(total, np.uint8))  # faulted in once, like an engine's staging buffer
        with Pool(spec, config) as pool:
            pool.store(prompt(-1), {(FULL, i): b for i, b in enumerate(blobs)})  # warm-up: host memory faulted in
            for r in range(rounds):
                rd = tmp / f"round{r}"
                rd.mkdir()
                tokens = prompt(r)
                pool.evict(total + (64 << 20))  # the memory tier empty again (all of it is on SSD)
                pool.drain()

                # Each step: (open, timed, close); opening a file or a tier (RocksDB) is not
                # part of a put or a read.
                def plain_w(fd):
                    at = 0
                    for b in blobs:
                        at += os.pwrite(fd, b.numpy(), at)
                    os.fsync(fd)

                def tier_w(tier):
                    assert all(tier.put_many([(k, b, None) for k, b in zip(keys, blobs)]))

                def pool_w(_):
                    report = pool.store(tokens, {(FULL, i): b for i, b in enumerate(blobs)})
                    assert report.on_ssd == count, report

                def plain_r(f):
                    for _ in blobs:
                        f.readinto(bufv)

                def tier_r(tier):
                    for _ in tier.get_many(keys, out=buf):
                        pass

                def pool_r(_):
                    hit = pool.lookup(tokens)
                    assert hit.tokens == len(tokens), hit
                    assert len(pool.fetch(hit, out=fetch_buf)) == count  # one reused buffer

                opens = {"plain_w": lambda: os.open(rd / "plain.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                         "tier_w": lambda: SsdTier(rd / "tier", 2 * total, durable=True),
                         "plain_r": lambda: open(rd / "plain.bin", "rb", buffering=0),
                         "tier_r": lambda: SsdTier(rd / "tier", 2 * total)}
                files = {"plain_r": lambda: [rd / "plain.bin"],
                         "tier_r": lambda: sorted((rd / "tier" / "data").iterdir()),
                         "pool_r": lambda: sorted({pool.ssd.locate(tier_key(FULL, k))[0]
                                                   for k in pool.index.hashes(tokens)})}
                steps = {"plain_w": plain_w, "tier_w": tier_w, "pool_w": pool_w,
                         "plain_r": plain_r, "tier_r": tier_r, "pool_r": pool_r}
                writes, reads = ["plain_w", "tier_w", "pool_w"], ["plain_r", "tier_r", "pool_r"]
                if r % 2:  # alternate the order: whatever one step leaves behind hits the others alike
                    writes.reverse()
                    reads.reverse()
                for step in writes + reads:
                    if step == reads[0] and prime:
                        # On this VM the first read of freshly written bytes runs at 0.4-1.9 GB/s
                        # depending on the hypervisor's cache, whatever reads them (docs/pool.md):
                        # one untimed-for-the-ratio plain pass over each step's files first, so
                        # the timed reads below all find the same state. Its speed is reported.
                        for rstep in reads:
                            paths = list(files[rstep]())
                            for path in paths:
                                drop_page_cache(path)
                            _settle() if settle else None
                            t0 = time.perf_counter()
                            for path in paths:
                                with open(path, "rb", buffering=0) as f:
                                    while f.readinto(bufv):
                                        pass
                            first[rstep].append(sum(p.stat().st_size for p in paths) / (time.perf_counter() - t0) / 1e9)
                    if step == "pool_r":
                        pool.evict(total + (64 << 20))  # only the SSD holds the prompt now
                        pool.drain()
                    handle = opens[step]() if step in opens else None
                    try:
                        for path in files[step]() if step in reads else []:
                            drop_page_cache(path)
                        dirty[step].append(_settle() if settle else _meminfo())
                        t0 = time.perf_counter()
                        steps[step](handle)
                        times[step].append(time.perf_counter() - t0)
                        pool.drain()  # promotions after an SSD hit: done before the next step
                    finally:
                        if isinstance(handle, int):
                            os.close(handle)
                        elif handle is not None:
                            handle.close()
                shutil.rmtree(rd)
    ratio = {"put_vs_plain_write": [p / q for p, q in zip(times["plain_w"], times["pool_w"])],
             "tier_put_many_vs_plain_write": [p / q for p, q in zip(times["plain_w"], times["tier_w"])],
             "fetch_vs_plain_read": [p / q for p, q in zip(times["plain_r"], times["pool_r"])],
             "tier_get_many_vs_plain_read": [p / q for p, q in zip(times["plain_r"], times["tier_r"])]}
    return {"ssd_entry_bytes": entry, "ssd_entries": count, "ssd_rounds": rounds, "ssd_settled": settle,
            "ssd_gbps": {k: _spread([total / t / 1e9 for t in v]) for k, v in times.items()},
            "ssd_ratios": {k: _spread(v) for k, v in ratio.items()},
            "ssd_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "ssd_first_read_gbps": {k: _spread(v) for k, v in first.items() if v},
            "ssd_dirty_before_mib": dirty}


def print_ssd(res: dict) -> None:
    print(f"SSD tier: {res['ssd_entries']} entries of {res['ssd_entry_bytes'] / 2**20:.1f} MiB "
          f"({res['ssd_entries'] * res['ssd_entry_bytes'] / 2**30:.2f} GiB), {res['ssd_rounds']} alternating rounds")
    for name, s in res["ssd_gbps"].items():
        print(f"  {name:8s} {s['median']:6.3f} GB/s  ({s['min']:.3f}-{s['max']:.3f})")
    for name, s in res.get("ssd_first_read_gbps", {}).items():
        print(f"  first read of {name[:-2]} files (plain, priming) {s['median']:.3f} GB/s  "
              f"({s['min']:.3f}-{s['max']:.3f})")
    for name, s in res["ssd_ratios"].items():
        print(f"  {name:30s} {s['median']:.3f}x  (range {s['min']:.3f}-{s['max']:.3f})")


def bench_daemon(page: int = 512 << 10, rounds: int = 2) -> dict:
    """put/get through `kvlink pool serve` vs raw sockets, same bytes. The entries are what an
    engine stores: kvlink payloads (here each layer of Kimi Linear at 4K tokens, 2.1-4.6 MiB,
    ``rounds`` times over), which the daemon verifies against their own checksums."""
    import asyncio
    import subprocess

    from kvlink.bench import harness
    from kvlink.bench.transfer import model_payloads, raw_baseline
    from kvlink.daemon import PoolClient
    from kvlink.daemon.auth import DEFAULT_TENANT
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
                    index = PrefixIndex(get_preset(model), bs, namespace=DEFAULT_TENANT)  # the daemon's keys
                    assert (await c.put(warm, {(FULL, 0): blobs[0]})).stored == 1
                    (await c.get(PrefixHit(bs, tuple(index.hashes(warm)), (), None, bs, ""))).release()
                    puts, gets, raws = [], [], []
                    # Each round: a new prompt (new entries), its get, then the raw-socket baseline
                    # on the same bytes, so drift on a shared machine hits all three alike.
                    for r in range(5):
                        prompt = [(t + r * 7) % 50000 for t in tokens]
                        t0 = time.perf_counter()
                        await c.put(prompt, pieces)
                        puts.append(time.perf_counter() - t0)
                        keys = tuple(index.hashes(prompt))
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
    quick = "--quick" in sys.argv
    where = Path(sys.argv[sys.argv.index("--dir") + 1]) if "--dir" in sys.argv else None
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    # 256-token chunks of DeepSeek-V3 (MLA): 17.2 MiB each, 60 of them ~1 GiB (--quick: 8).
    chunk = get_preset("deepseek-v3").kv_bytes_per_token * 256
    ssd = bench_ssd(where, chunk, 8 if quick else 60, rounds, settle="--unsettled" not in sys.argv,
                    prime="--no-prime" not in sys.argv)
    if "--ssd-only" in sys.argv:
        print(json.dumps(ssd)) if "--json" in sys.argv else print_ssd(ssd)
        return 0
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
    if "--json" not in sys.argv:
        print_ssd(ssd)
    print(json.dumps(result, indent=None if "--json" in sys.argv else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
