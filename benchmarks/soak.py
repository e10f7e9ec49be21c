"""Soak benchmark: engine transfers and pool daemon traffic for a while, a hostile peer mixed in.

    python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--model soak-tiny] [--no-hostile] [--json]

This process runs ``--concurrency`` prefill->decode requests at a time through
:class:`~kvlink.engine.PrefillSide` / :class:`~kvlink.engine.DecodeSide`, and as many pool workers
doing put / lookup / get against a ``kvlink pool serve`` subprocess, as the tenants in ``TENANTS``
(each with its own secret). Every received cache and entry is compared bit for bit with what was
sent (deterministic data; decode blocks are zeroed before each load). RSS, open fds, threads and
CPU of each process are sampled from /proc every second (benchmarks/soak_measure.py); growth is
fitted over the second half. See docs/soak.md.
Phases: warm-up (not counted), calibration without the hostile peer, then with it
(benchmarks/soak_hostile.py, a subprocess: idle and trickling sockets on both transport ports,
transfers it never finishes, malformed HTTP to the daemon); the throughput ratio of the two is the
hostile peer's cost. Only 127.0.0.1 is used; subprocesses die with this process. Failures are
counted by kind and type, never fatal; exit status 0 only when every acceptance check passes.
"""

import argparse
import asyncio
import collections
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from kvlink.config import TransportConfig
from kvlink.daemon import PoolClient
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.errors import KvlinkError, LoadFailed
from kvlink.pool.index import FULL
from kvlink.presets import PRESETS, get_preset
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention
from kvlink.transport.loop import run as run_loop

from soak_measure import FLAT, Sampler, log_summary  # benchmarks/, next to this script

HOST = "127.0.0.1"
BLOCK = 16                     # tokens per block, engine caches and the daemon's pool
POOL_MODEL = "deepseek-v3"     # the daemon serves presets; to it, entries are opaque bytes
POOL_BLOCKS, ENTRY = 4, 4096   # blocks per pool prompt, bytes per entry
PROMPTS = 32                   # distinct prompts per tenant (same tokens, other bytes, per tenant)
SRC_BLOCKS, SRC_SLOTS = 64, 8    # the prefill cache requests draw their blocks and slot from
TIMEOUT = 30.0                 # one request, end to end
# (name, secret). With secrets the daemon keeps each tenant's pool apart and every tenant stores the
# same prompts with its own bytes (a leak shows as corruption); a tenant without one shares the
# anonymous pool, so then each tenant gets prompts of its own. The hostile peer is a tenant too.
TENANTS: list[tuple[str, str | None]] = [("tenant-a", "soak-secret-a"), ("tenant-b", "soak-secret-b"),
                                         ("tenant-c", "soak-secret-c")]
HOSTILE_TENANT = ("hostile", "soak-secret-hostile")
HOSTILE_LABEL = "hostile peer (sampled for its CPU; not judged)"


def tiny_spec() -> CacheSpec:
    """Kimi-Linear-shaped, tiny: linear state, GQA and MLA layers (a few KiB per request)."""
    linear = LinearAttention((2, 16, 16), "float32", (32, 3), "bfloat16", variant="kda")
    return CacheSpec("soak-tiny", (linear, FullAttention(2, 32), linear, MLA(32, 16)))


def model_spec(name: str) -> CacheSpec:
    return tiny_spec() if name == "soak-tiny" else get_preset(name)


def tenant_client(tenant: str, secret: str | None, ports: dict) -> PoolClient:
    """One tenant's client of the daemon: the one place its credential goes (``daemon_config``
    writes the daemon's side)."""
    return PoolClient(POOL_MODEL, host=HOST, http_port=ports["http_port"], data_port=ports["data_port"],
                      secret=secret.encode() if secret else None, tenant=tenant, timeout=TIMEOUT,
                      reply_arena=8 << 20, transport=TransportConfig(connections=1))


def daemon_config() -> str:
    arena = f"receive_arena = {32 << 20}\ntenant_arena_bytes = {8 << 20}\n"  # small: RSS is judged
    tenants = "".join(f'"{name}" = "{secret}"\n' for name, secret in [*TENANTS, HOSTILE_TENANT] if secret)
    # host_bytes: 8x what a tenant stores (PROMPTS * POOL_BLOCKS * ENTRY = 512 KiB), small so that
    # the tier's pages (its free list cycles through all of them) are all touched during warm-up.
    return (f'[daemon]\nhost = "{HOST}"\nmodels = ["{POOL_MODEL}"]\n{arena}'
            f"[pool]\nblock_size = {BLOCK}\nhost_bytes = {4 << 20}\npage_bytes = {ENTRY}\n"
            + (f"[tenants]\n{tenants}" if tenants else ""))


