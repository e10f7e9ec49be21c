import pytest

from kvlink.errors import SpecError
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow


def test_sliding_window_is_capped():
    spec = CacheSpec("t", (FullAttention(2, 8), SlidingWindow(2, 8, window=4)))
    per_token = 2 * (8 + 8) * 2
    assert spec.kv_bytes_per_token == per_token
    assert spec.bytes_at(3) == 3 * per_token + 3 * per_token
    assert spec.bytes_at(100) == 100 * per_token + 4 * per_token
    assert spec.fixed_state_bytes == 4 * per_token


def test_state_dtype_is_carried():
    fp32 = LinearAttention((4, 8, 8), "float32", (16, 3), "bfloat16")
    bf16 = LinearAttention((4, 8, 8), "bfloat16", (16, 3), "bfloat16")
    assert fp32.state_bytes == 4 * 8 * 8 * 4 + 16 * 3 * 2
    assert bf16.state_bytes == 4 * 8 * 8 * 2 + 16 * 3 * 2
    assert CacheSpec("x", (fp32,)).fingerprint != CacheSpec("x", (bf16,)).fingerprint


def test_fingerprint_covers_name_and_shapes():
    a = CacheSpec("a", (MLA(512, 64),))
    assert a.fingerprint != CacheSpec("b", (MLA(512, 64),)).fingerprint
    assert a.fingerprint != CacheSpec("a", (MLA(512, 32),)).fingerprint
    assert a.fingerprint == CacheSpec("a", (MLA(512, 64),), notes="other notes").fingerprint


@pytest.mark.parametrize("make", [
    lambda: FullAttention(0, 8),
    lambda: FullAttention(2, 8, dtype="float64"),
    lambda: SlidingWindow(2, 8),
    lambda: LinearAttention((0, 4)),
    lambda: LinearAttention(tuple(range(1, 8))),
    lambda: CacheSpec("empty", ()),
    lambda: CacheSpec.from_dict({"name": "x", "layers": [{"kind": "nope"}]}),
])
def test_bad_specs_raise_spec_error(make):
    with pytest.raises(SpecError):
        make()
