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
    lambda d: d["kv"].__setitem__(0, torch.zeros(10, 4, 2, 2, 8, dtype=torch.bfloat16).transpose(1, 2)),  # strided block
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
