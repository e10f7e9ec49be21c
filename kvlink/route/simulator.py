"""Discrete-event simulation of a PD deployment, with or without a remote PrfaaS cluster.

Requests arrive (Poisson), are routed by incremental length against the threshold, wait in a
FIFO per prefill cluster, are prefilled (profile time), offloaded ones then cross the shared link
(processor sharing at the paced rate: every active transfer gets an equal share, the total never
above the rate), and finally wait for a decode slot (``BS_max`` per decode instance; a request
holds its slot for ``L_out * T_decode``, the per-token SLO). TTFT runs from arrival to admission
into a decode batch.

``simulate`` draws Poisson arrivals from a length distribution; ``run_requests`` replays given
requests (a trace, :mod:`kvlink.route.trace`), each with its own routing, prefill length, bytes to
ship and output length.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kvlink.errors import ConfigError
from kvlink.route.model import Deployment


@dataclass
class Request:
    rid: int
    arrival: float
    length: int              # tokens to prefill (the incremental length)
    remote: bool = False
    kv_bytes: float | None = None    # shipped if remote; None: ``dep.kv(length)``
    output_tokens: int | None = None  # None: ``dep.output_tokens``
    cached: int = 0          # prefix tokens already cached where it is prefilled
    prefill_start: float = 0.0
    prefill_end: float = 0.0
    transfer_end: float = 0.0
    admitted: float | None = None
    finished: float | None = None


class SharedLink:
    """Fluid processor-sharing link: ``rate_bps`` split equally among active transfers."""

    def __init__(self, rate_bps: float):
        self.rate = rate_bps
        self.active: dict[int, float] = {}  # request id -> bits left
        self.clock = 0.0
        self.bits_sent = 0.0
        self.max_total_rate = 0.0

    def advance(self, now: float) -> None:
        if self.active and now > self.clock:
            share = self.rate / len(self.active)
            for rid in self.active:
                self.active[rid] -= share * (now - self.clock)
            self.bits_sent += self.rate * (now - self.clock)
            self.max_total_rate = max(self.max_total_rate, share * len(self.active))
        self.clock = now

    def next_completion(self) -> tuple[float, int] | None:
        if not self.active:
            return None
        rid = min(self.active, key=self.active.get)
        return self.clock + max(0.0, self.active[rid]) * len(self.active) / self.rate, rid


@dataclass
class SimResult:
    name: str
    offered_rps: float
    threshold: float
    arrived: int
    finished: int
    throughput_rps: float
    ttft_mean: float
    ttft_p90: float
    ttfts: list = field(default_factory=list, repr=False)
    link_utilisation: float = 0.0
    link_peak_bps: float = 0.0
    egress_gbps: float = 0.0
    offloaded: float = 0.0
    link_bytes: float = 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "ttfts"}
        return {k: (round(v, 4) if np.isfinite(v) else None) if isinstance(v, float) else v for k, v in out.items()}


def prefill_time(profile, req: Request) -> float:
    """Seconds to prefill ``req.length`` new tokens after ``req.cached`` cached ones: the fixed
    cost once, the linear part for the new tokens, and attention of the new tokens over the whole
    context (``c * ((cached + new)^2 - cached^2)``)."""
    if not req.cached:
        return float(profile(req.length))
    return float(profile(req.cached + req.length) - profile(req.cached) + profile.a)


def simulate(name: str, dep: Deployment, dist, threshold: float, rate_rps: float, duration_s: float = 3000.0,
             seed: int = 0, pacing: float = 1.0) -> SimResult:
    """Run ``duration_s`` seconds of Poisson arrivals at ``rate_rps``, then drain every request.

    Throughput counts decode admissions over the arrival window; TTFT covers every request.
    """
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate_rps * duration_s)
    arrivals = np.sort(rng.uniform(0, duration_s, n))
    lengths = dist.sample(rng, n)
    remote = bool(dep.prfaas_instances)
    requests = [Request(i, float(t), int(length), remote and int(length) > threshold)
                for i, (t, length) in enumerate(zip(arrivals, lengths))]
    result = run_requests(name, dep, requests, duration_s, pacing)
    result.offered_rps, result.threshold = rate_rps, threshold
    return result


def run_requests(name: str, dep: Deployment, requests: list[Request], duration_s: float,
                 pacing: float = 1.0) -> SimResult:
    """Replay ``requests`` (routing already in ``Request.remote``) until every one is decoded.

    Throughput counts decode admissions up to ``duration_s``; TTFT covers every request. Raises
    :class:`ConfigError` when a request is routed to a PrfaaS cluster the deployment lacks.
    """
    n = len(requests)
    if not dep.prfaas_instances and any(r.remote for r in requests):
        raise ConfigError("a request is routed remotely but the deployment has no PrfaaS cluster")
    seq = itertools.count()
    events: list = [(req.arrival, next(seq), "arrive", req) for req in requests]
    heapq.heapify(events)
    free = {"remote": dep.prfaas_instances, "local": dep.local_prefill}
    queues = {"remote": deque(), "local": deque()}
    profiles = {"remote": dep.prfaas_profile, "local": dep.local_profile}
    slots = dep.local_decode * dep.decode_batch
    waiting: deque[Request] = deque()
    link = SharedLink(dep.link_bps * pacing) if dep.prfaas_instances else None
    link_event: tuple | None = None
    bits: dict[int, Request] = {}
    done: list[Request] = []

    def start_prefill(now: float, where: str) -> None:
        while free[where] and queues[where]:
            req = queues[where].popleft()
            free[where] -= 1
            req.prefill_start = now
            req.prefill_end = now + prefill_time(profiles[where], req)
            heapq.heappush(events, (req.prefill_end, next(seq), "prefilled", req))

    def admit(now: float) -> None:
        nonlocal slots
        while slots and waiting:
            req = waiting.popleft()
            slots -= 1
            req.admitted = now
            out = dep.output_tokens if req.output_tokens is None else req.output_tokens
            heapq.heappush(events, (now + out * dep.decode_step_s, next(seq), "decoded", req))

    def reschedule_link() -> None:
        nonlocal link_event
        nxt = link.next_completion()
        link_event = None if nxt is None else (nxt[0], next(seq), "sent", nxt[1])
        if link_event is not None:
            heapq.heappush(events, link_event)

    while events:
        now, key, kind, item = heapq.heappop(events)
        if kind == "sent":
            if link_event is None or key != link_event[1]:
                continue  # superseded by a later reschedule
            link.advance(now)
            req = bits.pop(item)
            del link.active[item]
            req.transfer_end = now
            waiting.append(req)
            admit(now)
            reschedule_link()
        elif kind == "arrive":
            req = item
            where = "remote" if req.remote else "local"
            queues[where].append(req)
            start_prefill(now, where)
        elif kind == "prefilled":
            req = item
            where = "remote" if req.remote else "local"
            free[where] += 1
            start_prefill(now, where)
            if req.remote:
                link.advance(now)
                size = dep.kv(req.length) if req.kv_bytes is None else req.kv_bytes
                link.active[req.rid] = float(size) * 8
                bits[req.rid] = req
                reschedule_link()
            else:
                req.transfer_end = now
                waiting.append(req)
                admit(now)
        else:  # decoded
            item.finished = now
            done.append(item)
            slots += 1
            admit(now)
    ttft = np.array([r.admitted - r.arrival for r in done]) if done else np.zeros(1)
    in_window = sum(1 for r in done if r.admitted <= duration_s)
    end = max((r.finished for r in done), default=duration_s)
    window = max(duration_s, 1e-9)
    result = SimResult(name, n / window, float("nan"), n, len(done), in_window / window, float(ttft.mean()),
                       float(np.percentile(ttft, 90)), ttft.tolist(),
                       offloaded=float(np.mean([r.remote for r in done])) if done else 0.0)
    if link is not None:
        result.link_utilisation = link.bits_sent / (link.rate * end)
        result.link_peak_bps = link.max_total_rate
        result.egress_gbps = link.bits_sent / end / 1e9
        result.link_bytes = link.bits_sent / 8
    return result