def _die_with_parent() -> None:  # preexec_fn: the child gets SIGKILL when this process ends
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent, **kwargs)


# -- the load -----------------------------------------------------------------------------------------
class Soak:
    def __init__(self, args, spec: CacheSpec):
        self.args, self.spec = args, spec
        self.nblk = args.tokens // BLOCK
        torch.manual_seed(0)
        self.src = PagedCache.allocate(spec, SRC_BLOCKS, BLOCK, num_slots=SRC_SLOTS, fill="randn")
        self.dst = PagedCache.allocate(spec, args.concurrency * self.nblk, BLOCK, num_slots=args.concurrency,
                                       fill="zeros")
        self.phase = "warmup"
        self.stopping = asyncio.Event()
        self.ok = collections.Counter()          # (phase, kind) -> requests served
        self.errors = collections.Counter()      # "kind:Error" -> count
        self.error_samples: dict[str, str] = {}  # first message of each (bounded by the kinds above)
        self.bytes = collections.Counter()       # verified / corrupted / lost
        self.seq = 0
        self._entries: dict[tuple, bytes] = {}   # tenant, prompt, block -> bytes (bounded: tenants * PROMPTS * blocks)

    def _fail(self, kind: str, exc: BaseException, lost: int) -> None:
        if isinstance(exc, asyncio.TimeoutError):
            name = f"SoakTimeout({TIMEOUT:g}s)"
        else:
            name = type(exc).__name__
            if isinstance(exc, LoadFailed):
                name += "(" + ",".join(sorted({type(c).__name__ for c in exc.causes.values()})) + ")"
            if not isinstance(exc, KvlinkError):
                name = "NOT-A-KVLINK-ERROR:" + name
        key = f"{kind}:{name}"
        self.errors[key] += 1
        self.error_samples.setdefault(key, str(exc)[:300])
        self.bytes["lost"] += lost

    def _count(self, kind: str) -> None:
        self.ok[(self.phase, kind)] += 1

    # engine: prefill -> decode -----------------------------------------------------------------
    async def engine_worker(self, w: int, prefill: PrefillSide, decode: DecodeSide, addr) -> None:
        dst_ids = list(range(w * self.nblk, (w + 1) * self.nblk))
        while not self.stopping.is_set():
            self.seq += 1
            rng = random.Random(self.seq)
            src_ref = CacheRef(rng.sample(range(SRC_BLOCKS), self.nblk), self.args.tokens, rng.randrange(SRC_SLOTS))
            dst_ref = CacheRef(dst_ids, self.args.tokens, w)
            self._compare(src_ref, dst_ref, zero=True)
            rid = f"soak-{os.getpid()}-{self.seq}"
            try:
                await asyncio.wait_for(self._engine_request(rid, prefill, decode, addr, src_ref, dst_ref), TIMEOUT)
            except Exception as exc:  # counted and classified, never fatal
                self._fail("engine", exc, self.request_bytes)
                await asyncio.sleep(0.01)  # keep a failing peer from turning this into a busy loop
                continue
            good, bad = self._compare(src_ref, dst_ref)
            self.bytes["verified"] += good
            self.bytes["corrupted"] += bad
            if bad:
                self.errors["engine:CORRUPTED"] += 1
            else:
                self._count("engine")

    async def _engine_request(self, rid, prefill, decode, addr, src_ref, dst_ref) -> None:
        decode.start_load(rid, dst_ref, timeout=TIMEOUT)
        try:
            await prefill.begin(rid, src_ref, addr)
            for layer in range(self.spec.num_layers):
                prefill.save_layer(rid, layer)
            await prefill.finish(rid, timeout=TIMEOUT)
            await decode.wait_all(rid)
        finally:
            decode.release(rid)
            await prefill.abort(rid)  # a no-op once finished

    def _compare(self, src_ref: CacheRef, dst_ref: CacheRef, zero: bool = False) -> tuple[int, int]:
        """Bytes equal / different between the request's source and destination (or zero the latter)."""
        good = bad = 0
        si, di = torch.tensor(list(src_ref.block_ids)), torch.tensor(list(dst_ref.block_ids))
        for layer in range(self.spec.num_layers):
            pairs = [(a[src_ref.state_slot], b, (dst_ref.state_slot,))
                     for (_, a), (_, b) in zip(self.src.states(layer), self.dst.states(layer))]
            pairs += [(a[si], b, (di,)) for (_, a), (_, b) in zip(self.src.planes(layer), self.dst.planes(layer))]
            for want, pool, index in pairs:
                if zero:
                    pool[index] = 0
                    continue
                x, y = want.contiguous().view(torch.uint8), pool[index].contiguous().view(torch.uint8)
                same = int((x == y).sum())
                good, bad = good + same, bad + x.numel() - same
        return good, bad

    @property
    def request_bytes(self) -> int:
        return self.spec.bytes_at(self.args.tokens)

    # pool daemon: put / lookup / get per tenant ------------------------------------------------
    def entry(self, tenant: str, prompt: int, block: int) -> bytes:
        key = (tenant, prompt, block)
        if key not in self._entries:
            self._entries[key] = random.Random(f"{tenant}/{prompt}/{block}").randbytes(ENTRY)
        return self._entries[key]

    async def pool_worker(self, w: int, client: PoolClient, tenant: str, salt: int) -> None:
        rng = random.Random(w)
        while not self.stopping.is_set():
            prompt = rng.randrange(PROMPTS)
            tokens = [(prompt * 7919 + salt * 104729 + i * 31) % 50000 for i in range(POOL_BLOCKS * BLOCK)]
            step = "put"
            try:
                stored = await asyncio.wait_for(client.put(tokens, {(FULL, b): self.entry(tenant, prompt, b)
                                                                    for b in range(POOL_BLOCKS)}), TIMEOUT)
                self._count("pool_put")
                if getattr(stored, "failed", 0):
                    self.errors["pool_put:STORE-FAILED"] += 1
                    self.error_samples.setdefault("pool_put:STORE-FAILED", str(stored.errors)[:300])
                step = "lookup"
                hit = await asyncio.wait_for(client.lookup(tokens), TIMEOUT)
                self._count("pool_lookup")
                if hit.tokens != len(tokens):
                    self.errors["pool_lookup:MISS-AFTER-PUT"] += 1
                    self.error_samples.setdefault("pool_lookup:MISS-AFTER-PUT", hit.stopped)
                    continue
                step = "get"
                got = await asyncio.wait_for(client.get(hit), TIMEOUT)
                with got:
                    for b, key in enumerate(hit.full):
                        data, want = bytes(got[(FULL, key)]), self.entry(tenant, prompt, b)
                        if data == want:
                            self.bytes["verified"] += len(want)
                        else:
                            self.bytes["corrupted"] += len(want)
                            self.errors["pool_get:CORRUPTED"] += 1
                self._count("pool_get")
            except Exception as exc:  # counted and classified, never fatal
                self._fail(f"pool_{step}", exc, ENTRY * POOL_BLOCKS if step != "lookup" else 0)
                await asyncio.sleep(0.01)

    # phases -------------------------------------------------------------------------------------
    async def run(self, ports: dict, start_hostile, stop_hostile, t0: float) -> dict:
        """Set up, run the phases (timed from the end of set-up), wind down; returns phases
        ``{name: (began, ended)}`` in seconds since ``t0`` and the hostile peer's counters."""
        decode = DecodeSide(self.dst, begin_timeout=TIMEOUT)
        prefill = PrefillSide(self.src, transport=TransportConfig(connections=2))
        addr = await decode.start(HOST, 0)
        ports["decode_port"] = addr[1]
        clients = [tenant_client(name, secret, ports) for name, secret in TENANTS]
        for c in clients:
            await c.connect()
        isolated = all(secret for _, secret in TENANTS)
        n = self.args.concurrency
        tasks = [asyncio.create_task(self.engine_worker(w, prefill, decode, addr)) for w in range(n)]
        for w in range(n):
            t = w % len(TENANTS)
            tasks.append(asyncio.create_task(self.pool_worker(w, clients[t], TENANTS[t][0], 0 if isolated else t)))
        total = self.args.minutes * 60
        warm = min(15.0, 0.1 * total)
        schedule = [("warmup", warm), ("calm", warm + 0.3 * (total - warm)), ("hostile", total)]
        if not self.args.hostile:
            schedule = [("warmup", warm), ("calm", total)]
        start = time.monotonic() - t0
        phases = {}
        try:
            for name, until in schedule:
                self.phase = name
                until += start
                began = time.monotonic() - t0
                if name == "hostile":
                    await asyncio.to_thread(start_hostile)
                while (now := time.monotonic() - t0) < until:
                    await asyncio.sleep(min(10.0, until - now))
                    self._progress(time.monotonic() - t0)
                phases[name] = (began, time.monotonic() - t0)
        finally:
            self.stopping.set()
            done, pending = await asyncio.wait(tasks, timeout=TIMEOUT + 5)
            for task in pending:
                task.cancel()
            hostile = await asyncio.to_thread(stop_hostile)
            for c in clients:
                await asyncio.wait_for(c.close(), 10)
            await asyncio.wait_for(prefill.close(), 10)
            await asyncio.wait_for(decode.close(), 10)
        return {"phases": phases, "hostile_peer": hostile, "stuck_workers": len(pending)}

    def _progress(self, now: float) -> None:
        served = sum(self.ok.values())
        print(f"[{now:6.1f}s] {self.phase}: {served} served, {sum(self.errors.values())} errors",
              file=sys.stderr, flush=True)


