"""Every transformers architecture whose cache is hybrid, recurrent or windowed, through kvlink.

Each either continues bit-exact after export -> payload -> unpack -> rebuild (logits of a
several-token append and of greedy decode steps; a negative control must then break), or is
refused with the typed error listed in ``REFUSED`` (docs/engine.md gives the reasons). Never a wrong
continuation.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvlink.engine.hf import HFCacheAdapter, spec_from_cache, spec_from_config  # noqa: E402
from kvlink.errors import IncompatibleLayoutError, SpecError  # noqa: E402
from kvlink.serde import CacheRef, Packer, PagedCache, Unpacker  # noqa: E402
from tests.integration.hf_zoo import ZOO, build, one_torch_thread  # noqa: E402,F401  (autouse fixture)

PROMPT, APPEND, STEPS, BS = 13, 3, 2, 4

# Data-dependent ops (nonzero, .item()) stop the meta-device trace: spec_from_config refuses and
# says to read the spec off a real prefill, which then carries the cache like any other.
TRACE_FALLBACK = {"longcat_flash", "moshi"}
# Models that keep states on their modules and return no cache: prefill is given a DynamicCache, and
# export / build_cache the model (model=).
MODULE_HELD = {"recurrent_gemma"}
# model type -> (error class, words of its message): what kvlink cannot carry, and says so.
REFUSED = {
    "deepseek_v4": (IncompatibleLayoutError, "buffer_kv"),
    "dory": (IncompatibleLayoutError, "holds 6 layers, the model 4"),
    "qwen4_exp_text": (IncompatibleLayoutError, "indexer_position_ids"),
}


def continue_kwargs(model_type: str, cache) -> dict:
    """The keyword a model continues from its cache with: RWKV takes its state list as ``state``."""
    return {"state": cache} if model_type == "rwkv" else {"cache": cache}


def cache_of(out):
    """The cache a prefill returned: ``.cache``, or RWKV's ``.state`` list."""
    return out.cache if getattr(out, "cache", None) is not None else getattr(out, "state", None)


def continuations(model, new_cache, append, vocab: int) -> list:
    """Logits of STEPS greedy decode steps from one fresh cache, and of appending ``append`` at once
    to another (pure-SSM models take the two paths differently)."""
    out = []
    model_type = model.config.model_type
    with torch.no_grad():
        cache, tok = new_cache(), append[:, :1]
        for _ in range(STEPS):
            result = model(input_ids=tok, use_cache=True, **continue_kwargs(model_type, cache))
            cache = result.state if model_type == "rwkv" else cache  # RWKV hands its state back
            out.append(result.logits)
            tok = result.logits[:, -1:, :vocab].argmax(-1)
        out.append(model(input_ids=append, use_cache=True, **continue_kwargs(model_type, new_cache())).logits)
    return out


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def held_bytes(cache, layers: int, model=None) -> int:
    """Bytes of batch row 0 of every tensor the cache (and ``model``'s modules) holds (what a
    request's cache is)."""
    from kvlink.engine.hf.layers import decoder_layers, slots

    modules = decoder_layers(model)
    return sum(t[0].numel() * t.element_size() for i in range(layers)
               for t in (s.read(cache, i, modules) for s in slots(cache, i, modules)))


def corrupt(spec, paged: PagedCache, ref: CacheRef) -> str:
    """Zero part of the request: the states of the first layer holding any (some models read a
    conv state only in some paths), else the first token tensor (all its blocks)."""
    for layer, spec_layer in enumerate(spec.layers):
        if spec_layer.states:
            for index, _ in paged.states(layer):
                paged.tensor(layer, index)[ref.state_slot].zero_()
            return f"layer {layer} states"
    layer, index = spec.group("full")[0] if spec.group("full") else spec.group("window")[0]
    for block in ref.block_ids:
        paged.tensor(layer, index)[block].zero_()
    return f"layer {layer} component {index}"


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_round_trips_bit_exact_or_is_refused(model_type):
    config, model = build(model_type)
    vocab = min(config.get_text_config(decoder=True).vocab_size, 250)
    prompt = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    append = torch.randint(3, vocab, (1, APPEND), generator=torch.Generator().manual_seed(1))
    expected = REFUSED.get(model_type)

    holder = {"model": model} if model_type in MODULE_HELD else {}

    def prefill():
        with torch.no_grad():
            if holder:  # returns no cache: give it one; the rest of its state stays on its modules
                cache = transformers.DynamicCache(config=config)
                model(input_ids=prompt, cache=cache, use_cache=True)
                return cache
            return cache_of(model(input_ids=prompt, use_cache=True))

    try:
        if model_type in TRACE_FALLBACK:
            with pytest.raises(SpecError, match="cannot trace .*spec_from_cache"):
                spec_from_config(config)
            cache = prefill()
            spec = spec_from_cache(cache, f"hf:{model_type}", config.get_text_config(decoder=True).num_hidden_layers)
        else:
            spec = spec_from_config(config)
            cache = prefill()
        adapter = HFCacheAdapter(spec, config)
        src = PagedCache.allocate(spec, 8, BS, num_slots=2, fill="zeros")
        src_ref = CacheRef([5, 1, 7, 0], PROMPT, 1)
        adapter.export(cache, src, src_ref, **holder)
    except (SpecError, IncompatibleLayoutError) as exc:
        assert expected is not None, f"{model_type} refused unexpectedly: {exc!r}"
        assert isinstance(exc, expected[0]) and expected[1] in str(exc), repr(exc)
        return
    assert expected is None, f"{model_type} was expected to be refused ({expected}) but went through"

    payload = Packer(src).pack(src_ref)
    assert sum(s.raw_nbytes for s in payload.segments) == spec.bytes_at(PROMPT) == held_bytes(cache, spec.num_layers, **holder)
    dst = PagedCache.allocate(spec, 8, BS, num_slots=3, fill="randn")
    dst_ref = CacheRef([2, 6, 3, 4], PROMPT, 2)
    Unpacker(dst).unpack(payload.tobytes(), dst_ref)

    def restore():
        return adapter.build_cache(dst, dst_ref, **holder)

    reference = continuations(model, prefill, append, vocab)
    restored = continuations(model, restore, append, vocab)
    assert same(restored, reference), f"{model_type}: wrong continuation"

    what = corrupt(spec, dst, dst_ref)
    broken = continuations(model, restore, append, vocab)
    assert not same(broken, reference), f"{model_type}: zeroing {what} changed nothing (the test cannot fail)"
