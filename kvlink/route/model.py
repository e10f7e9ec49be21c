"""The PrfaaS throughput model (arXiv 2604.15039, section 4) and its solvers.

For a threshold ``t`` (requests whose incremental length exceeds ``t`` are prefilled remotely),
``p = P(l > t)``::

    Theta_prfaas = min(N_prfaas / E[T_prfaas(l) | l > t], B_out / E[S_kv(l) | l > t])
    Theta_pdp    = N_p / E[T_local(l) | l <= t]
    Theta_pdd    = N_d * BS_max / (T_decode * L_out)
    Lambda_max   = min(Theta_prfaas / p, Theta_pdp / (1 - p), Theta_pdd)

Expectations run over the length distribution's grid (the mean prefill time of the requests a
path serves, which is what bounds its rate). ``solve_threshold`` searches ``t``; ``best_split``
also searches the local prefill/decode split ``N_p / N_d``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kvlink.errors import ConfigError
from kvlink.route.profiles import KvSizeProfile, PrefillProfile


@dataclass(frozen=True)
class Deployment:
    """Instances and profiles of one deployment. ``prfaas_instances = 0``: no remote cluster."""

    local_prefill: int
    local_decode: int
    local_profile: PrefillProfile
    decode_batch: int
    decode_step_s: float
    output_tokens: int
    prfaas_instances: int = 0
    prfaas_profile: PrefillProfile | None = None
    link_bps: float = 0.0
    kv: KvSizeProfile | None = None

    def __post_init__(self) -> None:
        if self.local_decode < 1 or self.local_prefill < 0 or self.prfaas_instances < 0:
            raise ConfigError("need at least one decode instance and no negative counts")
        if self.prfaas_instances and (self.prfaas_profile is None or self.kv is None or self.link_bps <= 0):
            raise ConfigError("a PrfaaS cluster needs its prefill profile, a KV size profile and a link rate")

    @property
    def theta_pdd(self) -> float:
        return self.local_decode * self.decode_batch / (self.decode_step_s * self.output_tokens)


@dataclass(frozen=True)
class Throughput:
    """The model's figures at one threshold."""

    threshold: float
    p: float                 # share of requests offloaded
    mean_long: float         # mean incremental length offloaded
    mean_short: float
    theta_prfaas: float
    theta_pdp: float
    theta_pdd: float
    lambda_max: float        # requests/s the deployment sustains
    egress_bps: float        # link load at lambda_max

    def as_dict(self) -> dict:
        """Rounded figures; infinities (no threshold, an unused path) become None (JSON null)."""
        return {k: round(float(v), 4) if np.isfinite(v) else None for k, v in self.__dict__.items()}


def _cond_mean(values, weights, mask) -> float:
    w = weights * mask
    total = w.sum()
    return float((w * values).sum() / total) if total > 0 else 0.0


def evaluate(dist, dep: Deployment, threshold: float) -> Throughput:
    """The model at ``threshold`` (``inf``: nothing offloaded)."""
    lengths, weights = dist.grid()
    long = lengths > threshold if dep.prfaas_instances else np.zeros(lengths.shape, bool)
    p = float(weights[long].sum())
    theta_prfaas = float("inf")
    if p > 0:
        t_long = _cond_mean(dep.prfaas_profile(lengths), weights, long)
        s_long = _cond_mean(dep.kv(lengths), weights, long) * 8
        theta_prfaas = min(dep.prfaas_instances / t_long, dep.link_bps / s_long)
    theta_pdp = float("inf")
    if p < 1:
        t_short = _cond_mean(dep.local_profile(lengths), weights, ~long)
        theta_pdp = dep.local_prefill / t_short if dep.local_prefill else 0.0
    bounds = [dep.theta_pdd]
    if p > 0:
        bounds.append(theta_prfaas / p)
    if p < 1:
        bounds.append(theta_pdp / (1 - p))
    lam = min(bounds)
    egress = lam * p * _cond_mean(dep.kv(lengths), weights, long) * 8 if p > 0 else 0.0
    return Throughput(threshold, p, _cond_mean(lengths, weights, long), _cond_mean(lengths, weights, ~long),
                      theta_prfaas, theta_pdp, dep.theta_pdd, lam, egress)


