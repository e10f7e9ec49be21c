"""Review of issue 16: the transformers adapter refuses what it cannot do, with typed errors, before
writing anything. Real tiny models (tests/integration/hf_zoo.py) and real transformers caches."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from kvlink.engine.hf import HFCacheAdapter, spec_from_cache, spec_from_config  # noqa: E402
from kvlink.engine.hf.layers import inventory  # noqa: E402
from kvlink.errors import ConfigError, IncompatibleLayoutError, KvlinkError, SpecError  # noqa: E402
from kvlink.serde import CacheRef, PagedCache  # noqa: E402
from kvlink.spec import CacheSpec, FullAttention  # noqa: E402
from tests.integration.hf_zoo import build, one_torch_thread  # noqa: E402,F401  (autouse fixture)

BS = 4
N = 13  # overflows the zoo's 8-token sliding windows
REF = CacheRef([5, 0, 3, 6], N, 1)


def prefilled(model_type):
    """``(config, model, spec, filled cache, paged cache holding it)``."""
    config, model = build(model_type)
    spec = spec_from_config(config)
    prompt = torch.randint(3, 250, (1, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    paged = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")
    HFCacheAdapter(spec, config).export(cache, paged, REF)
    return config, model, spec, cache, paged


def next_logits(model, cache):
    with torch.no_grad():
        return model(torch.tensor([[7]]), cache=cache, use_cache=True).logits


def typed(kind, call, match=None):
    with pytest.raises(kind, match=match) as info:
        call()
    assert isinstance(info.value, KvlinkError)
    return info.value


# -- finding 3: build_cache checks the target layer objects against the spec ----------------------------
def test_sliding_window_into_a_full_layer_is_refused():
    """A sliding window's last W-1 tokens restored into a full DynamicLayer continued silently wrong."""
    config, model, spec, cache, paged = prefilled("mistral")
    assert spec.layers[0].tokens[0].window == "sliding"
    want = next_logits(model, cache)
    good = HFCacheAdapter(spec, config).build_cache(paged, REF)  # the model's own class: bit-exact
    assert torch.equal(next_logits(model, good), want)
    bad = HFCacheAdapter(spec, config, cache_factory=lambda: DynamicCache())
    typed(IncompatibleLayoutError, lambda: bad.build_cache(paged, REF),
          "layer 0 k: .*DynamicLayer keeps a full 0 window")


@pytest.mark.parametrize("model_type,match", [
    ("falcon_h1", r"layer 0 conv: .*DynamicLayer has no conv_states\[0\]"),  # attention + SSM in one layer
    ("minimax", "DynamicCache keeps no linear_cache"),  # a cache-level state: MiniMaxCache's linear_cache
])
def test_state_into_a_cache_without_it_is_refused(model_type, match):
    """A state restored into a plain DynamicLayer leaked TypeError (AttributeError for linear_cache)."""
    config, model, spec, cache, paged = prefilled(model_type)
    bad = HFCacheAdapter(spec, config, cache_factory=lambda: DynamicCache())
    typed(IncompatibleLayoutError, lambda: bad.build_cache(paged, REF), match)


# -- finding 6: no untyped exception leaks ---------------------------------------------------------------
def test_bad_arguments_are_typed():
    config, model, spec, cache, paged = prefilled("falcon_h1")
    adapter = HFCacheAdapter(spec, config)
    typed(ConfigError, lambda: adapter.export_layer(cache, 9, paged, REF), "layer 9 out of range")
    typed(ConfigError, lambda: adapter.export_layer(cache, -1, paged, REF), "out of range")
    typed(ConfigError, lambda: adapter.export(cache, paged, REF, row="0"))
    typed(ConfigError, lambda: adapter.export(cache, "paged", REF))
    typed(ConfigError, lambda: adapter.export(cache, paged, [0, 1]))
    for not_a_cache in (None, ((torch.zeros(1),),), object()):
        typed(IncompatibleLayoutError, lambda: adapter.export(not_a_cache, paged, REF), "not a transformers Cache")
        typed(IncompatibleLayoutError, lambda: adapter.export_layer(not_a_cache, 0, paged, REF),
              "not a transformers Cache")
    typed(IncompatibleLayoutError, lambda: spec_from_cache(object(), "x"), "not a transformers Cache")
    typed(ConfigError, lambda: adapter.build_cache(paged, [0]))
    typed(ConfigError, lambda: adapter.build_cache(paged, 0))
    typed(ConfigError, lambda: adapter.build_cache("paged", REF))
    typed(SpecError, lambda: spec_from_config({"model_type": "llama"}), "not a transformers PretrainedConfig")
    typed(SpecError, lambda: HFCacheAdapter(spec, {"model_type": "llama"}))
    typed(ConfigError, lambda: HFCacheAdapter("spec", config))


