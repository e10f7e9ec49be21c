"""Pack -> bytes -> unpack into other blocks is bit-exact, for every layout and codec."""

import pytest
import torch

from kvlink.codec import Codec
from kvlink.config import CodecConfig
from kvlink.errors import ConfigError, StagingExhausted
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, StagingArena, Unpacker

from .helpers import HYBRID, filled, moved, random_ref, same, snapshot, tokens_of

BS = 4


def _roundtrip(src, dst, src_ref, dst_ref, **kw):
    payload = Packer(src, **kw).pack(src_ref)
    wire = payload.tobytes()
    assert len(wire) == payload.nbytes
    written = Unpacker(dst).unpack(wire, dst_ref)
    assert written == list(range(src.spec.num_layers))
    return payload


def _assert_request_equal(src, src_ref, dst, dst_ref, t0=0):
    spec, t1 = src.spec, src_ref.num_tokens
    for layer, spec_layer in enumerate(spec.layers):
        for (_, a), (_, b) in zip(src.states(layer), dst.states(layer)):
            assert torch.equal(a[src_ref.state_slot], b[dst_ref.state_slot]), f"layer {layer} state"
        if not spec_layer.tokens:
            continue
        lo = max(t0, spec_layer.tokens[0].live_start(t1))
        for a, b in zip(tokens_of(src, src_ref, layer, lo, t1), tokens_of(dst, dst_ref, layer, lo, t1)):
            assert torch.equal(a, b), f"layer {layer}"


@pytest.mark.parametrize("layout", ["blocks_first", "kv_first", "split"])
@pytest.mark.parametrize("tokens", [1, BS, 4 * BS + 3, 9 * BS])
def test_roundtrip_layouts(layout, tokens):
    spec = HYBRID
    src = filled(spec, 16, BS, layout=layout, seed=1)
    dst = PagedCache.allocate(spec, 20, BS, 4, layout=layout, fill="zeros")
    src_ref = random_ref(16, BS, tokens, slot=2, seed=3)
    dst_ref = random_ref(20, BS, tokens, slot=1, seed=4)
    _roundtrip(src, dst, src_ref, dst_ref)
    _assert_request_equal(src, src_ref, dst, dst_ref)


def test_dest_layout_may_differ_from_source():
    src = filled(HYBRID, 16, BS, layout="kv_first")
    dst = PagedCache.allocate(HYBRID, 16, BS, 2, layout="split", fill="zeros")
    src_ref, dst_ref = random_ref(16, BS, 30, 0, seed=1), random_ref(16, BS, 30, 1, seed=2)
    _roundtrip(src, dst, src_ref, dst_ref)
    _assert_request_equal(src, src_ref, dst, dst_ref)


def test_unpack_touches_only_the_request():
    src = filled(HYBRID, 16, BS)
    dst = filled(HYBRID, 16, BS, seed=9)
    rows_before = dst.planes(3)[0][1].clone()
    states_before = [pool.clone() for _, pool in dst.states(0)]
    Unpacker(dst).unpack(Packer(src).pack(CacheRef([0, 1, 2], 10, 0)).tobytes(), CacheRef([3, 5, 7], 10, 1))
    rows = dst.planes(3)[0][1]
    untouched = [i for i in range(16) if i not in (3, 5, 7)]
    assert torch.equal(rows[untouched], rows_before[untouched])
    assert not torch.equal(rows[3], rows_before[3])
    elems = rows.shape[1] // BS
    assert torch.equal(rows[7, 2 * elems:], rows_before[7, 2 * elems:]), "tail of the last block was written"
    for (_, pool), before in zip(dst.states(0), states_before):
        assert torch.equal(pool[[0, 2]], before[[0, 2]])
        assert not torch.equal(pool[1], before[1])


def test_increment_from_token_start():
    src = filled(HYBRID, 16, BS)
    dst = PagedCache.allocate(HYBRID, 16, BS, 2, fill="zeros")
    src_ref = random_ref(16, BS, 37, slot=0, token_start=2 * BS, seed=5)
    dst_ref = random_ref(16, BS, 37, slot=1, seed=6)
    payload = Packer(src).pack(src_ref)
    assert payload.header.token_start == 2 * BS
    Unpacker(dst).unpack(payload.tobytes(), dst_ref)
    _assert_request_equal(src, src_ref, dst, dst_ref, t0=2 * BS)
    # tokens before token_start were not shipped
    for a in tokens_of(dst, dst_ref, 3, 0, 2 * BS):
        assert not a.view(torch.uint8).any()


def test_sliding_layer_ships_only_window():
    payload = Packer(filled(HYBRID, 16, BS)).pack(random_ref(16, BS, 25, seed=1), layers=[2])
    k, v = payload.segments
    assert (k.component, k.is_state, k.token_start, k.shape[0]) == (0, False, 25 - 6, 6)
    assert v.shape == (6, 2, 8)


def test_layer_by_layer_equals_whole():
    src = filled(HYBRID, 16, BS)
    ref = random_ref(16, BS, 27, seed=2)
    dst_a = PagedCache.allocate(HYBRID, 16, BS, 2, fill="zeros")
    dst_b = PagedCache.allocate(HYBRID, 16, BS, 2, fill="zeros")
    Unpacker(dst_a).unpack(Packer(src).pack(ref).tobytes(), ref)
    for layer in reversed(range(HYBRID.num_layers)):
        assert Unpacker(dst_b).unpack(Packer(src).pack_layer(ref, layer).tobytes(), ref) == [layer]
    assert same(snapshot(dst_a), snapshot(dst_b))


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "shuffle-lz4", "shuffle-zstd"])
def test_lossless_codecs_bit_exact(codec):
    src = filled(HYBRID, 16, BS)
    dst = PagedCache.allocate(HYBRID, 16, BS, 2, fill="zeros")
    ref = random_ref(16, BS, 40, seed=3)
    cfg = CodecConfig(kv_codec=codec, state_codec=codec)
    payload = _roundtrip(src, dst, ref, ref, codec=cfg)
    assert {s.codec for s in payload.segments} == {Codec.parse(codec)}
    _assert_request_equal(src, ref, dst, ref)


