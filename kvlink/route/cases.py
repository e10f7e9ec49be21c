"""The PrfaaS case study (arXiv 2604.15039): published figures, and two ways to get the inputs
the paper does not publish (the 8xH20 prefill profile and the decode batch ``BS_max``).

Published: the internal 1T hybrid's 8xH200 profile (S_kv, T_prefill at 1K/8K/32K/128K), the
input-length distribution, 1,024 output tokens, a 40 tokens/s SLO, a ~100 Gbps link, and the
results (threshold, Lambda_max and Thetas, TTFTs, egress).

- ``inputs="independent"`` (the default): from published hardware and model figures only
  (:mod:`kvlink.route.hardware`): the H200 profile scaled by datasheet ratios, ``BS_max`` from a
  decode-step model under the SLO. No Table 6 figure is read.
- ``inputs="fitted"``: solved from the paper's own results, so the figures they were solved from
  match by construction (docs/simulator.md shows the arithmetic):

  - ``Theta_pdd = N_d * BS_max / (T_decode * L_out) = 3.91`` with ``N_d = 5`` gives ``BS_max = 20.0``;
  - the H200 fit with its constant+linear part scaled by ``k_lin`` and its attention part by
    ``k_att``, the two factors solving ``3 / E[T_H20(l) | l <= 19.4K] = 1.64`` and
    ``9 / E[T_H20(l)] = 2.11``.
"""

from __future__ import annotations

import numpy as np

from kvlink.errors import ConfigError
from kvlink.route import hardware as hw
from kvlink.route.model import Deployment
from kvlink.route.profiles import MIB, KvSizeProfile, LengthDist, PrefillProfile

LENGTHS = [1024, 8192, 32768, 131072]
PAPER = {
    "s_kv_mib": [190.8, 308.9, 701.3, 2316.3],
    "t_prefill_h200_s": [0.44, 0.72, 1.84, 7.40],
    "threshold": 19400, "offloaded": 0.496, "mean_offloaded": 44000,
    "prfaas": {"lambda": 3.24, "theta_prfaas": 1.61, "theta_pdp": 1.64, "theta_pdd": 3.91,
               "split": "4 PrfaaS / 3 P / 5 D", "ttft_mean": 2.22, "ttft_p90": 3.51, "egress_gbps": 13.0},
    "homogeneous": {"lambda": 2.11, "split": "9 P / 3 D", "ttft_mean": 4.44, "ttft_p90": 9.73},
    "naive": {"lambda": 2.45, "split": "4 H200 P / 8 H20 D", "ttft_mean": 1.74, "ttft_p90": 3.51},
}
DIST = LengthDist(9.90, 1.00, 128, 131072)
T_DECODE = 1 / 40
L_OUT = 1024
LINK_BPS = 100e9
H200 = PrefillProfile.fit("8xH200", LENGTHS, PAPER["t_prefill_h200_s"])
KV = KvSizeProfile.fit(LENGTHS, [m * MIB for m in PAPER["s_kv_mib"]])


def derived_batch() -> float:
    """``BS_max`` from ``Theta_pdd = 3.91`` with 5 decode instances."""
    return PAPER["prfaas"]["theta_pdd"] * T_DECODE * L_OUT / 5


def derived_h20(dist: LengthDist = DIST) -> tuple[PrefillProfile, dict]:
    """The 8xH20 prefill profile from the paper's Thetas; returns it and the factors."""
    lengths, w = dist.grid()
    lin = H200.a + H200.b * lengths
    att = H200.c * lengths * lengths
    short = lengths <= PAPER["threshold"]
    ws = w * short / (w * short).sum()
    # [E_s[lin] E_s[att]] [k_lin k_att]^T = 3 / 1.64 ;  [E[lin] E[att]] [..] = 9 / 2.11
    lhs = np.array([[(ws * lin).sum(), (ws * att).sum()], [(w * lin).sum(), (w * att).sum()]])
    rhs = np.array([3 / PAPER["prfaas"]["theta_pdp"], 9 / PAPER["homogeneous"]["lambda"]])
    k_lin, k_att = np.linalg.solve(lhs, rhs)
    return H200.scaled("8xH20", float(k_lin), float(k_att)), {"k_lin": float(k_lin), "k_att": float(k_att)}


INPUTS = ("independent", "fitted")
MODEL = hw.ModelSize()


def independent_h20() -> PrefillProfile:
    """The 8xH20 prefill profile from the 8xH200 one and datasheet ratios (no paper result read)."""
    return hw.scale_prefill(H200, hw.H200, hw.H20, "8xH20")


def independent_decode(dist: LengthDist = DIST) -> hw.DecodeBound:
    """``BS_max`` of an 8xH20 decode instance from the decode-step model under the SLO."""
    return hw.decode_batch(hw.H20, hw.GPUS_PER_INSTANCE, MODEL, KV, dist, T_DECODE, L_OUT)


def split_h20() -> PrefillProfile:
    """Sensitivity only: the 8xH20 profile with ``b`` split at the compute floor of the ASSUMED
    active parameter count (:func:`hardware.scale_prefill_split`)."""
    return hw.scale_prefill_split(H200, hw.H200, hw.H20, "8xH20 (b split)", hw.GPUS_PER_INSTANCE,
                                  2 * MODEL.active_params)