# -- orchestration -------------------------------------------------------------------------------------
def start_daemon(workdir: str) -> tuple[subprocess.Popen, dict]:
    cfg = os.path.join(workdir, "pool.toml")
    with open(cfg, "w") as f:
        f.write(daemon_config())
    with open(os.path.join(workdir, "daemon.log"), "wb") as log:  # its stderr: sized up in the report
        proc = spawn([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", cfg, "--http-port", "0",
                      "--data-port", "0"], stderr=log)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"pool daemon did not start (exit {proc.wait()})")
    return proc, json.loads(line)


def report(result: dict, args) -> dict:
    ok, phases = result["ok"], result["phases"]
    served = collections.Counter()
    for (_, kind), n in ok.items():
        served[kind] += n
    rates = {}
    for name, (began, ended) in phases.items():
        n = sum(v for (p, _), v in ok.items() if p == name)
        rates[name] = round(n / max(ended - began, 1e-9), 2)
    ratio = round(rates["hostile"] / rates["calm"], 3) if rates.get("calm") and "hostile" in rates else None
    total = sum(served.values())
    target = round(50000 * args.minutes / 10)
    memory = result["processes"]
    flat = all(m["flat"] for name, p in memory.items() if name != HOSTILE_LABEL for k, m in p.items() if k in FLAT)
    verdict = {"requests": total >= target, "no_lost_or_corrupted": not result["bytes"].get("lost")
               and not result["bytes"].get("corrupted") and not result["errors"],
               "flat": flat, "hostile_cost_below_10pct": ratio is None or ratio >= 0.9}
    return {"minutes": args.minutes, "concurrency": args.concurrency, "model": args.model, "tokens": args.tokens,
            "hostile": args.hostile, "served": dict(served), "served_total": total, "target_requests": target,
            "requests_per_s": rates, "hostile_throughput_ratio": ratio,
            "bytes": dict(result["bytes"]), "errors": dict(result["errors"]), "error_samples": result["error_samples"],
            "processes": memory, "hostile_peer": result["hostile_peer"], "stuck_workers": result["stuck_workers"],
            "daemon_log": result["daemon_log"],
            "phases_s": {k: [round(a, 1), round(b, 1)] for k, (a, b) in phases.items()},
            "verdict": verdict, "pass": all(verdict.values())}


