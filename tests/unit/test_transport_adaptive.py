"""Adaptive codec choice: raw bytes when the link outruns the codecs, compression when it does not."""

import random

import pytest

from kvlink.bench.serde import realistic_kv, realistic_state
from kvlink.codec import Codec
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, PagedCache
from kvlink.serde.layout import payload_segments
from kvlink.transport.adaptive import CodecAdvisor


@pytest.fixture(scope="module")
def calibrated():
    spec = get_preset("kimi-linear-48b-a3b")
    cache = PagedCache.allocate(spec, 64, 16, 1)
    for layer in spec.layer_indices("mla"):
        for _, rows in cache.planes(layer):
            rows.copy_(realistic_kv(rows.shape[0], rows.shape[1], seed=layer))
    for layer in spec.layer_indices("linear"):
        for _, pool in cache.states(layer):
            pool.copy_(realistic_state(pool.numel(), seed=layer).view(pool.shape).to(pool.dtype))
    ref = CacheRef(random.Random(0).sample(range(64), 64), 1024, 0)
    advisor = CodecAdvisor(cores=2)
    advisor.calibrate_cache(cache, ref)
    return advisor, payload_segments(spec, range(spec.num_layers), 0, 1024)


def test_every_segment_class_is_profiled(calibrated):
    advisor, segments = calibrated
    assert {("kv", "bfloat16"), ("state", "float32"), ("state", "bfloat16")} <= set(advisor.profiles)
    for profiles in advisor.profiles.values():
        assert {p.codec for p in profiles} == {Codec.NONE, Codec.SHUFFLE_LZ4, Codec.SHUFFLE_ZSTD}
        assert all(p.ratio > 0 and p.encode_bps > 0 for p in profiles)


def test_slow_link_compresses_fast_link_sends_raw(calibrated):
    advisor, segments = calibrated
    kv = next(s for s in segments if not s.is_state)
    assert advisor.choose(kv, 1e6) is Codec.SHUFFLE_ZSTD  # 1 Mbit/s: the wire is everything
    assert advisor.choose(kv, 1e13) is Codec.NONE         # 10 Tbit/s: no codec keeps up
    assert advisor.choose(kv, None) is Codec.NONE         # no estimate yet
    codecs = advisor.codecs(segments, 1e6)
    assert len(codecs) == len(segments) and set(codecs.values()) <= {Codec.SHUFFLE_ZSTD, Codec.SHUFFLE_LZ4}


def test_choice_minimises_modelled_delivery_time(calibrated):
    advisor, segments = calibrated
    kv = next(s for s in segments if not s.is_state)
    for rate in (1e8, 1e9, 1e10, 1e11):
        chosen = advisor.choose(kv, rate)
        times = {p.codec: advisor.delivery_time(p, kv.nbytes, rate) for p in advisor.profiles[("kv", kv.dtype)]}
        assert times[chosen] == min(times.values())


def test_lossy_only_when_allowed_and_never_for_state():
    seg_kv = payload_segments(get_preset("kimi-linear-48b-a3b"), [3], 0, 256)[0]
    seg_state = payload_segments(get_preset("kimi-linear-48b-a3b"), [0], 0, 256)[-1]
    lossless = CodecAdvisor()
    assert all(not p.codec.lossy for p in lossless.calibrate(seg_kv, realistic_kv(256, 576)))
    lossy = CodecAdvisor(allow_lossy=True)
    assert Codec.FP8_E4M3 in {p.codec for p in lossy.calibrate(seg_kv, realistic_kv(256, 576))}
    state = realistic_state(seg_state.numel).to(seg_state.torch_dtype)
    assert Codec.FP8_E4M3 not in {p.codec for p in lossy.calibrate(seg_state, state)}
    assert lossy.choose(seg_state, 1e3) is not Codec.FP8_E4M3
