"""Published hardware and model-size figures, and the inputs derived from them alone.

Nothing here reads a result of the PrfaaS paper (Table 6: Lambda_max, Thetas, threshold): the
8xH20 prefill profile is the measured 8xH200 profile scaled by datasheet ratios, and the decode
batch follows from a decode-step model (weights and KV read from HBM, compute, KV capacity)
under the 40 tokens/s SLO. docs/simulator.md explains each choice.

Scaling ``T(l) = a + b*l + c*l^2`` from one GPU kind to another:

- ``c`` (full-attention score/value products, quadratic in ``l``): compute-bound, scaled by the
  dense BF16 throughput ratio;
- ``b`` (per-token GEMMs of a 1T MoE: a prefill chunk of thousands of tokens gives each expert
  ~chunk/48 rows, i.e. ~m FLOP per weight byte, far above the H20's roofline ridge of 37 FLOP/B):
  compute-bound, scaled by the same ratio. This scales the H200's whole measured ``b``, an upper
  estimate of the H20's; :func:`scale_prefill_split` is the lower one;
- ``a`` (per-forward fixed cost: reading every weight once, kernel launches): memory-bound,
  scaled by the HBM bandwidth ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlink.errors import ConfigError
from kvlink.route.profiles import KvSizeProfile, PrefillProfile


@dataclass(frozen=True)
class Accelerator:
    """One GPU's published figures (per GPU)."""

    name: str
    bf16_dense_flops: float   # FLOP/s, dense (no 2:4 sparsity)
    hbm_bytes_per_s: float
    hbm_bytes: float
    source: str

    @property
    def ridge(self) -> float:
        """Roofline ridge point in FLOP per HBM byte."""
        return self.bf16_dense_flops / self.hbm_bytes_per_s


H200 = Accelerator("H200 SXM", 989e12, 4.8e12, 141e9,
                   "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity (989 dense), "
                   "141 GB HBM3e at 4.8 TB/s")
H20 = Accelerator("H20", 148e12, 4.0e12, 96e9,
                  "NVIDIA H20 specification (China-market part, no public NVIDIA datasheet page; figures as "
                  "published by NVIDIA partners and the trade press): BF16/FP16 148 TFLOPS dense, 96 GB HBM3 "
                  "at 4.0 TB/s")
GPUS_PER_INSTANCE = 8  # the paper's instances: 8xH200 prefill, 8xH20 prefill or decode


@dataclass(frozen=True)
class ModelSize:
    """Size figures of the paper's internal 1T hybrid (Kimi Linear architecture, KDA:MLA 3:1).

    ``total_params`` is published ("1T"). The weight format and the active parameter count are
    not: ``weight_bytes_per_param`` and ``active_params`` are ASSUMED (see ``ASSUMED``).
    """

    total_params: float = 1e12
    # FP8 (1 B/param, 1 TB) does not fit in 8 x 96 GB, so a decode instance of 8 H20 must hold
    # ~4-bit weights (Moonshot ships its public 1T model, Kimi K2-Thinking, with INT4 experts).
    weight_bytes_per_param: float = 0.5
    # Kimi K2, the public 1T MoE of the same lab, activates 32B parameters per token.
    active_params: float = 32e9

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.weight_bytes_per_param


ASSUMED = {
    "weight_bytes_per_param": "not published; ~4-bit, the only format a 1T model fits 8x96 GB in",
    "active_params": "not published; Kimi K2's 32B (the public 1T MoE of the same lab)",
}


def scale_prefill(profile: PrefillProfile, src: Accelerator, dst: Accelerator, name: str) -> PrefillProfile:
    """``profile`` measured on ``src`` moved to ``dst``: ``a`` by the HBM bandwidth ratio, ``b`` and
    ``c`` by the dense BF16 throughput ratio (module docstring)."""
    mem = src.hbm_bytes_per_s / dst.hbm_bytes_per_s
    flops = src.bf16_dense_flops / dst.bf16_dense_flops
    return PrefillProfile(name, profile.a * mem, profile.b * flops, profile.c * flops)