def test_shuffle_compresses_bf16_better():
    torch.manual_seed(0)
    values = (torch.randn(4096, 64) * 0.5).to(torch.bfloat16)
    from kvlink.codec import encode
    plain = len(encode(Codec.LZ4, values))
    shuffled = len(encode(Codec.SHUFFLE_LZ4, values))
    assert shuffled < 0.85 * plain


def test_fp8_on_kv_is_bounded_and_never_on_state():
    src = filled(HYBRID, 16, BS)
    ref = random_ref(16, BS, 40, seed=3)
    with pytest.raises(ConfigError, match="allow_lossy"):
        Packer(src, codec=CodecConfig(kv_codec="fp8-e4m3")).pack(ref)
    with pytest.raises(ConfigError, match="state"):
        Packer(src, codec=CodecConfig(state_codec="fp8-e4m3", allow_lossy=True)).pack(ref)
    dst = PagedCache.allocate(HYBRID, 16, BS, 2, fill="zeros")
    payload = Packer(src, codec=CodecConfig(kv_codec="fp8-e4m3", allow_lossy=True)).pack(ref)
    assert {s.codec for s in payload.segments if s.is_state} == {Codec.NONE}
    Unpacker(dst).unpack(payload.tobytes(), ref)
    for layer in (1, 3):
        for a, b in zip(tokens_of(src, ref, layer, 0, 40), tokens_of(dst, ref, layer, 0, 40)):
            a, b = a.float(), b.float()
            amax = a.abs().amax()
            # per-group scale <= amax/448; error <= max(2**-4 |x|, scale * 2**-9) (half-step bounds)
            bound = torch.maximum(a.abs() * 2**-4, torch.full_like(a, float(amax) / 448 * 2**-9)) + 1e-6
            assert ((a - b).abs() <= bound * 1.01).all()
            assert not torch.equal(a, b)


def test_staging_arena_ring_reuses_space():
    src = filled(HYBRID, 16, BS)
    ref = random_ref(16, BS, 40, seed=3)
    size = Packer(src).pack(ref).header.body_len
    arena = StagingArena(int(size * 2.6), pin=False)
    packer = Packer(src, staging=arena)
    a, b = packer.pack(ref), packer.pack(ref)
    with pytest.raises(StagingExhausted):
        packer.pack(ref)
    a.release()
    c = packer.pack(ref)  # wraps to the front
    assert c.tobytes() == b.tobytes()
    b.release(), c.release()
    assert arena.in_use == 0
    # segments are views into the arena: no copy between packing and sending
    d = packer.pack(ref)
    ptr = arena.buffer.data_ptr()
    seg_ptr = torch.frombuffer(d.datas[0], dtype=torch.uint8).data_ptr()
    assert ptr <= seg_ptr < ptr + arena.capacity


def test_from_buffer_views_without_copy():
    src = filled(HYBRID, 16, BS)
    wire = bytearray(Packer(src).pack(random_ref(16, BS, 20)).tobytes())
    payload = Payload.from_buffer(wire)
    payload.verify()
    wire[-1] ^= 1
    assert payload.datas[-1][-1] == wire[-1]


@pytest.mark.parametrize("codec", ["zstd", "shuffle-lz4"])
def test_large_payload_codecs_run_in_parallel_safely(codec):
    # > 8 MiB of segments takes the threaded encode/decode path (zstd objects are per thread)
    from kvlink.spec import CacheSpec, FullAttention

    spec = CacheSpec("wide", tuple(FullAttention(8, 128) for _ in range(3)))
    src = filled(spec, 300, 16, num_slots=1)
    dst = PagedCache.allocate(spec, 300, 16, 1, fill="zeros")
    ref = random_ref(300, 16, 4000, seed=1)
    cfg = CodecConfig(kv_codec=codec)
    payload = Packer(src, codec=cfg).pack(ref)
    assert payload.header.body_len < sum(s.raw_nbytes for s in payload.segments) * 1.01
    Unpacker(dst).unpack(payload.tobytes(), ref)
    assert Packer(dst, codec=cfg).pack(ref).tobytes() == payload.tobytes()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CI has none)")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("pinned", [True, False])
def test_cuda_cache_roundtrip_matches_cpu(backend, pinned):
    cpu = filled(HYBRID, 16, BS, layout="kv_first", seed=5)
    gpu = moved(cpu, "cuda")
    ref = random_ref(16, BS, 37, slot=1, token_start=BS, seed=8)
    staging = StagingArena(1 << 20, pin=pinned)
    wire = Packer(gpu, staging=staging, backend=backend).pack(ref).tobytes()
    assert wire == Packer(cpu).pack(ref).tobytes()
    dst = moved(PagedCache.allocate(HYBRID, 20, BS, 3, layout="split", fill="zeros"), "cuda")
    dst_ref = random_ref(20, BS, 37, slot=2, seed=9)
    Unpacker(dst, backend=backend).unpack(wire, dst_ref)
    assert Packer(dst, backend=backend).pack(CacheRef(dst_ref.block_ids, 37, 2, BS)).tobytes() == wire
