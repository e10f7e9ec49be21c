"""``kvlink sim --case prfaas-1t``: the analytical model and the simulation of the PrfaaS case
study, printed beside the paper's figures; JSON and PNG plots on request."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvlink.route import cases
from kvlink.route.model import best_split, evaluate, solve_threshold
from kvlink.route.simulator import simulate

NAMES = {"prfaas": "PrfaaS-PD", "homogeneous": "homogeneous PD", "naive": "naive heterogeneous"}
PAPER_SPLITS = {"prfaas": (3, 5), "homogeneous": (9, 3)}  # local P / D of the paper's Table 6


def run_case(duration: float = 3000.0, load: float = 0.5, seed: int = 0, inputs: str = "independent") -> dict:
    """Model and simulation of every deployment of the case study from ``inputs`` (``independent``
    or ``fitted``, see :mod:`kvlink.route.cases`). TTFTs are simulated at ``load`` times each
    deployment's own Lambda_max; saturation runs (1.2x) check Lambda_max itself."""
    h20, batch = cases.inputs_for(inputs)
    out = {"inputs": inputs, "input_table": cases.input_table(inputs),
           "derived": {"decode_batch": batch, "h20_profile": h20.__dict__, "h200_profile": cases.H200.__dict__,
                       "kv_fixed_mib": cases.KV.fixed / (1 << 20), "kv_per_token_kib": cases.KV.per_token / 1024},
           "paper": cases.PAPER, "load": load, "systems": {}}
    if inputs == "fitted":
        out["derived"].update(cases.derived_h20()[1])
    else:
        out["derived"]["decode"] = cases.independent_decode().__dict__
    deployments = cases.deployments(inputs)
    for key, (dep, local) in deployments.items():
        if local:
            dep, model = best_split(cases.DIST, dep, local)
        else:
            model = solve_threshold(cases.DIST, dep)
        at_load = simulate(key, dep, cases.DIST, model.threshold, load * model.lambda_max, duration, seed)
        saturated = simulate(key, dep, cases.DIST, model.threshold, 1.2 * model.lambda_max, duration, seed)
        split = f"{dep.prfaas_instances} PrfaaS / " * bool(dep.prfaas_instances) + \
            f"{dep.local_prefill} P / {dep.local_decode} D"
        if key == "naive":  # its prefill instances are H200s, as the paper writes it
            split = f"{dep.local_prefill} H200 P / {dep.local_decode} H20 D"
        out["systems"][key] = {
            "split": split,
            "model": model.as_dict(), "sim": at_load.as_dict(), "sim_saturated": saturated.as_dict(),
            "ttfts": at_load.ttfts,
        }
    out["at_paper_split"] = {}
    for key, (n_p, n_d) in PAPER_SPLITS.items():
        dep = replace(deployments[key][0], local_prefill=n_p, local_decode=n_d)
        out["at_paper_split"][key] = solve_threshold(cases.DIST, dep).as_dict()
    prfaas_dep = deployments["prfaas"][0]
    grid = np.geomspace(1024, 131072, 60)
    out["threshold_search"] = [[float(t), evaluate(cases.DIST, prfaas_dep, float(t)).lambda_max] for t in grid]
    out["comparison"] = compare(out)
    if inputs == "independent":
        out["sensitivity"] = sensitivity()
    return out


def sensitivity() -> dict:
    """Model Lambda_max of each system with the 8xH20 profile whose linear term is split at the
    compute floor of the assumed active parameters (the other bound of the roofline choice)."""
    h20 = cases.split_h20()
    out = {"h20_profile": h20.__dict__, "lambda_max": {}, "split": {}}
    for key, (dep, local) in cases.deployments("independent").items():
        dep = replace(dep, local_profile=h20) if key != "naive" else dep
        dep, model = best_split(cases.DIST, dep, local) if local else (dep, solve_threshold(cases.DIST, dep))
        out["lambda_max"][key] = round(model.lambda_max, 4)
        out["split"][key] = f"{dep.local_prefill} P / {dep.local_decode} D"
    return out


def _row(figure: str, ours, paper) -> dict:
    """One comparison row; numbers get ratio and difference, strings whether they agree."""
    if isinstance(ours, str) or isinstance(paper, str):
        return {"figure": figure, "kvlink": ours, "paper": paper, "ratio": None, "diff": None,
                "same": ours == paper}
    if ours is None:
        return {"figure": figure, "kvlink": None, "paper": paper, "ratio": None, "diff": None}
    return {"figure": figure, "kvlink": round(float(ours), 4), "paper": paper,
            "ratio": round(ours / paper, 4) if paper else None, "diff": round(ours - paper, 4)}


