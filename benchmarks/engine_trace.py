"""Engine trace replay: the Mooncake conversation trace against real vLLM (CPU build) servers,
one server doing prefill and decode (the same-run baseline) vs P/D with ``KvlinkConnector``.

    python benchmarks/engine_trace.py [--model llama|qwen3_next] [--requests 12] [--max-input 3000]
        [--max-output 16] [--time-scale S] [--prefix-caching] [--out PATH] [--plot PATH] [--json]

Run it with the main venv's python; vLLM runs from its own venv (``KVLINK_VLLM_PYTHON`` or
``.venv-vllm``, see ``tests/integration/vllm_harness.py``), on tiny random-weight models built there.

- Prompts: the first ``--requests`` lines of ``../shared/traces/mooncake-conversation.jsonl``. Each
  hash id is one fixed pseudo-random block of 512 token ids in [3, 500) seeded by the id, so equal
  hash ids give equal blocks and the trace's shared prefixes stay shared; the prompt is cut to
  ``min(input_length, --max-input)`` tokens (the tiny models allow 4096). Output tokens:
  ``min(output_length, --max-output)``, greedy, ``ignore_eos``.
- Arrivals: by default one request at a time in trace order (concurrency 1: TTFT then measures the
  path, not queueing). ``--time-scale S`` sends each request at ``timestamp * S`` ms after the start
  instead (open loop, one thread per request in flight).
- Baseline: ONE vLLM server, no connector, pinned to cpu 0. P/D: a prefill server (cpu 0) and a
  decode server (cpu 1) with ``KvlinkConnector``, behind ``kvlink proxy``; they run one after the
  other, never at once. vLLM's prefix caching is off on all servers unless ``--prefix-caching``
  (then on for the baseline, and for the prefill server unless ``--pool``; the decode server keeps
  it off, as a local hit there makes it compute rather than load). One unmeasured warm-up request
  per setup.
- Measured per request: TTFT (``stream=True``; time to the first SSE chunk carrying a token) and
  total latency; mean/p50/p90 TTFT, output tokens/s over the replay, bytes moved (the decode log's
  ``loaded tokens [a, b) (N bytes`` lines matched by request id, the prefill log's ``sent (N bytes)``
  summed), routes (proxy ``GET /stats``), and whether baseline and P/D generated the same token ids.
- ``--pool``: the P/D pair shares a ``kvlink pool serve`` daemon (block 512, the trace's): the
  decode server stores each finished request, the prefill server restores a pooled prefix instead
  of recomputing it and sends only the rest; reports pool hits and the share of prompt tokens
  restored.
- ``--lab auto|on|off`` (auto: when root): the decode server runs in a network namespace behind a
  veth pair shaped by ``tc tbf`` to ``--lab-rate`` (default 1gbit), the prefill server, proxy,
  baseline and client in the other (kvlink's link lab); the cache crosses the shaped link, with
  ``KVLINK_SECRET`` set on both servers. Otherwise everything runs over loopback.

JSON goes to stdout with ``--json`` and always to ``--out`` (default under /tmp, not the repo); a
PNG of per-request TTFT with and without kvlink to ``--plot``. Ports: ``--port-base`` .. +40 for
HTTP, ``--kv-port`` for the decode server's kvlink receiver.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.integration.vllm_harness import VllmHarnessError, build_tiny_model, start_server  # noqa: E402

TRACE = REPO.parent / "shared" / "traces" / "mooncake-conversation.jsonl"
BLOCK = 512
LOADED = re.compile(r"kvlink: request (\S+) loaded tokens \[(\d+), (\d+)\) \((\d+) bytes")
SENT = re.compile(r"kvlink: request (\S+) sent \((\d+) bytes\)")
RESTORED = re.compile(r"kvlink: request \S+ restored (\d+) tokens from the pool")


# ---------------------------------------------------------------- workload

def block_tokens(hash_id: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(3, 500) for _ in range(BLOCK)]


def load_trace(path: Path, count: int, max_input: int, max_output: int) -> list[dict]:
    """The first ``count`` requests as ``{index, at_ms, prompt, max_tokens, hash_ids}``."""
    out = []
    with open(path) as fh:
        for i, line in zip(range(count), fh):
            rec = json.loads(line)
            n = min(int(rec["input_length"]), max_input)
            prompt = [t for h in rec["hash_ids"][: -(-n // BLOCK)] for t in block_tokens(h)][:n]
            out.append({"index": i, "at_ms": float(rec["timestamp"]), "prompt": prompt,
                        "max_tokens": max(1, min(int(rec["output_length"]), max_output)),
                        "hash_ids": rec["hash_ids"][: -(-n // BLOCK)]})
    return out


# ---------------------------------------------------------------- client

def stream_completion(port: int, prompt: list[int], max_tokens: int, timeout: float = 600.0) -> dict:
    """One streamed greedy completion: TTFT, latency, token ids, response id, proxy route."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "return_token_ids": True, "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    ttft, tokens, rid = None, [], None
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise VllmHarnessError(f"port {port}: HTTP {resp.status}: {resp.read()[:2000]!r}")
        route = resp.getheader("X-Kvlink-Route")
        for raw in resp:  # SSE: "data: {...}" lines, blank separators, "data: [DONE]"
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            rid = rid or chunk.get("id")
            for choice in chunk.get("choices", []):
                new = choice.get("token_ids") or []
                if new and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens += new
    finally:
        conn.close()
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "token_ids": tokens, "id": rid,
            "route": route}


