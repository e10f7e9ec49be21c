"""Engine-native layouts are validated on construction; block tables and slots before use."""

import pytest
import torch

from kvlink.errors import ConfigError, IncompatibleLayoutError
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention

SPEC = CacheSpec("p", (FullAttention(2, 8), MLA(6, 2), LinearAttention((2, 3), "float32", (4, 3), "bfloat16")))


def _ok():
    return dict(kv={0: torch.zeros(10, 2, 4, 2, 8, dtype=torch.bfloat16), 1: torch.zeros(10, 4, 8, dtype=torch.bfloat16)},
                conv={2: torch.zeros(3, 4, 3, dtype=torch.bfloat16)}, recurrent={2: torch.zeros(3, 2, 3)})


def test_valid_cache():
    cache = PagedCache(SPEC, 4, **_ok())
    assert (cache.num_blocks, cache.num_slots) == (10, 3)
    assert cache.planes(0)[0][1].shape == (10, 4 * 2 * 8)


@pytest.mark.parametrize("breakage", [
    lambda d: d["kv"].__setitem__(0, torch.zeros(10, 2, 4, 2, 8)),                       # wrong dtype
    lambda d: d["kv"].__setitem__(1, torch.zeros(9, 4, 8, dtype=torch.bfloat16)),         # blocks disagree
    lambda d: d["kv"].pop(1),                                                             # missing layer
    lambda d: d["recurrent"].__setitem__(2, torch.zeros(3, 2, 3, dtype=torch.bfloat16)),  # state dtype
    lambda d: d["conv"].__setitem__(2, torch.zeros(4, 4, 3, dtype=torch.bfloat16)),       # slots disagree
])
def test_incompatible_tensors(breakage):
    tensors = _ok()
    breakage(tensors)
    with pytest.raises(IncompatibleLayoutError):
        PagedCache(SPEC, 4, **tensors)


def test_split_needed_for_different_head_dims():
    spec = CacheSpec("mimo-like", (FullAttention(2, 12, v_head_dim=8),))
    with pytest.raises(IncompatibleLayoutError, match="split"):
        PagedCache(spec, 4, kv={0: torch.zeros(5, 2, 4, 2, 12, dtype=torch.bfloat16)})
    cache = PagedCache.allocate(spec, 5, 4)
    assert cache.layout.value == "split"


@pytest.mark.parametrize("ref, match", [
    (CacheRef([0, 1], 9, 0), "cannot hold"),
    (CacheRef([0, 1, 10], 9, 0), "out of range"),
    (CacheRef([0, 1, 1], 9, 0), "repeat"),
    (CacheRef([0, 1, 2], 9, 0, token_start=2), "multiple"),
    (CacheRef([0, 1, 2], 9, 0, token_start=12), "multiple"),
])
def test_bad_refs(ref, match):
    with pytest.raises(ConfigError, match=match):
        ref.block_ids_checked(PagedCache(SPEC, 4, **_ok()))


def test_bad_slot():
    cache = PagedCache(SPEC, 4, **_ok())
    with pytest.raises(ConfigError, match="state_slot"):
        CacheRef([0], 1, None).slot(cache)
    with pytest.raises(ConfigError, match="state_slot"):
        CacheRef([0], 1, 3).slot(cache)


def _vllm_cpu_like(num_blocks=6, heads=2, block=4, head_dim=8):
    """A vLLM-CPU-style cache: per block and head, K transposed [head_dim, block] then V [block, head_dim]."""
    raw = torch.randn(num_blocks, heads, block, 2 * head_dim).to(torch.bfloat16)
    halves = raw.view(num_blocks, heads, 2, block * head_dim)
    k = halves[:, :, 0].view(num_blocks, heads, head_dim, block).permute(0, 3, 1, 2)
    v = halves[:, :, 1].view(num_blocks, heads, block, head_dim).permute(0, 2, 1, 3)
    return raw, k, v


@pytest.mark.parametrize("start,end", [(0, 12), (4, 11), (0, 3), (8, 9)])
def test_strided_engine_planes_round_trip_in_place(start, end):
    """An engine's own block interior (not block-contiguous) packs token-major and unpacks through the view."""
    from kvlink.serde import Packer, Unpacker

    spec = CacheSpec("strided", (FullAttention(2, 8), LinearAttention((2, 3), "float32", (4, 3), "bfloat16")))
    raw, k, v = _vllm_cpu_like()
    states = {(1, "conv"): torch.randn(5, 4, 3).to(torch.bfloat16), (1, "recurrent"): torch.randn(5, 2, 3)}
    src = PagedCache(spec, 4, tensors={(0, "k"): k, (0, "v"): v, **states})
    ref = CacheRef([3, 1, 5], end, state_slot={1: 2}, token_start=start)
    payload = Packer(src).pack(ref)
    seg = payload.header.segments[0]
    assert torch.equal(bytes_as(payload, 0, (end - start, 2, 8)), torch.stack([k[[3, 1, 5][t // 4], t % 4] for t in range(start, end)]))
    raw2, k2, v2 = _vllm_cpu_like()
    raw2.zero_()
    dst = PagedCache(spec, 4, tensors={(0, "k"): k2, (0, "v"): v2,
                                      (1, "conv"): torch.zeros(5, 4, 3, dtype=torch.bfloat16), (1, "recurrent"): torch.zeros(5, 2, 3)})
    Unpacker(dst).unpack(payload, CacheRef([0, 4, 2], end, state_slot={1: 4}, token_start=start))
    for t in range(start, end):
        assert torch.equal(k2[[0, 4, 2][t // 4], t % 4], k[[3, 1, 5][t // 4], t % 4])
        assert torch.equal(v2[[0, 4, 2][t // 4], t % 4], v[[3, 1, 5][t // 4], t % 4])
    assert int((raw2 != 0).sum()) == (end - start) * 2 * 2 * 8  # nothing outside the tokens written
    assert torch.equal(dst.tensor(1, 1)[4], states[(1, "recurrent")][2]) and seg.layer == 0


def bytes_as(payload, index, shape):
    data = payload.datas[index]
    return torch.frombuffer(bytearray(memoryview(data)), dtype=torch.bfloat16).view(shape)


def test_per_layer_slots_need_every_state_layer():
    spec = CacheSpec("s", (LinearAttention((2, 3), "float32", (4, 3), "bfloat16"),) * 2)
    cache = PagedCache.allocate(spec, 1, 4, num_slots=3)
    assert CacheRef([0], 4, {0: 1, 1: 2}).slot(cache, 1) == 2
    with pytest.raises(ConfigError, match="layer 1"):
        CacheRef([0], 4, {0: 1}).slot(cache, 1)
