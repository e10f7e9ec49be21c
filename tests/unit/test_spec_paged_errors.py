"""Bad arguments to the spec classes, PagedCache and CacheRef raise typed kvlink errors (review of
issue 16), never a raw TypeError / ValueError / AttributeError / KeyError, and never truncate."""

import numpy as np
import pytest
import torch

from kvlink.errors import ConfigError, IncompatibleLayoutError, KvlinkError, SpecError
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import CacheSpec, FullAttention, LinearAttention, StateTensor, TokenTensor

SPEC = CacheSpec("m", (FullAttention(2, 4, dtype="float32"), LinearAttention((2, 3), conv_shape=(4, 2))))


def _states(conv=None, recurrent=None):
    return {(1, "conv"): torch.zeros(1, 4, 2, dtype=torch.bfloat16) if conv is None else conv,
            (1, "recurrent"): torch.zeros(1, 2, 3) if recurrent is None else recurrent}


def _raises(kind, call):
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, KvlinkError)
    return info.value


@pytest.mark.parametrize("call", [
    lambda: TokenTensor("k", (2,), dtype=["x"]),
    lambda: TokenTensor("k", (2,), dtype=None),
    lambda: StateTensor("s", (2,), dtype={}),
    lambda: SPEC.bytes_at("3"),
    lambda: SPEC.bytes_at(3.0),
    lambda: SPEC.bytes_at(True),
    lambda: SPEC.bytes_at(-1),
], ids=["token-dtype-list", "token-dtype-none", "state-dtype-dict", "bytes-at-str", "bytes-at-float",
        "bytes-at-bool", "bytes-at-negative"])
def test_spec_arguments_raise_spec_error(call):
    _raises(SpecError, call)


def test_bytes_at_takes_numpy_ints():
    assert SPEC.bytes_at(np.int64(3)) == SPEC.bytes_at(3) > 0


@pytest.mark.parametrize("call", [
    lambda: PagedCache(SPEC, 2, layout="foo"),
    lambda: PagedCache.allocate(SPEC, 4, 2, layout="foo"),
    lambda: PagedCache(SPEC, "2"),
    lambda: PagedCache(SPEC, 2.0),
    lambda: PagedCache.allocate(SPEC, 4, "2"),
    lambda: PagedCache("not a spec", 2),
], ids=["layout", "allocate-layout", "block-size-str", "block-size-float", "allocate-block-size", "spec"])
def test_paged_arguments_raise_config_error(call):
    _raises(ConfigError, call)


@pytest.mark.parametrize("kwargs", [
    dict(kv={0: [1, 2]}, tensors=_states()),
    dict(kv={0: torch.zeros(4, 2, 2, 2, 4)}, tensors=_states(conv=[0])),
    dict(kv={0: torch.zeros(4, 2, 2, 2, 4)}, tensors=_states(recurrent=np.zeros((1, 2, 3), np.float32))),
    dict(kv={0: ([0], [0])}, layout="split", tensors=_states()),
    dict(kv={0: torch.zeros(4, 2, 2, 2, 4)}, conv={1: "x"}, recurrent={1: torch.zeros(1, 2, 3)}),
    dict(tensors={(0, "k"): None, (0, "v"): torch.zeros(4, 2, 2, 4), **_states()}),
], ids=["kv-list", "state-list", "state-numpy", "split-lists", "conv-str", "tensors-none"])
def test_non_tensors_raise_incompatible_layout(kwargs):
    err = _raises(IncompatibleLayoutError, lambda: PagedCache(SPEC, 2, **kwargs))
    assert "expected a torch.Tensor" in str(err)


def test_unknown_layer_or_component_is_incompatible_layout():
    cache = PagedCache.allocate(SPEC, 4, 2, fill="zeros")
    for call in (lambda: cache.tensor(0, 7), lambda: cache.tensor(5, 0), lambda: cache.planes(9),
                 lambda: cache.states(9), lambda: cache.tensor([0], 0)):
        _raises(IncompatibleLayoutError, call)
    assert cache.tensor(1, 1).shape == (1, 2, 3)  # a known component still answers


@pytest.mark.parametrize("ref", [
    CacheRef(["a"], 2), CacheRef([0.5], 2), CacheRef([0, 1.0], 4), CacheRef(torch.tensor([0.0]), 2),
    CacheRef([True], 2), CacheRef([object()], 2), CacheRef([2 ** 70], 2), CacheRef([0], "2"), CacheRef([0], 2.0),
    CacheRef([0], 2, token_start="0"),
], ids=["str", "float", "mixed-float", "float-tensor", "bool", "object", "overflow", "num-tokens-str",
        "num-tokens-float", "token-start-str"])
def test_bad_block_ids_raise_config_error(ref):
    cache = PagedCache.allocate(SPEC, 4, 2, fill="zeros")
    _raises(ConfigError, lambda: ref.block_ids_checked(cache))


def test_float_block_ids_are_refused_not_truncated():
    cache = PagedCache.allocate(SPEC, 4, 2, fill="zeros")
    err = _raises(ConfigError, lambda: CacheRef([1.7, 2.2], 4).block_ids_checked(cache))
    assert "integers" in str(err)


@pytest.mark.parametrize("ids", [[1, 3], np.array([1, 3]), torch.tensor([1, 3], dtype=torch.int32), (1, 3),
                                 [np.int64(1), np.int64(3)]], ids=["list", "numpy", "int32-tensor", "tuple", "np-ints"])
def test_integer_block_ids_still_accepted(ids):
    cache = PagedCache.allocate(SPEC, 4, 2, fill="zeros")
    dev, host = CacheRef(ids, 4, 0).block_ids_checked(cache)
    assert host == [1, 3] and dev.dtype == torch.int64


def test_bad_state_slot_is_config_error():
    cache = PagedCache.allocate(SPEC, 4, 2, num_slots=2, fill="zeros")
    for slot in ("0", 0.0, True):
        _raises(ConfigError, lambda: CacheRef([0], 2, slot).slot(cache))
    assert CacheRef([0], 2, np.int64(1)).slot(cache) == 1