def inputs_for(inputs: str = "independent", dist: LengthDist = DIST) -> tuple[PrefillProfile, int]:
    """``(8xH20 prefill profile, BS_max)`` the way ``inputs`` names; :class:`ConfigError` if unknown."""
    if inputs == "independent":
        return independent_h20(), independent_decode(dist).batch
    if inputs == "fitted":
        return derived_h20(dist)[0], round(derived_batch())
    raise ConfigError(f"inputs must be one of {INPUTS}, not {inputs!r}")


def input_table(inputs: str = "independent") -> list[dict]:
    """Every input of the case with its kind: ``published``, ``independent`` (derived from
    published figures, formula given), ``assumed`` (not published, chosen a priori, reason given)
    or ``fitted`` (solved from a result it is later compared to)."""
    h20, batch = inputs_for(inputs)
    rows = [
        ("T_prefill 8xH200 @1K/8K/32K/128K (s)", " / ".join(map(str, PAPER["t_prefill_h200_s"])), "published",
         f"paper; fit a={H200.a:.3f} s, b={H200.b * 1e6:.2f} us/tok, c={H200.c:.3g} s/tok^2"),
        ("S_kv @1K/8K/32K/128K (MiB)", " / ".join(map(str, PAPER["s_kv_mib"])), "published",
         f"paper; fit {KV.fixed / MIB:.0f} MiB + {KV.per_token / 1e3:.1f} KB/tok"),
        ("input lengths", f"lognormal({DIST.mu}, {DIST.sigma}) in [{DIST.lo}, {DIST.hi}]", "published", "paper"),
        ("L_out, SLO, link", f"{L_OUT} tok, {1 / T_DECODE:.0f} tok/s, {LINK_BPS / 1e9:.0f} Gbps", "published", "paper"),
    ]
    for a in (hw.H200, hw.H20):
        rows.append((f"{a.name} BF16 dense / HBM bw / HBM", f"{a.bf16_dense_flops / 1e12:.0f} TFLOPS / "
                     f"{a.hbm_bytes_per_s / 1e12:.1f} TB/s / {a.hbm_bytes / 1e9:.0f} GB", "published", a.source))
    rows.append(("model total params", f"{MODEL.total_params / 1e12:.0f}T", "published", "paper ('1T hybrid')"))
    if inputs == "independent":
        r = hw.roofline_note()
        dec = independent_decode()
        rows += [
            ("weight bytes / param", f"{MODEL.weight_bytes_per_param}", "assumed",
             hw.ASSUMED["weight_bytes_per_param"]),
            ("active params", f"{MODEL.active_params / 1e9:.0f}B", "assumed", hw.ASSUMED["active_params"]),
            ("8xH20 a (s)", f"{h20.a:.3f}", "independent", f"a_H200 x HBM ratio {r['bandwidth_ratio']:.2f}"),
            ("8xH20 b (us/token)", f"{h20.b * 1e6:.1f}", "independent", f"b_H200 x BF16 ratio {r['flops_ratio']:.2f}"),
            ("8xH20 c (s/token^2)", f"{h20.c:.3g}", "independent", f"c_H200 x BF16 ratio {r['flops_ratio']:.2f}"),
            ("BS_max per 8xH20 decode", f"{batch}", "independent",
             f"min(bw {dec.by_bandwidth}: (T_step - W/bw) * bw / S_kv(E[l]+L_out/2); compute {dec.by_compute}: "
             f"T_step * F / (2 N_act); capacity {dec.by_capacity}: (8x96 GB - W) / S_kv(E[l]+L_out)) "
             f"-> {dec.binding}"),
        ]
    else:
        _, f = derived_h20()
        rows += [
            ("8xH20 profile", f"H200 x{f['k_lin']:.2f} (a, b), x{f['k_att']:.2f} (c)", "fitted",
             "solved from Theta_pdp = 1.64 and homogeneous Lambda_max = 2.11"),
            ("BS_max per 8xH20 decode", f"{batch}", "fitted", "solved from Theta_pdd = 3.91 with N_d = 5"),
        ]
    return [dict(zip(("input", "value", "kind", "how"), row)) for row in rows]


def deployments(inputs: str = "independent") -> dict[str, tuple[Deployment, int]]:
    """The three deployments of the case study, each with its local instance count for the split
    search (0: split fixed), built from ``inputs`` (``independent`` or ``fitted``)."""
    h20, batch = inputs_for(inputs)
    common = dict(decode_batch=batch, decode_step_s=T_DECODE, output_tokens=L_OUT)
    return {
        "prfaas": (Deployment(3, 5, h20, prfaas_instances=4, prfaas_profile=H200, link_bps=LINK_BPS, kv=KV,
                              **common), 8),
        "homogeneous": (Deployment(9, 3, h20, **common), 12),
        "naive": (Deployment(4, 8, H200, **common), 0),  # fixed: the 4 H200 instances prefill, 8 H20 decode
    }
