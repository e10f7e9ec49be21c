"""Capacity planning from profile tables: ``kvlink sim --config plan.toml``.

::

    [distribution]            # input lengths: log-normal of ln(tokens), truncated
    mu = 9.9
    sigma = 1.0
    min = 128
    max = 131072

    [hardware.h200]           # prefill time of one instance, measured at a few lengths (>= 3)
    lengths = [1024, 8192, 32768, 131072]
    prefill_s = [0.44, 0.72, 1.84, 7.40]

    [kv]                      # bytes shipped per request: a preset ...
    preset = "kimi-linear-48b-a3b"
    # ... or a table: lengths = [...], mib = [...]

    [decode]
    step_s = 0.025            # per-token latency SLO
    batch = 20                # requests per decode instance at that step time
    output_tokens = 1024

    [link]
    rate = "100gbit"

    [[deployment]]
    name = "prfaas"
    prfaas = { hardware = "h200", instances = 4 }
    local = { hardware = "h20", instances = 8 }                 # split searched
    [[deployment]]
    name = "fixed"
    local = { hardware = "h20", prefill = 9, decode = 3 }      # split fixed
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from kvlink.config import parse_rate
from kvlink.errors import ConfigError
from kvlink.route.model import Deployment, best_split, solve_threshold
from kvlink.route.profiles import MIB, KvSizeProfile, LengthDist, PrefillProfile
from kvlink.route.simulator import simulate


def load_plan(path: str | Path) -> tuple[LengthDist, dict[str, tuple[Deployment, int]]]:
    """The distribution and ``{name: (deployment, local instances to split or 0)}``; raises
    :class:`ConfigError` naming what is missing or malformed."""
    try:
        raw = tomllib.loads(Path(path).read_text())
        d = raw["distribution"]
        dist = LengthDist(float(d["mu"]), float(d["sigma"]), int(d["min"]), int(d["max"]))
        hardware = {name: PrefillProfile.fit(name, h["lengths"], h["prefill_s"])
                    for name, h in raw["hardware"].items()}
        kv_raw = raw["kv"]
        if "preset" in kv_raw:
            from kvlink.presets import get_preset
            kv = KvSizeProfile.from_spec(get_preset(kv_raw["preset"]))
        else:
            kv = KvSizeProfile.fit(kv_raw["lengths"], [m * MIB for m in kv_raw["mib"]])
        dec = raw["decode"]
        link = parse_rate(raw.get("link", {}).get("rate")) or 0.0
        plans = {}
        for dep in raw["deployment"]:
            local = dep["local"]
            common = dict(decode_batch=int(dec["batch"]), decode_step_s=float(dec["step_s"]),
                          output_tokens=int(dec["output_tokens"]), local_profile=hardware[local["hardware"]])
            if "prfaas" in dep:
                common.update(prfaas_instances=int(dep["prfaas"]["instances"]),
                              prfaas_profile=hardware[dep["prfaas"]["hardware"]], link_bps=link, kv=kv)
            if "instances" in local:
                n = int(local["instances"])
                plans[dep["name"]] = (Deployment(max(0, n - 1) // 2, max(1, n - (n - 1) // 2), **common), n)
            else:
                plans[dep["name"]] = (Deployment(int(local["prefill"]), int(local["decode"]), **common), 0)
        return dist, plans
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: malformed plan ({exc!r})") from exc


def run_plan(path: str | Path, duration: float = 3000.0, load: float = 0.5, seed: int = 0) -> dict:
    """Model (best threshold, best split) and simulation of every deployment of a plan."""
    dist, plans = load_plan(path)
    out = {"load": load, "systems": {}}
    for name, (dep, local) in plans.items():
        if local:
            dep, model = best_split(dist, dep, local)
        else:
            model = solve_threshold(dist, dep)
        sim = simulate(name, dep, dist, model.threshold, load * model.lambda_max, duration, seed)
        out["systems"][name] = {
            "split": f"{dep.prfaas_instances} PrfaaS / " * bool(dep.prfaas_instances)
                     + f"{dep.local_prefill} P / {dep.local_decode} D",
            "model": model.as_dict(), "sim": sim.as_dict(), "ttfts": sim.ttfts}
    return out


def render_plan(result: dict) -> str:
    rows = [f"{'system':<20}{'split':<22}{'threshold':>10}{'offload':>8}{'Lambda_max':>11}{'egress Gbps':>12}"
            f"{'TTFT mean':>10}{'P90':>7}"]
    for name, s in result["systems"].items():
        m, sim = s["model"], s["sim"]
        threshold = "-" if m["threshold"] is None else f"{m['threshold']:.0f}"
        rows.append(f"{name:<20}{s['split']:<22}{threshold:>10}{m['p']:>8.2f}{m['lambda_max']:>11.2f}"
                    f"{m['egress_bps'] / 1e9:>12.1f}{sim['ttft_mean']:>10.2f}{sim['ttft_p90']:>7.2f}")
    rows.append(f"TTFTs simulated at {result['load']:.0%} of each system's Lambda_max.")
    return "\n".join(rows)
