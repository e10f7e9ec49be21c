"""Serde of the general layer spec: a layout mixing hybrid (K/V + states), sliding, full, MLA +
indexer, chunked, empty and integer-state layers packs and unpacks bit-exact, segment per
component, in every KV layout, and the paged cache refuses tensors that fit no component."""

import pytest
import torch

from kvlink.errors import IncompatibleLayoutError
from kvlink.serde import CacheRef, Packer, PagedCache, Unpacker

from .helpers import random_ref, same, snapshot
from .test_spec_general import MIXED

BS = 4
NUM_BLOCKS = 16
LAYOUTS = ["blocks_first", "kv_first", "split"]


def filled(layout="blocks_first", seed=0, fill="randn"):
    torch.manual_seed(seed)
    return PagedCache.allocate(MIXED, NUM_BLOCKS, BS, 3, layout=layout, fill=fill)


def rows(cache: PagedCache, ref: CacheRef, layer: int, comp: int, t0: int, t1: int) -> torch.Tensor:
    """Bytes of tokens [t0, t1) of one token component, read with plain indexing (test oracle)."""
    plane = cache.tensor(layer, comp)
    elems = plane.shape[1] // BS
    ids = list(ref.block_ids)
    per = [plane[ids[t // BS], (t % BS) * elems:(t % BS + 1) * elems] for t in range(t0, t1)]
    return torch.stack(per).view(torch.uint8) if per else torch.empty(0, dtype=torch.uint8)


def state(cache: PagedCache, ref: CacheRef, layer: int, comp: int) -> torch.Tensor:
    return cache.tensor(layer, comp)[ref.state_slot].reshape(-1).view(torch.uint8)


def expected_start(layer: int, comp: int, token_start: int, tokens: int) -> int:
    return max(token_start, MIXED.layers[layer].components[comp].live_start(tokens))


def assert_components_equal(src, src_ref, dst, dst_ref, pairs, token_start=0):
    n = src_ref.num_tokens
    for layer, comp in pairs:
        if MIXED.layers[layer].components[comp].is_state:
            assert torch.equal(state(src, src_ref, layer, comp), state(dst, dst_ref, layer, comp)), (layer, comp)
        else:
            t0 = expected_start(layer, comp, token_start, n)
            assert torch.equal(rows(src, src_ref, layer, comp, t0, n), rows(dst, dst_ref, layer, comp, t0, n)), \
                (layer, comp)


def assert_components_zero(cache, ref, pairs, t0=0):
    for layer, comp in pairs:
        if MIXED.layers[layer].components[comp].is_state:
            assert not state(cache, ref, layer, comp).any(), (layer, comp)
        else:
            assert not rows(cache, ref, layer, comp, t0, ref.num_tokens).any(), (layer, comp)


ALL = [(i, c) for i, layer in enumerate(MIXED.layers) for c in range(len(layer.components))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens, token_start", [(1, 0), (5, 0), (8, 0), (13, 0), (16, 0), (37, 0),
                                                 (13, 12), (21, 8), (16, 8), (37, 16)])
def test_mixed_spec_roundtrip(layout, tokens, token_start):
    src = filled(layout, seed=1)
    dst = PagedCache.allocate(MIXED, NUM_BLOCKS + 2, BS, 4, layout=layout, fill="zeros")
    src_ref = random_ref(NUM_BLOCKS, BS, tokens, slot=2, token_start=token_start, seed=3)
    dst_ref = random_ref(NUM_BLOCKS + 2, BS, tokens, slot=1, seed=4)
    payload = Packer(src).pack(src_ref)
    header = payload.header
    # one segment per component, in spec order, windows cut to what is live at the end
    assert [(s.layer, s.component) for s in header.segments] == ALL
    for seg in header.segments:
        comp = MIXED.layers[seg.layer].components[seg.component]
        assert (seg.is_state, seg.dtype) == (comp.is_state, comp.dtype)
        if comp.is_state:
            assert (seg.shape, seg.token_start) == (comp.shape, tokens)
        else:
            t0 = expected_start(seg.layer, seg.component, token_start, tokens)
            assert (seg.shape, seg.token_start) == ((tokens - t0, *comp.shape), t0)
    if token_start == 0:
        assert sum(s.raw_nbytes for s in header.segments) == MIXED.bytes_at(tokens)
        assert header.body_len == MIXED.bytes_at(tokens)  # codec none: lengths are the raw bytes
    assert Unpacker(dst).unpack(payload.tobytes(), dst_ref) == [0, 1, 2, 3, 4, 6]  # layer 5 holds nothing
    assert_components_equal(src, src_ref, dst, dst_ref, ALL, token_start)
    # nothing before what the payload carries was written
    for layer, comp in ALL:
        if not MIXED.layers[layer].components[comp].is_state:
            assert not rows(dst, dst_ref, layer, comp, 0, expected_start(layer, comp, token_start, tokens)).any()


def test_unpack_reports_layers_written():
    src, dst = filled(), filled(seed=5, fill="zeros")
    ref = random_ref(NUM_BLOCKS, BS, 10, slot=0, seed=1)
    # the MLP-only layer 5 has no segment, so it is not "written"
    assert Unpacker(dst).unpack(Packer(src).pack(ref).tobytes(), ref) == [0, 1, 2, 3, 4, 6]


@pytest.mark.parametrize("tokens, token_start, chunk", [(13, 0, (8, 5)), (13, 12, (12, 1)), (16, 0, (16, 0)),
                                                        (23, 8, (16, 7)), (7, 4, (4, 3))])
def test_chunked_window_carries_only_the_live_chunk(tokens, token_start, chunk):
    src = filled(seed=2)
    ref = random_ref(NUM_BLOCKS, BS, tokens, slot=0, token_start=token_start, seed=2)
    segs = Packer(src).pack(ref, layers=[4]).segments
    assert [(s.component, s.token_start, s.shape) for s in segs] == [
        (0, chunk[0], (chunk[1], 1, 4)), (1, chunk[0], (chunk[1], 1, 4))]
    dst = filled(seed=6, fill="zeros")
    Unpacker(dst).unpack(Packer(src).pack(ref, layers=[4]).tobytes(), ref)
    assert_components_equal(src, ref, dst, ref, [(4, 0), (4, 1)], token_start)
    assert not rows(dst, ref, 4, 0, 0, chunk[0]).any(), "tokens of a closed chunk were shipped"


@pytest.mark.parametrize("group", ["full", "window", "state"])
def test_group_filter(group):
    src = filled(seed=3)
    dst = filled(seed=3, fill="zeros")
    ref = random_ref(NUM_BLOCKS, BS, 29, slot=1, seed=5)
    payload = Packer(src).pack(ref, group=group)
    assert [(s.layer, s.component) for s in payload.segments] == MIXED.group(group)
    Unpacker(dst).unpack(payload.tobytes(), ref, group=group)
    assert_components_equal(src, ref, dst, ref, MIXED.group(group))
    assert_components_zero(dst, ref, [p for p in ALL if p not in MIXED.group(group)])


def test_groups_together_equal_the_whole_request():
    src = filled(seed=4)
    ref = random_ref(NUM_BLOCKS, BS, 27, slot=2, seed=6)
    whole, parts = filled(seed=4, fill="zeros"), filled(seed=4, fill="zeros")
    Unpacker(whole).unpack(Packer(src).pack(ref).tobytes(), ref)
    for group in ("state", "window", "full"):
        Unpacker(parts).unpack(Packer(src).pack(ref, group=group).tobytes(), ref, group=group)
    assert same(snapshot(whole), snapshot(parts))


@pytest.mark.parametrize("group, layers, missing", [
    ("state", None, "layer 0: payload lacks components ['k', 'v']"),
    ("full", [0], "layer 0: payload lacks components ['conv', 'ssm']"),
    ("window", [1, 4], None),   # whole layers: sliding and chunked layers hold only windowed tensors
    ("state", [6], None),
])
def test_whole_layers_refuses_part_of_a_layer(group, layers, missing):
    src = filled(seed=7)
    ref = random_ref(NUM_BLOCKS, BS, 18, slot=0, seed=7)
    wire = Packer(src).pack(ref, layers=layers, group=group).tobytes()
    dst = filled(seed=8)
    before = snapshot(dst)
    if missing is None:
        Unpacker(dst).unpack(wire, ref)
        assert_components_equal(src, ref, dst, ref, MIXED.group(group) if layers is None else
                                [p for p in MIXED.group(group) if p[0] in layers])
        return
    with pytest.raises(IncompatibleLayoutError) as err:
        Unpacker(dst).unpack(wire, ref)
    assert missing in str(err.value)
    assert same(snapshot(dst), before), "a refused payload wrote something"


def _parts(layout="blocks_first"):
    cache = PagedCache.allocate(MIXED, 6, BS, 2, layout=layout, fill="zeros")
    return dict(kv=dict(cache.kv), tensors=dict(cache.tensors), layout=layout)


@pytest.mark.parametrize("breakage, match", [
    (lambda d: d["tensors"].__setitem__((5, "k"), torch.zeros(6, BS, 2, 8, dtype=torch.bfloat16)), "given for no"),
    (lambda d: d["tensors"].__setitem__((6, "nope"), torch.zeros(2, 1, dtype=torch.int64)), "given for no"),
    (lambda d: d["tensors"].__setitem__((9, "k"), torch.zeros(6, BS, 2, 8, dtype=torch.bfloat16)), "given for no"),
    (lambda d: d.__setitem__("conv", {6: torch.zeros(2, 12, 3, dtype=torch.bfloat16)}), "given for no"),
    (lambda d: d["kv"].__setitem__(5, torch.zeros(6, 2, BS, 2, 8, dtype=torch.bfloat16)), "given for no"),
    (lambda d: d["tensors"].pop((6, "mask")), "mask"),
    (lambda d: d["tensors"].pop((0, "ssm")), "ssm"),
    (lambda d: d["tensors"].pop((3, "index_k")), "index_k"),
    (lambda d: d["kv"].pop(1), "'k', 'v'"),
    (lambda d: d["tensors"].__setitem__((3, "index_k"), torch.zeros(6, BS, 2, 8, dtype=torch.float8_e4m3fn)),
     "index_k"),
    (lambda d: d["tensors"].__setitem__((6, "counts"), torch.zeros(2, 2, 3, dtype=torch.int64)), "counts"),
    (lambda d: d["tensors"].__setitem__((6, "pos"), torch.zeros(2, 2, dtype=torch.int64)), "pos"),
    (lambda d: d["tensors"].__setitem__((0, "conv"), torch.zeros(3, 12, 3, dtype=torch.bfloat16)), "state"),
    (lambda d: d["kv"].__setitem__(2, torch.zeros(6, 2, BS, 4, 4, dtype=torch.bfloat16)), "layer 2"),
    # zero blocks / slots in the first tensor checked (was a raw RuntimeError / IndexError)
    (lambda d: d["kv"].__setitem__(0, torch.zeros(0, 2, BS, 2, 8, dtype=torch.bfloat16)), "num_blocks >= 1"),
    (lambda d: d["tensors"].__setitem__((0, "conv"), torch.zeros(0, 12, 3, dtype=torch.bfloat16)), "num_slots >= 1"),
])
def test_paged_cache_refuses_what_fits_no_component(breakage, match):
    parts = _parts()
    PagedCache(MIXED, BS, **parts)  # the unbroken parts are fine
    breakage(parts)
    with pytest.raises(IncompatibleLayoutError, match=match):
        PagedCache(MIXED, BS, **parts)


def test_any_component_may_be_given_by_name():
    """K/V passed as tensors[(layer, "k")] / [(layer, "v")] instead of kv[layer]: same cache."""
    src = filled(layout="split", seed=9)
    tensors = dict(src.tensors)
    for layer, pair in src.kv.items():
        tensors[(layer, "k")], tensors[(layer, "v")] = pair
    by_name = PagedCache(MIXED, BS, tensors=tensors)
    ref = random_ref(NUM_BLOCKS, BS, 22, slot=1, seed=9)
    assert Packer(by_name).pack(ref).tobytes() == Packer(src).pack(ref).tobytes()
    assert [c for c, _ in by_name.planes(0)] == [0, 1] and [c for c, _ in by_name.states(0)] == [2, 3]
    assert by_name.tensor(6, 2).dtype == torch.bool


def test_segment_entries_at_the_documented_offsets():
    """docs/wire-format.md's entry table, read straight off the bytes of a payload."""
    import struct

    ref = random_ref(NUM_BLOCKS, BS, 13, slot=0, seed=3)
    payload = Packer(filled(seed=3)).pack(ref)
    head = payload.header_bytes()
    assert struct.unpack_from("<4sH", head, 0) == (b"KVLK", 2)
    codes = {"bfloat16": 1, "float32": 3, "float8_e4m3fn": 4, "int32": 8, "int64": 9, "bool": 10}
    for i, seg in enumerate(payload.segments):
        at = 72 + 72 * i
        layer, comp, role, dtype, codec, ndim = struct.unpack_from("<HHBBBB", head, at)
        token_start, *shape = struct.unpack_from("<I6I", head, at + 12)
        raw_nbytes, = struct.unpack_from("<Q", head, at + 56)
        spec_comp = MIXED.layers[layer].components[comp]
        assert (layer, comp) == (seg.layer, seg.component)
        assert role == (2 if spec_comp.is_state else 1) and dtype == codes[spec_comp.dtype] and codec == 0
        assert (token_start, tuple(shape[:ndim]), raw_nbytes) == (seg.token_start, seg.shape, seg.raw_nbytes)
    assert {MIXED.layers[s.layer].components[s.component].dtype for s in payload.segments} == set(codes)