def render(s: dict) -> str:
    lines = [f"soak: {s['minutes']} min, concurrency {s['concurrency']}, model {s['model']} ({s['tokens']} tokens), "
             f"hostile {'on' if s['hostile'] else 'off'}",
             f"served {s['served_total']} (target {s['target_requests']}): "
             + ", ".join(f"{k} {v}" for k, v in sorted(s["served"].items())),
             "requests/s by phase: " + ", ".join(f"{k} {v}" for k, v in s["requests_per_s"].items())
             + f"; hostile/calm {s['hostile_throughput_ratio']}",
             "bytes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["bytes"].items()))]
    for key, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  error {key}: {n}  e.g. {s['error_samples'].get(key, '')[:160]}")
    for proc, metrics in s["processes"].items():
        lines.append(f"{proc}: cpu {metrics['cpu_s']} s; " + "; ".join(
            f"{m} {v['first']:.4g}->{v['last']:.4g} (max {v['max']:.4g}, {v['slope_per_min']:+.3g}/min, "
            f"{'flat' if v['flat'] else 'GROWING'})" for m, v in metrics.items() if m in FLAT and v["first"] is not None))
        lines.append("  rss MiB every 10 s: " + " ".join(f"{rss:g}" for _, rss, _, _ in metrics["series"]))
    lines.append(f"hostile peer: {s['hostile_peer']}")
    log = s["daemon_log"]
    lines.append(f"daemon stderr: {log['bytes']} bytes, {log['lines']} lines, {log['tracebacks']} tracebacks")
    lines += [f"  {n} x {line}" for line, n in log["top_errors"].items()]
    lines.append("verdict: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in s["verdict"].items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8, help="engine requests in flight (and pool workers)")
    parser.add_argument("--model", default="soak-tiny", choices=["soak-tiny", *PRESETS])
    parser.add_argument("--tokens", type=int, default=64, help="prompt tokens per engine request (whole blocks)")
    parser.add_argument("--hostile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.tokens <= 0 or args.tokens % BLOCK or args.concurrency <= 0 or args.minutes <= 0:
        parser.error(f"--tokens must be a positive multiple of {BLOCK}; --concurrency and --minutes positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the finally below stops the children
    children: list[subprocess.Popen] = []
    hostile: list[subprocess.Popen] = []
    deadline = args.minutes * 60 + 3 * TIMEOUT + 60
    # The script stops by itself: should the run hang past its deadline, kill the children and leave.
    watchdog = threading.Timer(deadline, lambda: (_kill(children + hostile), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    with tempfile.TemporaryDirectory(prefix="kvlink-soak-") as workdir:
        try:
            daemon, ports = start_daemon(workdir)
            children.append(daemon)
            pids = {"engine (prefill+decode+pool clients)": os.getpid(), "pool daemon": daemon.pid}
            if args.hostile:  # started now, told its targets later: its start-up is not measured
                hostile.append(spawn([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "soak_hostile.py")], stdin=subprocess.PIPE))
                hostile[0].stdout.readline()  # ready
                pids[HOSTILE_LABEL] = hostile[0].pid
            soak = Soak(args, model_spec(args.model))
            t0 = time.monotonic()
            sampler = Sampler(pids, t0)
            sampler.start()

            def start_hostile() -> None:
                targets = {**ports, "decode_fingerprint": soak.spec.fingerprint.hex(), "pool_model": POOL_MODEL,
                           "pool_fingerprint": get_preset(POOL_MODEL).fingerprint.hex(), "tokens": POOL_BLOCKS * BLOCK,
                           "tenant": HOSTILE_TENANT[0], "secret": HOSTILE_TENANT[1]}
                hostile[0].stdin.write(json.dumps(targets) + "\n")
                hostile[0].stdin.flush()
                hostile[0].stdout.readline()  # started

            def stop_hostile() -> dict | None:
                if not hostile:
                    return None
                proc = hostile[0]
                try:  # communicate() closes its stdin: the signal to stop and report
                    out, _ = proc.communicate(timeout=20)
                    return json.loads(out.strip().splitlines()[-1])
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    return {"error": "hostile peer did not report"}

            try:
                result = run_loop(soak.run(ports, start_hostile, stop_hostile, t0))
            except KvlinkError as exc:  # set-up (a request's failure is counted, never raised)
                raise SystemExit(f"soak: set-up failed: {exc!r}") from None
            end = time.monotonic() - t0
            sampler.stop.set()
            sampler.join()
            if daemon.poll() is not None:
                soak.errors[f"daemon:EXITED({daemon.returncode})"] += 1
            result["daemon_log"] = log_summary(os.path.join(workdir, "daemon.log"))
            result.update(ok=soak.ok, bytes=soak.bytes, errors=soak.errors, error_samples=soak.error_samples,
                          processes=sampler.summary(end))
        finally:
            _kill(children + hostile)
    summary = report(result, args)
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0 if summary["pass"] else 1


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
