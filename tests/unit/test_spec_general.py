"""The general layer spec: layers of named token and state components, their sizes worked out by
hand, and one fingerprint per layout whichever route built it."""

import json

import pytest

from kvlink.errors import SpecError
from kvlink.spec import (MLA, CacheSpec, FullAttention, Layer, LinearAttention, SlidingWindow, StateTensor,
                         TokenTensor)

# Falcon-H1 style: attention K/V and a Mamba conv + SSM state in one layer.
FALCON = Layer((TokenTensor("k", (2, 8)), TokenTensor("v", (2, 8))),
               (StateTensor("conv", (12, 3), "bfloat16"), StateTensor("ssm", (2, 4, 4), "float32")), variant="mamba2")
# MiMo style: sliding layers with 8 KV heads of 4, full layers with 4 heads of 6.
MIMO_SLIDING = SlidingWindow(8, 4, window=8)
MIMO_FULL = FullAttention(4, 6)
# An MLA latent plus fp8 indexer keys (DeepSeek V3.2 style).
MLA_INDEXED = Layer((TokenTensor("latent", (20,)), TokenTensor("index_k", (1, 8), "float8_e4m3fn")))
# Chunked-local attention (Llama 4 style), chunks of 8 tokens.
CHUNKED = Layer((TokenTensor("k", (1, 4), window="chunked", size=8), TokenTensor("v", (1, 4), window="chunked", size=8)))
MLP_ONLY = Layer()
# Several states of integer and bool dtypes in one layer (counters, masks, a buffer).
COUNTERS = Layer((), (StateTensor("pos", (1,), "int64"), StateTensor("counts", (2, 3), "int32"),
                      StateTensor("mask", (4,), "bool"), StateTensor("buf", (3,))))

MIXED = CacheSpec("mixed", (FALCON, MIMO_SLIDING, MIMO_FULL, MLA_INDEXED, CHUNKED, MLP_ONLY, COUNTERS))

# By hand: bytes per token of full-window tensors, and of the windowed ones.
FULL_PER_TOKEN = 2 * 8 * 2 * 2 + 4 * 6 * 2 * 2 + (20 * 2 + 8 * 1)    # falcon K/V + mimo full + latent/indexer
SLIDING_PER_TOKEN = 8 * 4 * 2 * 2                                       # 128, window 8
CHUNKED_PER_TOKEN = 1 * 4 * 2 * 2                                       # 16, chunks of 8
STATES = 12 * 3 * 2 + 2 * 4 * 4 * 4 + (8 + 2 * 3 * 4 + 4 * 1 + 3 * 4)  # falcon conv + ssm, counters layer


def test_layer_kinds_and_sizes_by_hand():
    assert [layer.kind for layer in MIXED.layers] == ["hybrid", "sliding", "full", "full", "chunked", "none", "linear"]
    assert FALCON.bytes_per_token == 64 and FALCON.state_bytes == 72 + 128
    assert MLA(16, 4).kind == "mla" and MLA_INDEXED.bytes_per_token == 48
    assert MIMO_SLIDING.bytes_per_token == 0, "windowed tensors do not count per token"
    assert COUNTERS.state_bytes == 48 and MLP_ONLY.state_bytes == 0 and MLP_ONLY.components == ()
    assert MIXED.kv_bytes_per_token == FULL_PER_TOKEN == 208
    assert MIXED.state_bytes == STATES == 248
    assert MIXED.window_tokens == 8
    assert MIXED.fixed_state_bytes == STATES + 8 * SLIDING_PER_TOKEN + 7 * CHUNKED_PER_TOKEN


@pytest.mark.parametrize("tokens", [0, 1, 7, 8, 13, 16, 21, 100])
def test_bytes_at_by_hand(tokens):
    chunk_live = tokens - tokens // 8 * 8
    expected = FULL_PER_TOKEN * tokens + SLIDING_PER_TOKEN * min(tokens, 8) + CHUNKED_PER_TOKEN * chunk_live + STATES
    assert MIXED.bytes_at(tokens) == expected
    assert MIXED.bytes_at(tokens) <= FULL_PER_TOKEN * tokens + MIXED.fixed_state_bytes


def test_chunked_window_live_range():
    k = CHUNKED.tokens[0]
    assert [k.live_start(n) for n in (0, 1, 7, 8, 13, 16, 23)] == [0, 0, 0, 8, 8, 16, 16]
    assert k.max_live == 7
    assert CHUNKED.window_bytes(13) == 5 * 16 and CHUNKED.window_bytes(16) == 0
    sliding = MIMO_SLIDING.tokens[0]
    assert [sliding.live_start(n) for n in (3, 8, 13)] == [0, 0, 5] and sliding.max_live == 8