def replay(port: int, reqs: list[dict], time_scale: float | None) -> tuple[list[dict], float]:
    """Send ``reqs``; return per-request results (trace order) and the replay's wall time."""
    results: list[dict | None] = [None] * len(reqs)
    errors: list[BaseException] = []
    t0 = time.perf_counter()
    if time_scale is None:
        for i, r in enumerate(reqs):
            results[i] = stream_completion(port, r["prompt"], r["max_tokens"])
    else:
        def one(i: int, r: dict) -> None:
            try:
                results[i] = stream_completion(port, r["prompt"], r["max_tokens"])
            except BaseException as exc:  # surfaced after join
                errors.append(exc)

        threads = []
        for i, r in enumerate(reqs):
            # Open-loop arrivals: waiting for a trace timestamp is the workload, not synchronisation.
            delay = t0 + r["at_ms"] * time_scale / 1000 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            threads.append(threading.Thread(target=one, args=(i, r), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    return results, time.perf_counter() - t0


def get_json(port: int, path: str, host: str = "127.0.0.1") -> dict:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def wait_http(port: int, proc: subprocess.Popen, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Poll ``GET /health`` (a readiness probe) until 200 or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VllmHarnessError(f"process on port {port} exited with {proc.returncode}")
        try:
            get_json(port, "/health", host)
            return
        except (urllib.error.URLError, OSError):
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    raise VllmHarnessError(f"port {port} not ready after {timeout}s")


# ---------------------------------------------------------------- setups

def warmup(port: int) -> dict:
    rng = random.Random(-1)
    return stream_completion(port, [rng.randrange(3, 500) for _ in range(64)], 2)


def kv_config(role: str, extra: dict) -> dict:
    return {"kv_connector": "KvlinkConnector", "kv_connector_module_path": "kvlink.engine.vllm.connector",
            "kv_role": role, "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def run_baseline(model: Path, reqs: list[dict], args, logs: Path) -> dict:
    extra = [] if args.prefix_caching else ["--no-enable-prefix-caching"]
    server = start_server(model, args.port_base + 10, kv_config=None, cpu=0, extra_args=extra,
                          log_path=logs / "baseline.log")
    try:
        server.wait_ready(600)
        warmup(server.port)
        results, wall = replay(server.port, reqs, args.time_scale)
    finally:
        server.stop()
    return {"results": results, "wall_s": wall}


def run_pd(model: Path, reqs: list[dict], args, logs: Path) -> dict:
    p_port, d_port, x_port = args.port_base + 20, args.port_base + 30, args.port_base
    lab = json.loads(args.in_lab) if args.in_lab else None
    d_host, p_host = (lab["addr_b"], lab["addr_a"]) if lab else ("127.0.0.1", "127.0.0.1")
    wrap = ["ip", "netns", "exec", lab["ns_b"]] if lab else []
    env = {"KVLINK_SECRET": lab["secret"]} if lab else None
    # With the pool, the prefill server's own prefix hits would hide it (a vLLM hit comes first).
    p_extra = [] if args.prefix_caching and not args.pool else ["--no-enable-prefix-caching"]
    p_kv, d_kv = {}, {"listen": f"{d_host}:{args.kv_port}"}
    if args.pool:
        p_kv = {"pool": f"{p_host}:{args.port_base + 38}:{args.port_base + 39}"}
        d_kv.update(p_kv, spec_file=str(logs / "spec.json"))
    prefill = start_server(model, p_port, kv_config=kv_config("kv_producer", p_kv), cpu=0,
                           extra_args=p_extra, log_path=logs / "prefill.log", env_extra=env)
    decode = start_server(model, d_port, kv_config=kv_config("kv_consumer", d_kv), cpu=1,
                          extra_args=["--no-enable-prefix-caching"], log_path=logs / "decode.log", env_extra=env,
                          host=d_host, wrap=wrap)
    proxy = daemon = None
    kvlink = str(Path(sys.executable).with_name("kvlink"))
    try:
        prefill.wait_ready(600)
        decode.wait_ready(600)
        if args.pool:  # the decode server wrote its layout: the daemon serves it
            (logs / "pool.toml").write_text(f"[pool]\nblock_size = {args.pool_block}\n")
            with open(logs / "daemon.log", "wb") as fh:
                daemon = subprocess.Popen([kvlink, "pool", "serve", "--config", str(logs / "pool.toml"),
                                           "--host", p_host, "--http-port", str(args.port_base + 38), "--data-port",
                                           str(args.port_base + 39), "--spec", f"vllm-{args.model}={logs / 'spec.json'}"],
                                          stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
            wait_http(args.port_base + 38, daemon, host=p_host)
        with open(logs / "proxy.log", "wb") as fh:
            proxy = subprocess.Popen([kvlink, "proxy", "--prefill", f"http://127.0.0.1:{p_port}", "--decode",
                                      f"http://{d_host}:{d_port}={d_host}:{args.kv_port}", "--port", str(x_port)],
                                     stdout=fh, stderr=subprocess.STDOUT)
        wait_http(x_port, proxy)
        warm = warmup(x_port)
        before = get_json(x_port, "/stats")
        results, wall = replay(x_port, reqs, args.time_scale)
        after = get_json(x_port, "/stats")
    finally:
        for proc in (proxy, daemon):
            if proc is not None:
                proc.terminate()
                proc.wait()
        prefill.stop()
        decode.stop()
    routes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"results": results, "wall_s": wall, "routes": routes, "warmup_route": warm["route"]}


def attach_bytes(pd: dict, logs: Path) -> None:
    """Per-request loaded bytes from the decode log (vLLM's internal id is ``<response id>-<n>-<suffix>``)."""
    loaded = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in LOADED.finditer((logs / "decode.log").read_text(errors="replace"))}
    sent = [int(m[2]) for m in SENT.finditer((logs / "prefill.log").read_text(errors="replace"))]
    for r in pd["results"]:
        hits = [v for k, v in loaded.items() if r["id"] and k.startswith(r["id"] + "-")]
        r["loaded_tokens"] = sum(b - a for a, b, _ in hits)
        r["loaded_bytes"] = sum(n for _, _, n in hits)
    pd["bytes_loaded"] = sum(r["loaded_bytes"] for r in pd["results"])
    # The warm-up ran alone before the replay, so its send (if it went P/D) is the log's first.
    pd["bytes_sent"] = sum(sent[1:] if pd["warmup_route"] == "pd" else sent)
    restored = [int(m[1]) for m in RESTORED.finditer((logs / "prefill.log").read_text(errors="replace"))]
    pd["pool_tokens"] = sum(restored)
    pd["pool_hits"] = len(restored)


# ---------------------------------------------------------------- report

def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(run: dict) -> dict:
    ttft = [r["ttft_s"] for r in run["results"] if r["ttft_s"] is not None]
    out_tokens = sum(len(r["token_ids"]) for r in run["results"])
    return {"requests": len(run["results"]), "wall_s": run["wall_s"],
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
            "latency_mean_s": statistics.fmean(r["latency_s"] for r in run["results"]),
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / run["wall_s"]}


def plot(path: Path, reqs: list[dict], base: dict, pd: dict, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(reqs)))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [1000 * r["ttft_s"] for r in base["results"]], w, label="one server (no kvlink)")
    ax.bar([i + w / 2 for i in x], [1000 * r["ttft_s"] for r in pd["results"]], w, label="P/D with kvlink")
    ax.set_xticks(x, [f"{i}\n{len(r['prompt'])}" for i, r in zip(x, reqs)], fontsize=7)
    ax.set_xlabel("trace request (index / prompt tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"engine_trace: mooncake conversation, tiny {model}, vLLM CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_in_lab(args) -> int | None:
    """Re-run this script inside the link lab's first namespace (None: the lab cannot run here
    and ``--lab auto``: run on loopback). The decode server goes into the second namespace."""
    import secrets as _secrets

    from kvlink.config import parse_rate
    from kvlink.transport.lab import LinkLab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        if args.lab == "on":
            raise SystemExit(f"--lab on: {reason}")
        print(f"link lab unavailable ({reason}); loopback", file=sys.stderr)
        return None
    with LinkLab(parse_rate(args.lab_rate)) as lab:
        info = {"ns_b": lab.ns_b, "addr_a": lab.addr_a, "addr_b": lab.addr_b, "secret": _secrets.token_hex(16)}
        argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--in-lab", json.dumps(info)]
        return subprocess.run(lab.command("a", argv)).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("llama", "qwen3_next"), default="llama")
    parser.add_argument("--requests", "-k", type=int, default=12)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--max-input", type=int, default=3000)
    parser.add_argument("--max-output", type=int, default=16)
    parser.add_argument("--time-scale", type=float, default=None,
                        help="send at timestamp*S ms (open loop); default: one at a time in trace order")
    parser.add_argument("--prefix-caching", action="store_true", help="vLLM prefix caching on baseline + prefill")
    parser.add_argument("--pool", action="store_true",
                        help="P/D with a shared kvlink pool daemon: follow-up turns reuse the prefix")
    parser.add_argument("--pool-block", type=int, default=512,
                        help="the pool's block size: a multiple of vLLM's (llama 32; qwen3_next 160: use 640)")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/kvlink-engine-trace/models"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/kvlink-engine-trace/engine_trace.json"))
    parser.add_argument("--plot", type=Path, default=Path("/tmp/kvlink-engine-trace/engine_trace.png"))
    parser.add_argument("--port-base", type=int, default=8400)
    parser.add_argument("--kv-port", type=int, default=7400)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--lab", choices=("auto", "on", "off"), default="auto",
                        help="decode server behind kvlink's tbf-shaped netns link (auto: when root)")
    parser.add_argument("--lab-rate", default="1gbit")
    parser.add_argument("--in-lab", default=None, help=argparse.SUPPRESS)  # set by the lab's re-run of this script
    args = parser.parse_args()
    if args.in_lab is None and args.lab != "off":
        code = run_in_lab(args)
        if code is not None:
            return code

    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    reqs = load_trace(args.trace, args.requests, args.max_input, args.max_output)
    model = build_tiny_model(args.model, args.models_dir)
    base = run_baseline(model, reqs, args, logs)
    pd = run_pd(model, reqs, args, logs)
    attach_bytes(pd, logs)

    per_request = []
    for r, b, p in zip(reqs, base["results"], pd["results"]):
        per_request.append({"index": r["index"], "prompt_tokens": len(r["prompt"]), "max_tokens": r["max_tokens"],
                            "baseline_ttft_s": b["ttft_s"], "pd_ttft_s": p["ttft_s"],
                            "baseline_latency_s": b["latency_s"], "pd_latency_s": p["latency_s"],
                            "route": p["route"], "loaded_tokens": p["loaded_tokens"], "loaded_bytes": p["loaded_bytes"],
                            "same_tokens": b["token_ids"] == p["token_ids"]})
    sb, sp = summarize(base), summarize(pd)
    result = {
        "config": {"model": args.model, "requests": len(reqs), "max_input": args.max_input,
                   "max_output": args.max_output, "arrivals": "concurrency 1, trace order" if args.time_scale is None
                   else f"open loop, timestamp x {args.time_scale}", "prefix_caching": args.prefix_caching,
                   "pool": f"kvlink pool serve, block {args.pool_block}" if args.pool else None,
                   "link": f"netns veth, tbf {args.lab_rate}" if args.in_lab else "loopback",
                   "trace": str(args.trace)},
        "baseline": sb,
        "pd": {**sp, "routes": pd["routes"], "bytes_loaded": pd["bytes_loaded"], "bytes_sent": pd["bytes_sent"],
               "pool_hits": pd["pool_hits"], "pool_tokens": pd["pool_tokens"],
               "pool_token_hit_rate": pd["pool_tokens"] / max(1, sum(len(r["prompt"]) for r in reqs))},
        "ratios": {"ttft_mean_pd_vs_baseline": sp["ttft_mean_s"] / sb["ttft_mean_s"],
                   "ttft_p50_pd_vs_baseline": sp["ttft_p50_s"] / sb["ttft_p50_s"],
                   "throughput_pd_vs_baseline": sp["output_tokens_per_s"] / sb["output_tokens_per_s"]},
        "identical_tokens": sum(r["same_tokens"] for r in per_request),
        "requests": per_request,
    }
    args.out.write_text(json.dumps(result, indent=2))
    plot(args.plot, reqs, base, pd, args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: {len(reqs)} requests; identical tokens {result['identical_tokens']}/{len(reqs)}; "
              f"routes {pd['routes']}")
        for name, s in (("baseline", sb), ("P/D", sp)):
            print(f"  {name:8s} TTFT mean {1000 * s['ttft_mean_s']:.1f} ms p50 {1000 * s['ttft_p50_s']:.1f} "
                  f"p90 {1000 * s['ttft_p90_s']:.1f}; {s['output_tokens_per_s']:.1f} tok/s")
        print(f"  bytes loaded {pd['bytes_loaded']} sent {pd['bytes_sent']}; pool hits {pd['pool_hits']} "
              f"({pd['pool_tokens']} tokens); ratios {result['ratios']}")
        print(f"  JSON {args.out}  plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
