"""``kvlink sim --case prfaas-1t``: the analytical model and the simulation of the PrfaaS case
study, printed beside the paper's figures; JSON and PNG plots on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvlink.route import cases
from kvlink.route.model import best_split, evaluate, solve_threshold
from kvlink.route.simulator import simulate

NAMES = {"prfaas": "PrfaaS-PD", "homogeneous": "homogeneous PD", "naive": "naive heterogeneous"}


def run_case(duration: float = 3000.0, load: float = 0.5, seed: int = 0) -> dict:
    """Model and simulation of every deployment of the case study. TTFTs are simulated at ``load``
    times each deployment's own Lambda_max; saturation runs (1.2x) check Lambda_max itself."""
    h20, factors = cases.derived_h20()
    out = {"derived": {"decode_batch": round(cases.derived_batch(), 3), "h20_profile": h20.__dict__, **factors,
                       "h200_profile": cases.H200.__dict__, "kv_fixed_mib": cases.KV.fixed / (1 << 20),
                       "kv_per_token_kib": cases.KV.per_token / 1024},
           "paper": cases.PAPER, "load": load, "systems": {}}
    deployments = cases.deployments()
    for key, (dep, local) in deployments.items():
        if local:
            dep, model = best_split(cases.DIST, dep, local)
        else:
            model = solve_threshold(cases.DIST, dep)
        at_load = simulate(key, dep, cases.DIST, model.threshold, load * model.lambda_max, duration, seed)
        saturated = simulate(key, dep, cases.DIST, model.threshold, 1.2 * model.lambda_max, duration, seed)
        out["systems"][key] = {
            "split": f"{dep.prfaas_instances} PrfaaS / " * bool(dep.prfaas_instances)
                     + f"{dep.local_prefill} P / {dep.local_decode} D",
            "model": model.as_dict(), "sim": at_load.as_dict(), "sim_saturated": saturated.as_dict(),
            "ttfts": at_load.ttfts,
        }
    prfaas_dep = deployments["prfaas"][0]
    grid = np.geomspace(1024, 131072, 60)
    out["threshold_search"] = [[float(t), evaluate(cases.DIST, prfaas_dep, float(t)).lambda_max] for t in grid]
    return out


def _pct(ours: float, paper: float) -> str:
    return f"{(ours - paper) / paper * 100:+.1f}%"


def render(result: dict) -> str:
    paper, rows = result["paper"], []
    p = result["systems"]["prfaas"]
    m = p["model"]
    rows.append("PrfaaS case study (arXiv 2604.15039): internal 1T hybrid, 32xH200 PrfaaS + 64xH20 local PD "
                "vs 96xH20 PD, 100 Gbps link")
    d = result["derived"]
    rows.append(f"derived: BS_max = {d['decode_batch']:.2f} per decode instance; 8xH20 prefill = H200 fit with "
                f"linear part x{d['k_lin']:.2f}, attention part x{d['k_att']:.2f}")
    rows.append("")
    rows.append(f"{'figure':<34}{'kvlink':>12}{'paper':>12}{'gap':>9}")
    rows.append(f"{'threshold t (tokens)':<34}{m['threshold']:>12.0f}{paper['threshold']:>12}"
                f"{_pct(m['threshold'], paper['threshold']):>9}")
    rows.append(f"{'requests offloaded':<34}{m['p']:>12.3f}{paper['offloaded']:>12.3f}{_pct(m['p'], paper['offloaded']):>9}")
    rows.append(f"{'mean offloaded length':<34}{m['mean_long']:>12.0f}{paper['mean_offloaded']:>12}"
                f"{_pct(m['mean_long'], paper['mean_offloaded']):>9}")
    for key, label in (("theta_prfaas", "Theta_prfaas"), ("theta_pdp", "Theta_pdp"), ("theta_pdd", "Theta_pdd")):
        rows.append(f"{label + ' (req/s)':<34}{m[key]:>12.2f}{paper['prfaas'][key]:>12.2f}"
                    f"{_pct(m[key], paper['prfaas'][key]):>9}")
    rows.append(f"{'PrfaaS egress at Lambda_max (Gbps)':<34}{m['egress_bps'] / 1e9:>12.1f}"
                f"{paper['prfaas']['egress_gbps']:>12.1f}{_pct(m['egress_bps'] / 1e9, paper['prfaas']['egress_gbps']):>9}")
    rows.append("")
    rows.append(f"{'system':<22}{'split':<22}{'Lambda_max':>11}{'paper':>7}{'gap':>8}{'sim max':>9}"
                f"{'TTFT mean':>11}{'paper':>7}{'P90':>7}{'paper':>7}{'link':>7}")
    for key, s in result["systems"].items():
        pp = paper[key]
        lam = s["model"]["lambda_max"]
        rows.append(f"{NAMES[key]:<22}{s['split']:<22}{lam:>11.2f}{pp['lambda']:>7.2f}{_pct(lam, pp['lambda']):>8}"
                    f"{s['sim_saturated']['throughput_rps']:>9.2f}{s['sim']['ttft_mean']:>11.2f}{pp['ttft_mean']:>7.2f}"
                    f"{s['sim']['ttft_p90']:>7.2f}{pp['ttft_p90']:>7.2f}{s['sim']['link_utilisation'] * 100:>6.1f}%")
    gain = result["systems"]["prfaas"]["model"]["lambda_max"] / result["systems"]["homogeneous"]["model"]["lambda_max"]
    rows.append("")
    rows.append(f"PrfaaS-PD over homogeneous PD: {gain:.2f}x (paper 1.54x). 'sim max': simulated throughput offered "
                f"1.2x Lambda_max; TTFTs simulated at {result.get('load', 0.5):.0%} of each system's Lambda_max "
                f"(the paper does not state its load).")
    return "\n".join(rows)


def write_plots(result: dict, where: Path) -> list[Path]:
    """PNG plots of the threshold search and of the TTFT distributions (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    t, lam = zip(*result["threshold_search"])
    ax.semilogx(t, lam)
    best = result["systems"]["prfaas"]["model"]
    ax.axvline(best["threshold"], ls="--", color="gray")
    ax.set(xlabel="threshold t (tokens)", ylabel="Lambda_max (req/s)", title="PrfaaS-PD threshold search")
    search = where / "threshold_search.png"
    fig.savefig(search, dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, s in result["systems"].items():
        values = np.sort(s["ttfts"])
        ax.plot(values, np.linspace(0, 1, values.size), label=NAMES[key])
    ax.set(xlabel="TTFT (s)", ylabel="CDF", title="Simulated TTFT", xlim=(0, 20))
    ax.legend()
    ttft = where / "ttft_cdf.png"
    fig.savefig(ttft, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [search, ttft]


def to_json(result: dict) -> str:
    slim = {**result, "systems": {k: {kk: vv for kk, vv in v.items() if kk != "ttfts"}
                                  for k, v in result["systems"].items()}}
    return json.dumps(slim, indent=2)