def scale_prefill_split(profile: PrefillProfile, src: Accelerator, dst: Accelerator, name: str, gpus: int,
                        flops_per_token: float) -> PrefillProfile:
    """Sensitivity variant of :func:`scale_prefill`: only the compute floor of ``b`` (``flops_per_token``
    at ``src``'s peak) scales by the BF16 ratio, the rest of ``b`` by the HBM ratio. Needs the
    ASSUMED active parameter count, so it is not the default."""
    mem = src.hbm_bytes_per_s / dst.hbm_bytes_per_s
    flops = src.bf16_dense_flops / dst.bf16_dense_flops
    floor = min(profile.b, flops_per_token / (src.bf16_dense_flops * gpus))
    return PrefillProfile(name, profile.a * mem, floor * flops + (profile.b - floor) * mem, profile.c * flops)


@dataclass(frozen=True)
class DecodeBound:
    """The decode batch of one instance and what bounds it."""

    batch: int
    by_bandwidth: int        # largest B with weights/bw + B * kv_read/bw <= step
    by_compute: int          # largest B with B * 2 * active_params / flops <= step
    by_capacity: int         # largest B whose KV fits the HBM left after the weights
    weights_s: float         # time to read every weight once per step
    kv_read_bytes: float     # per request per step (mean context over the length distribution)
    kv_held_bytes: float     # per request at the end of its decode
    binding: str


def decode_batch(acc: Accelerator, gpus: int, model: ModelSize, kv: KvSizeProfile, dist, step_s: float,
                 output_tokens: int) -> DecodeBound:
    """``BS_max`` of a decode instance under a per-token SLO of ``step_s``.

    A step reads every weight (a batch of tens of requests routes to most experts, so reading all
    of them is the bound) and each request's cache at its mean context (prompt + half the output),
    from HBM; compute is ``2 * active_params`` FLOP per request. The held caches (prompt + whole
    output) must fit beside the weights. Raises :class:`ConfigError` when the weights alone break
    the SLO or the memory.
    """
    lengths, weights = dist.grid()
    mean_len = float((lengths * weights).sum())
    bw = acc.hbm_bytes_per_s * gpus
    weights_s = model.weight_bytes / bw
    kv_read = float(kv(mean_len + output_tokens / 2))
    kv_held = float(kv(mean_len + output_tokens))
    free = acc.hbm_bytes * gpus - model.weight_bytes
    if weights_s >= step_s or free <= 0:
        raise ConfigError(f"{model.weight_bytes / 1e9:.0f} GB of weights do not fit {gpus}x{acc.name} "
                          f"within a {step_s * 1e3:.0f} ms step")
    by_bw = math.floor((step_s - weights_s) * bw / kv_read)
    by_compute = math.floor(step_s * acc.bf16_dense_flops * gpus / (2 * model.active_params))
    by_capacity = math.floor(free / kv_held)
    bounds = {"HBM bandwidth": by_bw, "compute": by_compute, "KV capacity": by_capacity}
    binding = min(bounds, key=bounds.get)
    return DecodeBound(bounds[binding], by_bw, by_compute, by_capacity, weights_s, kv_read, kv_held, binding)


def roofline_note(src: Accelerator = H200, dst: Accelerator = H20) -> dict:
    """The ratios the scaling uses, for reports."""
    return {"flops_ratio": src.bf16_dense_flops / dst.bf16_dense_flops,
            "bandwidth_ratio": src.hbm_bytes_per_s / dst.hbm_bytes_per_s,
            "ridge_src": src.ridge, "ridge_dst": dst.ridge}


def table() -> list[dict]:
    """The published hardware figures with their sources."""
    return [{"gpu": a.name, "bf16_dense_tflops": a.bf16_dense_flops / 1e12, "hbm_tb_s": a.hbm_bytes_per_s / 1e12,
             "hbm_gb": a.hbm_bytes / 1e9, "source": a.source} for a in (H200, H20)]


__all__ = ["ASSUMED", "Accelerator", "DecodeBound", "GPUS_PER_INSTANCE", "H20", "H200", "ModelSize", "decode_batch",
           "roofline_note", "scale_prefill",
           "scale_prefill_split", "table"]
