"""Routing decisions, the threshold solver against the paper's case study, the scheduler, and
the simulator's conservation laws."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest

from kvlink.errors import ConfigError
from kvlink.route import (Empirical, LengthDist, PrefillProfile, Router, Scheduler, SchedulerConfig,
                          evaluate, simulate, solve_threshold)
from kvlink.route import cases
from kvlink.route import hardware as hw
from kvlink.route.model import best_split
from kvlink.transport.congestion import LinkSnapshot


def test_scarce_bandwidth_judges_by_the_local_cache_only():
    router = Router(threshold=10_000)
    # the remote pool holds a long prefix, but with scarce bandwidth it does not count
    d = router.route(30_000, {"local": 25_000, "remote": 29_000}, bandwidth_abundant=False)
    assert d.cluster == "local" and d.incremental == 5_000 and d.transfer is None
    d = router.route(30_000, {"local": 0, "remote": 29_000}, bandwidth_abundant=False)
    assert d.cluster == "remote" and d.prefix == 29_000 and d.incremental == 1_000 and d.transfer is None


def test_abundant_bandwidth_uses_the_longest_prefix_and_orders_a_cache_transfer():
    router = Router(threshold=10_000)
    d = router.route(30_000, {"local": 4_000, "remote": 28_000}, bandwidth_abundant=True)
    assert d.cluster == "local" and d.incremental == 2_000 and d.prefix == 28_000
    assert d.transfer is not None and (d.transfer.source, d.transfer.dest) == ("remote", "local")
    assert (d.transfer.start, d.transfer.end) == (4_000, 28_000)
    d = router.route(60_000, {"local": 20_000, "remote": 0}, bandwidth_abundant=True)
    assert d.cluster == "remote" and d.incremental == 40_000
    assert d.transfer is not None and (d.transfer.source, d.transfer.dest) == ("local", "remote")
    d = router.route(60_000, {"local": 0, "remote": 20_000}, bandwidth_abundant=True)
    assert d.cluster == "remote" and d.transfer is None  # the holder is the chosen cluster


def test_router_rejects_impossible_inputs():
    with pytest.raises(ConfigError):
        Router(1000).route(100, {"local": 200}, True)
    with pytest.raises(ConfigError):
        Router(1000).route(100, {"elsewhere": 10}, True)


def test_fitted_inputs_reproduce_the_case_study_within_5_percent():
    # fitted inputs are solved from Theta_pdp, Theta_pdd and homogeneous Lambda_max: those match by
    # construction; the threshold, offloaded share, Theta_prfaas and PrfaaS-PD's Lambda_max do not
    paper = cases.PAPER
    got = {}
    for key, (dep, local) in cases.deployments("fitted").items():
        result = best_split(cases.DIST, dep, local)[1] if local else solve_threshold(cases.DIST, dep)
        got[key] = result
        assert result.lambda_max == pytest.approx(paper[key]["lambda"], rel=0.05)
    assert got["prfaas"].threshold == pytest.approx(paper["threshold"], rel=0.05)
    assert got["prfaas"].p == pytest.approx(paper["offloaded"], rel=0.05)
    assert got["prfaas"].theta_prfaas == pytest.approx(paper["prfaas"]["theta_prfaas"], rel=0.05)


def test_solver_finds_the_best_threshold_and_respects_the_link_limit():
    dep = cases.deployments("fitted")["prfaas"][0]
    best = solve_threshold(cases.DIST, dep)
    for t in np.geomspace(512, 131072, 40):
        assert evaluate(cases.DIST, dep, float(t)).lambda_max <= best.lambda_max * (1 + 1e-9)
    # a thin link: the solver keeps egress under it by offloading fewer, longer requests
    thin = solve_threshold(cases.DIST, replace(dep, link_bps=5e9))
    assert thin.egress_bps <= 5e9 and thin.threshold > best.threshold and thin.lambda_max < best.lambda_max


def test_split_search_finds_the_papers_splits_with_fitted_inputs():
    deps = cases.deployments("fitted")
    assert best_split(cases.DIST, deps["prfaas"][0], 8)[0].local_prefill == 3
    assert best_split(cases.DIST, deps["homogeneous"][0], 12)[0].local_prefill == 9


def test_scheduler_resolves_on_congestion_and_keeps_a_bounded_window():
    dep = cases.deployments("fitted")["prfaas"][0]
    router = Router(threshold=50_000)
    sched = Scheduler(dep, 8, router, SchedulerConfig(window=500, min_samples=50, resolve_every=1e9,
                                                      rebalance_every=1e9))
    rng = np.random.default_rng(0)
    for length in cases.DIST.sample(rng, 2000):
        sched.observe(length)
    assert len(sched.lengths) == 500
    sched.last_rebalance = sched.last_solve = 0.0  # as if both had just run
    assert sched.tick(1.0, None, {"local": 0}) == []  # nothing due, nothing wrong
    snap = LinkSnapshot(1.0, 100e9, None, None, 90e9, 0.9, 1.0, 0.5, 0.0, 0, 0, "paced")
    assert not sched.bandwidth_abundant  # no snapshot yet
    actions = sched.tick(2.0, snap, {"local": 0})
    assert actions and "link near its limit" in actions[0]
    assert not sched.bandwidth_abundant  # 90% used: judge by the local cache only
    assert router.threshold == pytest.approx(cases.PAPER["threshold"], rel=0.15)
    # a smaller available bandwidth raises the threshold (fewer, longer offloads)
    thin = LinkSnapshot(3.0, 4e9, None, None, 3.9e9, 0.97, 1.0, 0.5, 0.0, 0, 0, "paced")
    before = router.threshold
    sched.tick(3.0, thin, {})
    assert router.threshold > before and sched.last.egress_bps <= 0.8 * 4e9
    quiet = LinkSnapshot(4.0, 100e9, None, None, 10e9, 0.1, 1.0, 0.5, 0.0, 0, 0, "startup")
    sched.tick(4.0, quiet, {})
    assert sched.bandwidth_abundant


def test_simulator_conservation_and_link_capacity():
    dep = cases.deployments("fitted")["prfaas"][0]
    result = simulate("prfaas", dep, cases.DIST, 19_400, 3.0, duration_s=400, seed=3)
    assert result.finished == result.arrived > 0  # every request finishes, once
    assert result.link_peak_bps <= dep.link_bps * (1 + 1e-9)
    assert 0 < result.link_utilisation <= 1
    assert 0.4 < result.offloaded < 0.6


def test_simulator_saturates_at_lambda_max():
    dep = cases.deployments()["naive"][0]
    lam = solve_threshold(cases.DIST, dep).lambda_max
    result = simulate("naive", dep, cases.DIST, float("inf"), 1.3 * lam, duration_s=1500, seed=1)
    assert result.throughput_rps == pytest.approx(lam, rel=0.08)


def test_profiles_fit_and_sample():
    prof = PrefillProfile.fit("x", [1, 2, 3, 4], [1, 4, 9, 16])
    assert prof(5) == pytest.approx(25)
    dist = LengthDist(9.9, 1.0, 128, 131072)
    s = dist.sample(np.random.default_rng(0), 5000)
    assert s.min() >= 128 and s.max() <= 131072
    assert np.median(s) == pytest.approx(np.exp(9.9), rel=0.1)
    with pytest.raises(ConfigError):
        Empirical([])


def test_plan_toml_reproduces_the_case_and_rejects_malformed_plans(tmp_path):
    from pathlib import Path

    from kvlink.route.plan import load_plan, run_plan

    example = Path(__file__).parents[2] / "examples" / "plan-prfaas.toml"
    dist, plans = load_plan(example)
    assert set(plans) == {"prfaas-pd", "homogeneous-pd", "naive-hetero"}
    result = run_plan(example, duration=200)
    lam = {k: v["model"]["lambda_max"] for k, v in result["systems"].items()}
    assert lam["prfaas-pd"] == pytest.approx(3.24, rel=0.02) and lam["homogeneous-pd"] == pytest.approx(2.11, rel=0.02)
    assert result["systems"]["homogeneous-pd"]["model"]["threshold"] is None
    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace("[decode]", "[decoder]"))
    with pytest.raises(ConfigError, match="malformed plan"):
        load_plan(bad)


def test_independent_inputs_do_not_read_the_papers_results(monkeypatch):
    before = (cases.independent_h20(), cases.independent_decode(), cases.inputs_for("independent"))
    fitted_before = cases.inputs_for("fitted")
    changed = copy.deepcopy(cases.PAPER)
    changed["threshold"] = 40_000
    for key in ("prfaas", "homogeneous", "naive"):
        changed[key]["lambda"] *= 1.7
    changed["prfaas"].update(theta_pdp=0.9, theta_pdd=7.0, theta_prfaas=3.0)
    monkeypatch.setattr(cases, "PAPER", changed)
    assert (cases.independent_h20(), cases.independent_decode(), cases.inputs_for("independent")) == before
    # the fitted derivation does read them: the comparison above could have failed
    assert cases.inputs_for("fitted") != fitted_before


def test_independent_h20_profile_scales_the_h200_one_by_datasheet_ratios():
    h20, h200 = cases.independent_h20(), cases.H200
    flops = hw.H200.bf16_dense_flops / hw.H20.bf16_dense_flops
    assert flops == pytest.approx(989 / 148) and h20.c == pytest.approx(h200.c * flops)
    assert h20.b == pytest.approx(h200.b * flops) and h20.a == pytest.approx(h200.a * 4.8 / 4.0)
    for length in (128, 1024, 32768, 131072):  # slower than an H200, never by more than the compute ratio
        assert 1.2 <= h20(length) / h200(length) <= flops
    # the sensitivity variant keeps only the assumed compute floor of b on the BF16 ratio
    split = cases.split_h20()
    floor = 2 * cases.MODEL.active_params / (8 * hw.H200.bf16_dense_flops)
    assert split.b == pytest.approx(floor * flops + (h200.b - floor) * 1.2) and split.b < h20.b


def test_decode_batch_obeys_the_slo_memory_and_compute():
    dec = cases.independent_decode()
    bw = 8 * hw.H20.hbm_bytes_per_s
    step = lambda b: cases.MODEL.weight_bytes / bw + b * dec.kv_read_bytes / bw  # noqa: E731
    assert step(dec.by_bandwidth) <= cases.T_DECODE < step(dec.by_bandwidth + 1)
    free = 8 * hw.H20.hbm_bytes - cases.MODEL.weight_bytes
    assert dec.by_capacity * dec.kv_held_bytes <= free < (dec.by_capacity + 1) * dec.kv_held_bytes
    assert dec.batch == min(dec.by_bandwidth, dec.by_compute, dec.by_capacity) > 0
    with pytest.raises(ConfigError, match="do not fit"):  # FP8 weights of a 1T model exceed 8 x 96 GB
        hw.decode_batch(hw.H20, 8, hw.ModelSize(weight_bytes_per_param=1.0), cases.KV, cases.DIST, 0.025, 1024)


def test_cli_table_marks_each_input_and_compares_with_the_paper(capsys):
    from kvlink.cli import main

    assert main(["sim", "--duration", "60"]) == 0
    text = capsys.readouterr().out
    kinds = {row["kind"] for row in cases.input_table("independent")}
    assert kinds == {"published", "independent", "assumed"}  # nothing fitted by default
    assert "FITTED" not in text and "independent" in text and "b_H200 x BF16 ratio 6.68" in text
    assert "PrfaaS-PD Lambda_max (req/s)" in text and "ratio" in text
    assert main(["sim", "--inputs", "fitted", "--duration", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    fitted = {row["input"] for row in result["input_table"] if row["kind"] == "fitted"}
    assert fitted == {"8xH20 profile", "BS_max per 8xH20 decode"}
    lam = next(r for r in result["comparison"] if r["figure"] == "homogeneous PD Lambda_max (req/s)")
    assert lam["ratio"] == pytest.approx(1.0, abs=0.01) and lam["diff"] == pytest.approx(0.0, abs=0.02)
