"""Bandwidth-aware scheduling: keep the threshold where both prefill paths saturate together
while the link stays below congestion, and re-balance the local prefill/decode split.

``tick`` reads the transport's :class:`~kvlink.transport.LinkSnapshot` and the queue depths. The
threshold is re-solved over the incremental lengths observed lately (a bounded window) when link
utilisation nears its limit or a queue surges, and at least every ``resolve_every`` seconds; the
split is re-searched every ``rebalance_every`` seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from kvlink.route.model import Deployment, Throughput, best_split, solve_threshold
from kvlink.route.profiles import Empirical
from kvlink.route.router import Router


@dataclass(frozen=True)
class SchedulerConfig:
    utilisation_limit: float = 0.8     # keep the link's load under this share of what it offers
    abundant_below: float = 0.5        # utilisation under which bandwidth counts as abundant
    queue_surge: int = 32              # a prefill queue this deep triggers a re-solve
    window: int = 4096                 # incremental lengths remembered
    min_samples: int = 64
    resolve_every: float = 30.0
    rebalance_every: float = 600.0


class Scheduler:
    """Owns the router's threshold and the deployment's split; call :meth:`observe` per request
    and :meth:`tick` periodically."""

    def __init__(self, deployment: Deployment, local_instances: int, router: Router,
                 config: SchedulerConfig | None = None):
        self.deployment = deployment
        self.local_instances = local_instances
        self.router = router
        self.config = config or SchedulerConfig()
        self.lengths: deque[int] = deque(maxlen=self.config.window)
        self.last_solve = self.last_rebalance = float("-inf")
        self.last: Throughput | None = None
        self.snapshot = None
        self.log: deque[str] = deque(maxlen=256)

    @property
    def bandwidth_abundant(self) -> bool:
        """What the router should assume: the link's last reported utilisation is low enough that
        cross-cluster cache transfers fit (False until a snapshot arrived)."""
        snap = self.snapshot
        return snap is not None and snap.utilisation < self.config.abundant_below

    def observe(self, incremental_length: int) -> None:
        self.lengths.append(int(incremental_length))

    def tick(self, now: float, snapshot=None, queues: dict[str, int] | None = None) -> list[str]:
        """Re-solve/re-balance when due; returns what it did (also kept in :attr:`log`)."""
        cfg, actions = self.config, []
        if snapshot is not None:
            self.snapshot = snapshot
        if len(self.lengths) < cfg.min_samples:
            return actions
        dep = self.deployment
        link_limit = 1.0
        if snapshot is not None and snapshot.available_bps:
            # the model's link: what the transport measures as available to us (bits/s)
            dep = replace(dep, link_bps=snapshot.available_bps)
            link_limit = cfg.utilisation_limit
        congested = snapshot is not None and snapshot.utilisation >= cfg.utilisation_limit
        surge = any(depth >= cfg.queue_surge for depth in (queues or {}).values())
        dist = Empirical(self.lengths)
        if now - self.last_rebalance >= cfg.rebalance_every:
            dep, result = best_split(dist, dep, self.local_instances, link_limit)
            self.deployment = replace(self.deployment, local_prefill=dep.local_prefill, local_decode=dep.local_decode)
            self.last_rebalance = self.last_solve = now
            actions.append(f"split {dep.local_prefill} P / {dep.local_decode} D")
        elif congested or surge or now - self.last_solve >= cfg.resolve_every:
            result = solve_threshold(dist, dep, link_limit=link_limit)
            self.last_solve = now
        else:
            return actions
        reason = "link near its limit" if congested else "queue surge" if surge else "periodic"
        if result.threshold != self.router.threshold:
            actions.append(f"threshold {self.router.threshold:.0f} -> {result.threshold:.0f} ({reason})")
            self.router.threshold = result.threshold
        self.last = result
        self.log.extend(actions)
        return actions
