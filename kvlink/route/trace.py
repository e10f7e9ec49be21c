"""Trace-driven runs of the PrfaaS deployment with a prefix cache pool per cluster.

A trace line (Mooncake format) gives the arrival time in ms, the prompt and output lengths and
one ``hash_id`` per 512-token block; equal ids at equal positions mean the same prefix, so the
ids are a chained block identity. Each cluster (``local`` PD, ``remote`` PrfaaS) has a
:class:`PrefixPool`, an LRU of block ids with a capacity in blocks.

Routing follows the router's bandwidth-scarce rule: the incremental length is the prompt minus
the prefix the *local* pool holds; above the threshold the request is prefilled remotely, from
whatever prefix the remote pool holds, and the link carries the cache the decode side lacks (the
fixed recurrent state plus KV of every token past the local hit). The decode side keeps what it
received, the remote side what it computed. Pools are consulted in arrival order (a
conversation's next turn arrives after its previous answer), so routing is a fast pre-pass and
the event simulation (:func:`kvlink.route.simulator.run_requests`) replays its outcome.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kvlink.errors import ConfigError
from kvlink.route import cases
from kvlink.route import hardware as hw
from kvlink.route.model import Deployment, best_split
from kvlink.route.profiles import Empirical
from kvlink.route.simulator import Request, run_requests

BLOCK_TOKENS = 512
MAX_REQUESTS = 1_000_000  # bound on lines read from one trace


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str | Path, limit: int = MAX_REQUESTS) -> list[TraceRequest]:
    """Read a Mooncake-format JSONL trace (at most ``limit`` requests), sorted by arrival.

    Raises :class:`ConfigError` naming the file and line when it is missing or malformed.
    """
    out = []
    try:
        with open(path) as fh:
            for number, line in enumerate(fh, 1):
                if len(out) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    req = TraceRequest(float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                                       int(row["output_length"]), tuple(int(h) for h in row["hash_ids"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{path}:{number}: malformed trace line ({exc!r})") from exc
                if req.input_length < 1 or req.output_length < 0 or req.arrival_s < 0:
                    raise ConfigError(f"{path}:{number}: negative or empty lengths or time")
                out.append(req)
    except OSError as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    if not out:
        raise ConfigError(f"{path}: no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


class PrefixPool:
    """LRU set of block ids holding at most ``capacity`` blocks (0: no pool); a negative capacity
    raises :class:`ConfigError`."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ConfigError("pool capacity must be >= 0 blocks")
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def lookup(self, hash_ids) -> int:
        """Blocks of the longest cached prefix of ``hash_ids``; refreshes them as recently used."""
        hit = 0
        for block in hash_ids:
            if block not in self._blocks:
                break
            self._blocks.move_to_end(block)
            hit += 1
        return hit

    def insert(self, hash_ids) -> None:
        """Store every block of a prefilled (or received) prompt, evicting least recently used."""
        if not self.capacity:
            return
        for block in hash_ids:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


@dataclass
class Routed:
    """Outcome of the routing pre-pass for one trace."""

    remote: np.ndarray          # bool per request
    incremental: np.ndarray     # tokens prefilled
    cached: np.ndarray          # prefix tokens the prefilling cluster's pool held
    local_cached: np.ndarray    # prefix tokens the local (decode-side) pool held
    shipped_bytes: np.ndarray   # cache bytes over the inter-DC link (0 for local requests)


def route(trace: list[TraceRequest], threshold: float, pool_blocks: int, kv, remote_enabled: bool = True,
          block_tokens: int = BLOCK_TOKENS) -> Routed:
    """Route every request in arrival order through fresh pools of ``pool_blocks`` blocks each."""
    pools = {"local": PrefixPool(pool_blocks), "remote": PrefixPool(pool_blocks)}
    n = len(trace)
    remote = np.zeros(n, bool)
    inc, cached, local_cached = (np.zeros(n, np.int64) for _ in range(3))
    shipped = np.zeros(n)
    for i, req in enumerate(trace):
        hit_local = min(pools["local"].lookup(req.hash_ids) * block_tokens, req.input_length)
        local_cached[i] = hit_local
        if remote_enabled and req.input_length - hit_local > threshold:
            remote[i] = True
            hit = min(pools["remote"].lookup(req.hash_ids) * block_tokens, req.input_length)
            # the decode side needs the whole state plus the KV of every token it does not hold
            shipped[i] = float(kv(req.input_length - hit_local))
            pools["remote"].insert(req.hash_ids)
        else:
            hit = hit_local
        cached[i] = hit
        inc[i] = max(req.input_length - hit, 1)  # a fully cached prompt still computes its last token
        pools["local"].insert(req.hash_ids)
    return Routed(remote, inc, cached, local_cached, shipped)


def quantiles(lengths, points: int = 2000) -> Empirical:
    """A compact distribution of ``lengths`` (``points`` quantiles) for the model's solvers."""
    values = np.asarray(lengths, float)
    return Empirical(np.quantile(values, np.linspace(0, 1, min(points, values.size))))


def trace_deployment(trace: list[TraceRequest], inputs: str) -> tuple[Deployment, int]:
    """The case's PrfaaS-PD deployment with the trace's output length (and, for independent
    inputs, ``BS_max`` recomputed for the trace's lengths)."""
    dep, local = cases.deployments(inputs)["prfaas"]
    out_tokens = max(1, round(float(np.mean([r.output_length for r in trace]))))
    dep = replace(dep, output_tokens=out_tokens)
    if inputs == "independent":
        dist = quantiles([r.input_length for r in trace])
        bound = hw.decode_batch(hw.H20, hw.GPUS_PER_INSTANCE, cases.MODEL, cases.KV, dist, cases.T_DECODE,
                                out_tokens)
        dep = replace(dep, decode_batch=bound.batch)
    return dep, local


