"""The command line, run as a real subprocess."""

import json

import pytest
import subprocess
import sys


def kvlink(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "kvlink.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_spec_json_matches_reference_figures():
    proc = kvlink("spec", "kimi-linear-48b-a3b", "--tokens", "1024,32768,131072", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kv_bytes_per_token"] == 8064
    assert data["totals"]["32768"] == 8064 * 32768 + data["fixed_state_bytes"]


def test_spec_text_and_unknown_preset():
    assert "70,272" in kvlink("spec", "deepseek-v3").stdout
    proc = kvlink("spec", "not-a-model")
    assert proc.returncode == 2 and "unknown preset" in proc.stderr


def test_demo_two_processes_prefix_hit_and_bit_exact():
    pytest.importorskip("transformers")
    proc = kvlink("demo", "--tokens", "512", "--extra", "64", "--steps", "4", "--lab", "off")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("tokens and logits identical to the uninterrupted run") == 3  # two requests + result
    assert "decode pool holds 0, so prefill computes and sends 512" in out
    assert "decode pool holds 512, so prefill computes and sends 64" in out and "reused 512 tokens" in out


def test_bench_serde_json():
    proc = kvlink("bench", "serde", "--tokens", "2048", "--repeat", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["pack"]["bit_exact"] is True
    assert data["pack"]["memcpy_gbps"] > 0
    codecs = {(r["data"], r["codec"]): r for r in data["codecs"]}
    assert all(r["lossless"] for (d, c), r in codecs.items() if c not in ("fp8-e4m3", "xxh3 checksum"))


def test_sim_prfaas_case_prints_the_papers_figures(tmp_path):
    proc = kvlink("sim", "--case", "prfaas-1t", "--duration", "600", "--plots", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "threshold t (tokens)" in out and "19400" in out
    for line in ("PrfaaS-PD", "homogeneous PD", "naive heterogeneous"):
        assert line in out
    assert (tmp_path / "threshold_search.png").stat().st_size > 1000
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 1000
    # The default run takes no input from the results it is compared to, and says so.
    assert "inputs: independent" in out and "FITTED" not in out
    data = json.loads(kvlink("sim", "--duration", "300", "--json").stdout)
    assert data["inputs"] == "independent"
    # The old derivation (two inputs solved from Table 6) still reproduces the paper by construction.
    fitted = json.loads(kvlink("sim", "--duration", "300", "--inputs", "fitted", "--json").stdout)
    assert abs(fitted["systems"]["prfaas"]["model"]["lambda_max"] - 3.24) / 3.24 < 0.05


def test_spec_of_a_transformers_config_is_the_adapter_spec(tmp_path):
    from transformers import MistralConfig

    from kvlink.engine.hf import spec_from_config

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    config.save_pretrained(tmp_path)
    proc = kvlink("spec", "--hf-config", str(tmp_path), "--tokens", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["fingerprint"] == spec_from_config(config).fingerprint.hex()
    assert data["totals"]["100"] == 2 * 7 * 1 * 16 * 2 * 4  # 2 layers keep 7 tokens of K and V, 1 head of 16, fp32
    bad = kvlink("spec", "--hf-config", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "cannot read a transformers config" in bad.stderr
    assert kvlink("spec").returncode == 2
