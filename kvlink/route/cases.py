"""The PrfaaS case study (arXiv 2604.15039): published figures, and the profiles derived from them.

Published: the internal 1T hybrid's 8xH200 profile (S_kv, T_prefill at 1K/8K/32K/128K), the
input-length distribution, 1,024 output tokens, a 40 tokens/s SLO, a ~100 Gbps link, and the
results (threshold, Lambda_max and Thetas, TTFTs, egress). Not published, derived here from the
paper's own results (docs/simulator.md shows the arithmetic):

- **Decode batch size.** ``Theta_pdd = N_d * BS_max / (T_decode * L_out) = 3.91`` with
  ``N_d = 5``, ``T_decode = 1/40 s`` (the SLO) and ``L_out = 1024`` gives ``BS_max = 20.0``.
- **8xH20 prefill profile.** The H200 fit with its constant+linear part scaled by ``k_lin`` and
  its attention (quadratic) part by ``k_att``; the two factors solve
  ``3 / E[T_H20(l) | l <= 19.4K] = 1.64`` (the PrfaaS-PD local prefill Theta) and
  ``9 / E[T_H20(l)] = 2.11`` (homogeneous PD, 9 P / 3 D, prefill-bound).
"""

from __future__ import annotations

import numpy as np

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


def deployments() -> dict[str, tuple[Deployment, int]]:
    """The three deployments of the case study, each with its local instance count for the split search."""
    h20, _ = derived_h20()
    batch = round(derived_batch())
    common = dict(decode_batch=batch, decode_step_s=T_DECODE, output_tokens=L_OUT)
    return {
        "prfaas": (Deployment(3, 5, h20, prfaas_instances=4, prfaas_profile=H200, link_bps=LINK_BPS, kv=KV,
                              **common), 8),
        "homogeneous": (Deployment(9, 3, h20, **common), 12),
        "naive": (Deployment(4, 8, H200, **common), 0),  # fixed: the 4 H200 instances prefill, 8 H20 decode
    }