def _run(name: str, trace, dep: Deployment, local: int, pool_blocks: int, speedup: float, lengths) -> dict:
    """Solve split and threshold over ``lengths``, route, simulate; the figures of one run."""
    dep, model = best_split(quantiles(lengths), dep, local)
    threshold = model.threshold if np.isfinite(model.threshold) else float("inf")
    routed = route(trace, threshold, pool_blocks, dep.kv, bool(dep.prfaas_instances))
    requests = [Request(i, r.arrival_s / speedup, int(routed.incremental[i]), bool(routed.remote[i]),
                        kv_bytes=float(routed.shipped_bytes[i]), output_tokens=r.output_length,
                        cached=int(routed.cached[i]))
                for i, r in enumerate(trace)]
    duration = max(trace[-1].arrival_s / speedup, 1e-9)
    sim = run_requests(name, dep, requests, duration)
    inputs = np.array([r.input_length for r in trace], float)
    rem = routed.remote
    return {
        "split": f"{dep.prfaas_instances} PrfaaS / {dep.local_prefill} P / {dep.local_decode} D",
        "decode_batch": dep.decode_batch, "threshold": None if not np.isfinite(threshold) else threshold,
        "model_lambda_max": round(model.lambda_max, 4),
        "offloaded": round(float(rem.mean()), 4),
        "hit_rate_local": round(float(routed.local_cached.sum() / inputs.sum()), 4),
        "hit_rate_remote": round(float(routed.cached[rem].sum() / inputs[rem].sum()), 4) if rem.any() else None,
        "mean_input": round(float(inputs.mean()), 1),
        "mean_incremental": round(float(routed.incremental.mean()), 1),
        "mean_incremental_offloaded": round(float(routed.incremental[rem].mean()), 1) if rem.any() else None,
        "link_gb": round(float(routed.shipped_bytes.sum()) / 1e9, 3),
        "link_gb_simulated": round(sim.link_bytes / 1e9, 3),
        "sim": sim.as_dict(),
    }


def run_trace(path: str | Path, pool_blocks: int = 65536, speedup: float = 1.0, inputs: str = "independent",
              limit: int = MAX_REQUESTS) -> dict:
    """The PrfaaS-PD deployment driven by a trace, without and with per-cluster prefix pools.

    Without pools the split and threshold are solved over the prompt lengths; with pools over the
    incremental lengths a first routing pass (at the no-pool threshold) observes, as the
    scheduler would online. Raises :class:`ConfigError` for bad arguments or a bad trace.
    """
    if speedup <= 0 or pool_blocks < 0:
        raise ConfigError("need speedup > 0 and pool_blocks >= 0")
    started = time.monotonic()
    trace = load_trace(path, limit)
    dep, local = trace_deployment(trace, inputs)
    prompts = [r.input_length for r in trace]
    no_pool = _run("no pool", trace, dep, local, 0, speedup, prompts)
    first = route(trace, no_pool["threshold"] or float("inf"), pool_blocks, dep.kv)
    pooled = _run("pool", trace, dep, local, pool_blocks, speedup, first.incremental)
    return {"trace": str(path), "requests": len(trace), "span_s": trace[-1].arrival_s, "speedup": speedup,
            "offered_rps": len(trace) / max(trace[-1].arrival_s / speedup, 1e-9), "inputs": inputs,
            "pool_blocks": pool_blocks, "block_tokens": BLOCK_TOKENS, "output_tokens_mean": dep.output_tokens,
            "runs": {"no_pool": no_pool, "pool": pooled}, "elapsed_s": round(time.monotonic() - started, 2)}


def render_trace(result: dict) -> str:
    """The two runs side by side."""
    runs = result["runs"]
    rows = [f"trace {result['trace']}: {result['requests']} requests over {result['span_s']:.0f} s, speedup "
            f"x{result['speedup']:g} ({result['offered_rps']:.2f} req/s offered), inputs {result['inputs']}, "
            f"pool {result['pool_blocks']} blocks of {result['block_tokens']} tokens per cluster",
            f"{'figure':<36}{'no pool':>24}{'pool':>24}"]

    def fmt(v) -> str:
        if v is None:
            return "-"
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"

    for key, label in (("split", "split (searched)"), ("decode_batch", "BS_max"), ("threshold", "threshold (tokens)"),
                       ("model_lambda_max", "model Lambda_max (req/s)"), ("offloaded", "requests offloaded"),
                       ("hit_rate_local", "local pool token hit rate"), ("hit_rate_remote", "remote pool hit rate"),
                       ("mean_input", "mean prompt (tokens)"), ("mean_incremental", "mean incremental (tokens)"),
                       ("mean_incremental_offloaded", "mean incremental offloaded"),
                       ("link_gb", "inter-DC link (GB)")):
        rows.append(f"{label:<36}{fmt(runs['no_pool'][key]):>24}{fmt(runs['pool'][key]):>24}")
    for key, label in (("ttft_mean", "TTFT mean (s)"), ("ttft_p90", "TTFT P90 (s)"),
                       ("throughput_rps", "throughput (req/s)"), ("egress_gbps", "mean egress (Gbps)")):
        rows.append(f"{label:<36}{fmt(runs['no_pool']['sim'][key]):>24}{fmt(runs['pool']['sim'][key]):>24}")
    rows.append(f"simulated in {result['elapsed_s']:.1f} s")
    return "\n".join(rows)