def test_groups():
    assert MIXED.group("full") == [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert MIXED.group("window") == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert MIXED.group("state") == [(0, 2), (0, 3), (6, 0), (6, 1), (6, 2), (6, 3)]
    with pytest.raises(SpecError, match="group"):
        MIXED.group("sliding")


def test_to_dict_round_trip_through_json_keeps_the_fingerprint():
    data = json.loads(json.dumps(MIXED.to_dict()))
    back = CacheSpec.from_dict(data)
    assert back == MIXED
    assert back.fingerprint == MIXED.fingerprint
    assert back.layers[0].variant == "mamba2"


def test_fingerprint_is_the_same_whichever_route_built_the_layout():
    def fp(*layers):
        return CacheSpec("m", layers).fingerprint

    assert fp(FullAttention(2, 8)) == fp(Layer((TokenTensor("k", (2, 8)), TokenTensor("v", (2, 8)))))
    assert fp(SlidingWindow(2, 8, window=5)) == fp(Layer((TokenTensor("k", (2, 8), window="sliding", size=5),
                                                          TokenTensor("v", (2, 8), window="sliding", size=5))))
    assert fp(MLA(16, 4)) == fp(Layer((TokenTensor("latent", (20,)),)))
    assert fp(LinearAttention((2, 4, 4), "float32", (12, 3), "bfloat16")) == fp(
        Layer((), (StateTensor("conv", (12, 3), "bfloat16"), StateTensor("recurrent", (2, 4, 4), "float32"))))
    # variants and notes are informative only
    assert fp(LinearAttention((2, 4), variant="kda")) == fp(LinearAttention((2, 4), variant="mamba2"))
    assert CacheSpec("m", (FALCON,), notes="x").fingerprint == CacheSpec("m", (FALCON,), notes="y").fingerprint


def _variants():
    """Layouts that each differ from FALCON in one respect."""
    k, v = FALCON.tokens
    conv, ssm = FALCON.states
    return {
        "token name": Layer((TokenTensor("key", (2, 8)), v), FALCON.states),
        "token shape": Layer((TokenTensor("k", (2, 4)), v), FALCON.states),
        "token dtype": Layer((TokenTensor("k", (2, 8), "float16"), v), FALCON.states),
        "token window": Layer((TokenTensor("k", (2, 8), window="sliding", size=4), v), FALCON.states),
        "window size": Layer((TokenTensor("k", (2, 8), window="sliding", size=5), v), FALCON.states),
        "chunked vs sliding": Layer((TokenTensor("k", (2, 8), window="chunked", size=4), v), FALCON.states),
        "state name": Layer(FALCON.tokens, (conv, StateTensor("recurrent", (2, 4, 4)))),
        "state shape": Layer(FALCON.tokens, (conv, StateTensor("ssm", (2, 4, 2)))),
        "state dtype": Layer(FALCON.tokens, (conv, StateTensor("ssm", (2, 4, 4), "bfloat16"))),
        "state order": Layer(FALCON.tokens, (ssm, conv)),
        "token order": Layer((v, k), FALCON.states),
        "state dropped": Layer(FALCON.tokens, (conv,)),
    }


@pytest.mark.parametrize("what", sorted(_variants()))
def test_fingerprint_changes_with_any_component(what):
    base = CacheSpec("m", (FALCON, MIMO_FULL))
    changed = CacheSpec("m", (_variants()[what], MIMO_FULL))
    assert changed.fingerprint != base.fingerprint


def test_fingerprint_tells_token_from_state_and_layer_boundaries():
    as_token = Layer((TokenTensor("x", (4,), "float32"),))
    as_state = Layer((), (StateTensor("x", (4,), "float32"),))
    assert CacheSpec("m", (as_token,)).fingerprint != CacheSpec("m", (as_state,)).fingerprint
    # the same components, split over layers differently
    together = CacheSpec("m", (FullAttention(2, 8), Layer()))
    k, v = FullAttention(2, 8).tokens
    apart = CacheSpec("m", (Layer((k,)), Layer((v,))))
    assert together.fingerprint != apart.fingerprint
    assert CacheSpec("m", (MLP_ONLY, MIMO_FULL)).fingerprint != CacheSpec("m", (MIMO_FULL, MLP_ONLY)).fingerprint


@pytest.mark.parametrize("make", [
    lambda: Layer((TokenTensor("k", (2, 8)), TokenTensor("k", (2, 8)))),                   # duplicate token names
    lambda: Layer((TokenTensor("conv", (2,)),), (StateTensor("conv", (2,)),)),             # token and state share a name
    lambda: TokenTensor("k", (2, 8), window="sliding", size=0),                            # sliding needs a size
    lambda: TokenTensor("k", (2, 8), window="chunked"),                                    # chunked needs a size
    lambda: TokenTensor("k", (2, 8), window="full", size=4),                               # full with a size
    lambda: TokenTensor("k", (2, 8), window="sliding", size=-3),
    lambda: TokenTensor("k", (2, 8), window="ring", size=4),                               # unknown window
    lambda: TokenTensor("", (2,)),                                                          # bad names
    lambda: TokenTensor("k" * 65, (2,)),
    lambda: TokenTensor("ключ", (2,)),
    lambda: StateTensor("a\nb", (2,)),
    lambda: StateTensor(7, (2,)),
    lambda: TokenTensor("k", (1, 2, 3, 4, 5, 6)),                                          # > 5 dims
    lambda: StateTensor("s", (1, 2, 3, 4, 5, 6)),
    lambda: StateTensor("s", ()),                                                           # a state needs a dim
    lambda: StateTensor("s", (2, 0)),
    lambda: TokenTensor("k", (2.0, 8)),
    lambda: StateTensor("s", (2,), "float64"),                                              # unknown dtype
    lambda: Layer((StateTensor("s", (2,)),)),                                               # a state among tokens
    lambda: CacheSpec("empty", (Layer(), Layer())),                                         # nothing anywhere
    lambda: CacheSpec("x", (FullAttention(2, 8), "layer")),
    lambda: CacheSpec.from_dict({"name": "x", "layers": [{"tokens": [["k", [2], "bfloat16"]]}]}),
    lambda: CacheSpec.from_dict({"name": "x", "layers": [{"states": [["s", [2], "float32", "extra"]]}]}),
    lambda: CacheSpec.from_dict({"name": "x", "layers": ["not a dict"]}),
    lambda: CacheSpec.from_dict({"layers": []}),
])
def test_bad_specs_raise_spec_error(make):
    with pytest.raises(SpecError):
        make()


def test_five_dims_are_fine():
    spec = CacheSpec("d", (Layer((TokenTensor("t", (1, 2, 1, 2, 1)),), (StateTensor("s", (1, 1, 2, 1, 1), "int32"),)),))
    assert spec.kv_bytes_per_token == 4 * 2 and spec.state_bytes == 2 * 4


def test_fingerprint_follows_the_documented_recipe():
    """docs/wire-format.md: sha256("kvlink-spec-v2\\0" + canonical JSON)[:16], worked out here
    without the spec's own canon() methods, so a change to the fingerprint cannot go unnoticed."""
    import hashlib

    def comp(c):
        if isinstance(c, StateTensor):
            return ["state", c.name, list(c.shape), c.dtype]
        return ["token", c.name, list(c.shape), c.dtype, c.window, c.size]

    layers = [[comp(c) for c in (*layer.tokens, *layer.states)] for layer in MIXED.layers]
    blob = json.dumps({"name": "mixed", "layers": layers}, sort_keys=True, separators=(",", ":")).encode()
    assert blob.startswith(b'{"layers":[[["token","k",[2,8],"bfloat16","full",0],')
    assert MIXED.fingerprint == hashlib.sha256(b"kvlink-spec-v2\0" + blob).digest()[:16]


@pytest.mark.parametrize("make", [
    lambda: TokenTensor("latent", 576),                       # a bare int for a shape (was a TypeError)
    lambda: StateTensor("pos", 1),
    lambda: Layer(TokenTensor("k", (2, 8))),                  # a lone component for a tuple of them
    lambda: Layer((), StateTensor("s", (2,))),
    lambda: CacheSpec("x", FullAttention(2, 8)),              # a lone layer
    # equal layouts must fingerprint equal: size=True would canonicalise as `true`, not 1, and a
    # non-str name would come back from to_dict/from_dict as a str (were accepted)
    lambda: TokenTensor("k", (2, 8), window="sliding", size=True),
    lambda: CacheSpec.from_dict({"name": "x", "layers": [{"tokens": [["k", [2], "bfloat16", "sliding", True]]}]}),
    lambda: CacheSpec(5, (FullAttention(2, 8),)),
])
def test_malformed_arguments_are_spec_errors_not_type_errors(make):
    with pytest.raises(SpecError):
        make()