def compare(result: dict) -> list[dict]:
    """The model's and the simulator's figures beside the paper's (Table 6 and the text)."""
    paper, systems = result["paper"], result["systems"]
    m = systems["prfaas"]["model"]
    rows = [_row("threshold t (tokens)", m["threshold"], paper["threshold"]),
            _row("requests offloaded", m["p"], paper["offloaded"]),
            _row("mean offloaded length (tokens)", m["mean_long"], paper["mean_offloaded"])]
    for key in ("theta_prfaas", "theta_pdp", "theta_pdd"):
        rows.append(_row(f"PrfaaS-PD {key} (req/s)", m[key], paper["prfaas"][key]))
    rows.append(_row("PrfaaS-PD egress at Lambda_max (Gbps)", m["egress_bps"] / 1e9, paper["prfaas"]["egress_gbps"]))
    for key, s in systems.items():
        pp = paper[key]
        rows += [_row(f"{NAMES[key]} split", s["split"], pp["split"]),
                 _row(f"{NAMES[key]} Lambda_max (req/s)", s["model"]["lambda_max"], pp["lambda"]),
                 _row(f"{NAMES[key]} TTFT mean (s)", s["sim"]["ttft_mean"], pp["ttft_mean"]),
                 _row(f"{NAMES[key]} TTFT P90 (s)", s["sim"]["ttft_p90"], pp["ttft_p90"])]
    for key, (n_p, n_d) in PAPER_SPLITS.items():
        at = result["at_paper_split"][key]
        label = f"{NAMES[key]} at the paper's {n_p} P / {n_d} D"
        rows.append(_row(f"{label}: Lambda_max", at["lambda_max"], paper[key]["lambda"]))
        if key == "prfaas":
            rows += [_row(f"{label}: {k}", at[k], paper["prfaas"][k]) for k in ("theta_pdp", "theta_pdd")]
    gain = systems["prfaas"]["model"]["lambda_max"] / systems["homogeneous"]["model"]["lambda_max"]
    paper_gain = paper["prfaas"]["lambda"] / paper["homogeneous"]["lambda"]
    rows.append(_row("PrfaaS-PD / homogeneous Lambda_max", gain, paper_gain))
    return rows


def _cell(v, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, str):
        return f"{v:>{width}}"
    return f"{v:>{width}.3f}" if abs(v) < 100 else f"{v:>{width}.0f}"


def render(result: dict) -> str:
    """The inputs with their kinds, then every compared figure with ratio and difference."""
    rows = ["PrfaaS case study (arXiv 2604.15039): internal 1T hybrid, 32xH200 PrfaaS + 64xH20 local PD "
            "vs 96xH20 PD, 100 Gbps link", f"inputs: {result['inputs']}", ""]
    rows.append(f"{'input':<38}{'kind':<13}{'value':<40}how")
    for r in result["input_table"]:
        rows.append(f"{r['input']:<38}{r['kind'].upper() if r['kind'] == 'fitted' else r['kind']:<13}"
                    f"{r['value']:<40}{r['how']}")
    rows.append("")
    rows.append(f"{'figure':<50}{'kvlink':>22}{'paper':>22}{'ratio':>8}{'diff':>10}")
    for r in result["comparison"]:
        if "same" in r:
            tail = f"{'same' if r['same'] else 'differs':>18}"
        else:
            tail = _cell(r["ratio"], 8) + _cell(r["diff"], 10)
        rows.append(f"{r['figure']:<50}{_cell(r['kvlink'], 22)}{_cell(r['paper'], 22)}{tail}")
    rows.append("")
    sat = ", ".join(f"{NAMES[k]} {s['sim_saturated']['throughput_rps']:.2f}" for k, s in result["systems"].items())
    rows.append(f"Simulated throughput offered 1.2x Lambda_max: {sat} req/s. TTFTs simulated at "
                f"{result.get('load', 0.5):.0%} of each system's own Lambda_max (the paper does not state its load).")
    if "sensitivity" in result:
        sens = result["sensitivity"]
        h = sens["h20_profile"]
        lam = ", ".join(f"{NAMES[k]} {v:.2f} ({sens['split'][k]})" for k, v in sens["lambda_max"].items())
        rows.append(f"Sensitivity (not the default): b of 8xH20 split at the compute floor of the assumed active "
                    f"params, b = {h['b'] * 1e6:.1f} us/token: Lambda_max {lam} req/s.")
    if result["inputs"] == "fitted":
        rows.append("FITTED inputs: Theta_pdp, Theta_pdd and homogeneous Lambda_max match by construction.")
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
