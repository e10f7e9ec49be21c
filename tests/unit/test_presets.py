"""Presets reproduce the figures of the shared cache-layouts reference."""

import pytest

from kvlink.errors import SpecError
from kvlink.presets import PRESETS, get_preset
from kvlink.spec import CacheSpec

MiB, GiB = 2**20, 2**30

# name: (layers, full-attention layers, KV B/token, fixed state MiB, total @32K, total @128K in GiB)
TABLE = {
    "kimi-linear-48b-a3b": (27, 7, 8064, 41.4, 293 * MiB, 1.02),
    "mimo-v2-flash": (48, 9, 23040, 24.4, 744 * MiB, 2.84),
    "qwen3.5-397b-a17b": (60, 15, 30720, 183.2, 1.12 * GiB, 3.93),
    "qwen3-next-80b-a3b": (48, 12, 24576, 73.7, 842 * MiB, 3.07),
    "ring-2.5-1t": (80, 10, 11520, 280.0, 640 * MiB, 1.68),
    "minimax-m2.5": (62, 62, 253952, 0.0, 7.75 * GiB, 31.0),
    "qwen3-235b-a22b": (94, 94, 192512, 0.0, 5.88 * GiB, 23.5),
    "deepseek-v3": (61, 61, 70272, 0.0, 2.14 * GiB, 8.58),
    "llama-3-70b": (80, 80, 327680, 0.0, 10 * GiB, 40.0),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_figures(name):
    layers, full, per_token, state_mib, at32k, at128k_gib = TABLE[name]
    spec = get_preset(name)
    assert spec.num_layers == layers
    assert len(spec.layer_indices("full", "mla")) == full
    assert spec.kv_bytes_per_token == per_token
    assert spec.fixed_state_bytes / MiB == pytest.approx(state_mib, abs=0.05)
    assert spec.bytes_at(32768) == pytest.approx(at32k, rel=0.005)
    assert spec.bytes_at(131072) / GiB == pytest.approx(at128k_gib, rel=0.005)


def test_layer_positions_follow_configs():
    assert get_preset("kimi-linear-48b-a3b").layer_indices("mla") == [3, 7, 11, 15, 19, 23, 26]
    assert get_preset("mimo-v2-flash").layer_indices("full") == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert get_preset("qwen3-next-80b-a3b").layer_indices("full") == list(range(3, 48, 4))
    assert len(get_preset("mimo-v2-flash").layer_indices("sliding")) == 39


def test_exact_issue_figures():
    assert get_preset("kimi-linear-48b-a3b").kv_bytes_per_token == 7 * 576 * 2
    assert get_preset("deepseek-v3").kv_bytes_per_token == 61 * 576 * 2
    assert get_preset("llama-3-70b").kv_bytes_per_token == 80 * 8 * 128 * 2 * 2


def test_fingerprints_distinct_and_stable():
    prints = {name: get_preset(name).fingerprint for name in PRESETS}
    assert len(set(prints.values())) == len(prints)
    for name, fp in prints.items():
        spec = get_preset(name)
        assert CacheSpec.from_dict(spec.to_dict()).fingerprint == fp
        assert len(fp) == 16


def test_unknown_preset_is_typed():
    with pytest.raises(SpecError, match="unknown preset"):
        get_preset("no-such-model")
