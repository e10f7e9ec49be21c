"""Issue 16: RWKV's state list and xLSTM's ``xLSTMCache`` (no transformers Cache) through the adapter.

The sweep (test_hf_sweep.py) checks one-row round trips and a negative control; here: several rows
per cache, and refusals (typed, naming what) of these objects in forms kvlink cannot carry."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from kvlink.engine.hf import HFCacheAdapter, spec_from_cache, spec_from_config  # noqa: E402
from kvlink.engine.hf.layers import inventory  # noqa: E402
from kvlink.errors import IncompatibleLayoutError, KvlinkError  # noqa: E402
from kvlink.serde import CacheRef, PagedCache  # noqa: E402
from tests.integration.hf_zoo import build, one_torch_thread  # noqa: E402,F401  (autouse fixture)

N, BS = 11, 4
KWARG = {"rwkv": "state", "xlstm": "cache"}  # what each model continues from


def prefill(model, model_type, prompt):
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    return out.state if model_type == "rwkv" else out.cache


def typed(match, call):
    with pytest.raises(IncompatibleLayoutError, match=match) as info:
        call()
    assert isinstance(info.value, KvlinkError)


@pytest.mark.parametrize("model_type", ["rwkv", "xlstm"])
def test_two_rows_round_trip_bit_exact(model_type):
    config, model = build(model_type)
    spec = spec_from_config(config)
    prompt = torch.randint(3, 250, (2, N), generator=torch.Generator().manual_seed(2))
    cache = prefill(model, model_type, prompt)
    assert spec_from_cache(cache, config=config).fingerprint == spec.fingerprint
    adapter = HFCacheAdapter(spec, config)
    paged = PagedCache.allocate(spec, 8, BS, num_slots=3, fill="randn")
    refs = [CacheRef([5, 0, 3], N, 2), CacheRef([1, 6, 7], N, 0)]
    for row, ref in enumerate(refs):
        adapter.export(cache, paged, ref, row=row)
    tok = torch.tensor([[9], [17]])
    with torch.no_grad():
        want = model(input_ids=tok, use_cache=True, **{KWARG[model_type]: prefill(model, model_type, prompt)}).logits
        got = model(input_ids=tok, use_cache=True, **{KWARG[model_type]: adapter.build_cache(paged, refs)}).logits
        swapped = model(input_ids=tok, use_cache=True,
                        **{KWARG[model_type]: adapter.build_cache(paged, refs[::-1])}).logits
    assert torch.equal(got, want)
    assert not torch.equal(swapped, want)  # the rows are distinct requests: the test can fail


def test_xlstm_cache_in_forms_kvlink_cannot_carry_is_refused():
    config, model = build("xlstm")
    spec = spec_from_config(config)
    prompt = torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(3))
    adapter = HFCacheAdapter(spec, config)
    paged = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")

    cache = prefill(model, "xlstm", prompt)
    cache.extra_state = torch.zeros(1, 4)  # a tensor kvlink does not know: refused, not dropped
    typed(r"xLSTMCache\.extra_state: holds a tensor", lambda: adapter.export(cache, paged, CacheRef([0, 1, 2], N, 0)))
    typed(r"xLSTMCache\.extra_state", lambda: spec_from_cache(cache, config=config))

    cache = prefill(model, "xlstm", prompt)
    cache.rnn_state[1] = cache.rnn_state[1][:2]  # (C, n) without m
    typed(r"rnn_state\[1\]: a tuple, not \(C, n, m\)", lambda: inventory(cache, 2))

    cache = prefill(model, "xlstm", prompt)
    typed("has seen 11 tokens, the request 10", lambda: adapter.export(cache, paged, CacheRef([0, 1, 2], N - 1, 0)))
    assert all(not t.any() for t in paged._by_component.values())  # nothing written by the refusals

    adapter.export(cache, paged, CacheRef([0, 1, 2], N, 0))
    one_row = HFCacheAdapter(spec, config, cache_factory=lambda: type(cache)(config, 1, dtype=torch.float32))
    typed(r"layer 0 C: the new xLSTMCache holds \(1, ", lambda: one_row.build_cache(
        paged, [CacheRef([0, 1, 2], N, 0)] * 2))


def test_rwkv_state_in_forms_kvlink_cannot_carry_is_refused():
    config, model = build("rwkv")
    spec = spec_from_config(config)
    state = prefill(model, "rwkv", torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(4)))
    typed("an RWKV state is a list of 5 tensors, got 4", lambda: inventory(state[:4], 2))
    typed(r"RWKV state\[2\] \(wkv_num\): shape \(1, 64, 1\)", lambda: inventory(
        [*state[:2], state[2][..., :1], *state[3:]], 2))
    typed("holds 2 layers, the model 1", lambda: inventory(state, 1))
    paged = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")
    ref = CacheRef([0, 1, 2], N, 0)
    HFCacheAdapter(spec, config).export(state, paged, ref)
    wrong = HFCacheAdapter(spec, config, cache_factory=lambda: DynamicCache(config=config))
    typed("not the rwkv state the spec carries", lambda: wrong.build_cache(paged, ref))


def test_recurrent_gemma_module_states_need_the_model():
    """RecurrentGemma keeps its conv and RG-LRU states on its modules: carried with model=, and
    refused (naming model=) without it rather than restored from whatever the model holds."""
    config, model = build("recurrent_gemma")
    spec = spec_from_config(config)
    assert [[c.name for c in layer.components] for layer in spec.layers] == [
        ["conv1d", "rg_lru"], ["conv1d", "rg_lru"], ["k", "v"]]
    assert spec.layers[0].states[1].dtype == "float32"
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(5)), cache=cache,
              use_cache=True)
    assert spec_from_cache(cache, config=config, model=model).fingerprint == spec.fingerprint
    # without the model its recurrent layers' LinearAttentionLayer objects are empty: refused, not dropped
    typed(r"layer 0 \(LinearAttentionLayer\) holds no state after the prefill.*pass model=",
          lambda: spec_from_cache(cache, config=config))
    adapter = HFCacheAdapter(spec, config)
    paged = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")
    ref = CacheRef([0, 1, 2], N, 1)
    typed(r"layer 0: the cache holds \[\], .*need model=", lambda: adapter.export(cache, paged, ref))
    adapter.export(cache, paged, ref, model=model)
    typed("layer 0 conv1d: a state the model keeps on its modules; pass model=", lambda: adapter.build_cache(paged, ref))
    want = model.model.layers[1].temporal_block.rg_lru.recurrent_states.clone()
    model.model.layers[1].temporal_block.rg_lru.recurrent_states.zero_()
    adapter.build_cache(paged, ref, model=model)
    assert torch.equal(model.model.layers[1].temporal_block.rg_lru.recurrent_states, want)