def test_paged_cache_of_another_layout_is_refused_before_writing():
    config, model, spec, cache, _ = prefilled("mistral")
    other = CacheSpec("other", tuple(FullAttention(1, 4, dtype="float32") for _ in spec.layers))
    paged = PagedCache.allocate(other, 8, BS, num_slots=2, fill="zeros")
    adapter = HFCacheAdapter(spec, config)
    typed(IncompatibleLayoutError, lambda: adapter.export(cache, paged, REF), "another layout")
    typed(IncompatibleLayoutError, lambda: adapter.build_cache(paged, REF), "another layout")
    assert all(not t.any() for t in paged._by_component.values())


# -- minor: export checks every layer before writing any -------------------------------------------------
def test_export_refusing_at_a_later_layer_writes_nothing():
    config, model, spec, cache, _ = prefilled("mistral")
    last = spec.num_layers - 1
    cache.layers[last].values = cache.layers[last].values.to(torch.float16)  # the spec carries float32
    paged = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")
    typed(IncompatibleLayoutError, lambda: HFCacheAdapter(spec, config).export(cache, paged, REF),
          f"layer {last} v: the cache has .* torch.float16")
    assert all(not t.any() for t in paged._by_component.values())  # layers < last untouched too


# -- finding 8: spec_from_cache names the layout as spec_from_config does ------------------------------
@pytest.mark.parametrize("model_type", ["mistral", "falcon_h1"])
def test_spec_from_cache_with_the_config_has_the_same_fingerprint(model_type):
    config, model, spec, cache, _ = prefilled(model_type)
    seen = spec_from_cache(cache, config=config)
    assert seen.name == spec.name == f"hf:{model_type}"
    assert seen.fingerprint == spec_from_config(config).fingerprint
    assert spec_from_cache(cache, "mine", config=config).name == "mine"  # an explicit name still wins
    assert spec_from_cache(cache, spec.name, spec.num_layers).fingerprint == spec.fingerprint  # positional, as before
    typed(SpecError, lambda: spec_from_cache(cache), "needs a name or the model's config")
    typed(SpecError, lambda: spec_from_cache(cache, "x", "2"))


# -- finding 9: a known attribute in a form kvlink does not read is refused, not dropped ---------------
class FakeLayer:
    """A cache layer object holding tensors where kvlink looks for them, in forms it cannot read."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def fake_cache(*layers, **cache_attrs):
    cache = DynamicCache()
    cache.layers.extend(layers)
    cache.__dict__.update(cache_attrs)
    return cache


T = torch.zeros(1, 4, 3)


@pytest.mark.parametrize("cache,match", [
    (fake_cache(FakeLayer(keys=torch.zeros(1, 4))), r"layer 0 \(FakeLayer\)\.keys: a 2-dim tensor"),
    (fake_cache(FakeLayer(keys=[torch.zeros(1, 2, 3, 4)])), r"layer 0 \(FakeLayer\)\.keys: a list"),
    (fake_cache(FakeLayer(indexer_keys=torch.zeros(2))), r"\.indexer_keys: a 1-dim tensor"),
    (fake_cache(FakeLayer(conv_states={0: (T, T)})), r"layer 0 \(FakeLayer\)\.conv_states\[0\]: a tuple"),
    (fake_cache(FakeLayer(conv_states={0: T, 1: [T]})), r"\.conv_states\[1\]: a list"),  # one readable beside
    (fake_cache(FakeLayer(recurrent_states=[T])), r"\.recurrent_states\[None\]: a list"),  # not a dict at all
    (fake_cache(FakeLayer(), FakeLayer(), linear_cache=[T, [T, T]]), r"DynamicCache\.linear_cache\[1\]: a list"),
    (fake_cache(FakeLayer(), linear_cache=(T,)), r"DynamicCache\.linear_cache: a tuple"),
], ids=["keys-2d", "keys-list", "indexer-1d", "conv-tuple", "conv-list-beside-tensor", "recurrent-list",
        "linear-cache-list", "linear-cache-tuple"])
def test_known_attribute_in_an_unread_form_is_refused(cache, match):
    typed(IncompatibleLayoutError, lambda: inventory(cache, len(cache.layers)), match)
    typed(IncompatibleLayoutError, lambda: spec_from_cache(cache, "fake"), match)


def test_known_attributes_in_read_forms_are_carried():
    cache = fake_cache(FakeLayer(keys=torch.zeros(1, 2, 5, 4), conv_states={0: T, 1: None}, recurrent_states={}),
                       FakeLayer(), linear_cache=[[], torch.zeros(1, 2, 2)])
    spec = spec_from_cache(cache, "fake")
    assert [[c.name for c in layer.components] for layer in spec.layers] == [["k", "conv0"], ["linear"]]