def _sweep(dist, dep: Deployment, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lambda_max, egress_bps)`` of :func:`evaluate` at every threshold at once: the grid is
    sorted, so each path's conditional means are prefix/suffix sums looked up by position."""
    lengths, weights = dist.grid()
    order = np.argsort(lengths, kind="stable")
    lengths, weights = lengths[order], weights[order]

    def prefix(values) -> np.ndarray:  # prefix[i] = sum of weights * values over lengths[:i]
        return np.concatenate([[0.0], np.cumsum(weights * values)])

    idx = np.searchsorted(lengths, thresholds, side="right")
    w_all = prefix(np.ones_like(lengths))
    w_short = w_all[idx]
    p = w_all[-1] - w_short
    has_long, has_short = idx < lengths.size, idx > 0
    bounds = [np.full(thresholds.shape, dep.theta_pdd)]
    with np.errstate(divide="ignore", invalid="ignore"):
        kv_long = np.zeros(thresholds.shape)
        if dep.prfaas_instances:
            t_all, kv_all = prefix(dep.prfaas_profile(lengths)), prefix(dep.kv(lengths))
            t_long = (t_all[-1] - t_all[idx]) / p
            kv_long = (kv_all[-1] - kv_all[idx]) / p * 8
            theta_prfaas = np.minimum(dep.prfaas_instances / t_long, dep.link_bps / kv_long)
            bounds.append(np.where(has_long, theta_prfaas / p, np.inf))
        local_all = prefix(dep.local_profile(lengths))
        t_short = local_all[idx] / w_short
        theta_pdp = dep.local_prefill / t_short if dep.local_prefill else np.zeros(thresholds.shape)
        bounds.append(np.where(has_short, theta_pdp / (1 - p), np.inf))
        lam = np.minimum.reduce(bounds)
        egress = np.where(has_long, lam * p * kv_long, 0.0)
    return lam, egress


def solve_threshold(dist, dep: Deployment, candidates: int = 600, link_limit: float = 1.0) -> Throughput:
    """The threshold that maximises ``lambda_max`` while the link stays under ``link_limit`` of its
    rate (ties: the larger threshold, which moves fewer bytes)."""
    if not dep.prfaas_instances:
        return evaluate(dist, dep, float("inf"))
    lengths, _ = dist.grid()
    grid = np.unique(np.geomspace(lengths.min(), lengths.max(), candidates).round())
    lams, egress = _sweep(dist, dep, grid)
    best_t, best_lam = float("inf"), evaluate(dist, dep, float("inf")).lambda_max
    for t, lam, eg in zip(grid, lams, egress):
        if eg > link_limit * dep.link_bps:
            continue
        if lam > best_lam * (1 + 1e-9) or (lam >= best_lam * (1 - 1e-9) and t > best_t):
            best_t, best_lam = float(t), float(lam)
    return evaluate(dist, dep, best_t)


def best_split(dist, dep: Deployment, local_instances: int, link_limit: float = 1.0) -> tuple[Deployment, Throughput]:
    """Grid search of the local prefill/decode split (``N_p + N_d = local_instances``), each with
    its best threshold; returns the deployment and its figures."""
    best = None
    for n_p in range(0, local_instances):
        cand = replace(dep, local_prefill=n_p, local_decode=local_instances - n_p)
        if not n_p and not cand.prfaas_instances:
            continue
        r = solve_threshold(dist, cand, link_limit=link_limit)
        if best is None or r.lambda_max > best[1].lambda_max:
            best = (cand, r)
    if best is None:
        raise ConfigError("no split serves any request")
    return best
