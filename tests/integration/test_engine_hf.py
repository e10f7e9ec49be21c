"""Real hybrid model code end to end: prefill streams its cache layer by layer through the real
transport (loopback), decode rebuilds a transformers cache and continues; logits bit for bit."""


import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvlink.engine import DecodeSide  # noqa: E402
from kvlink.engine.hf import HFCacheAdapter, spec_from_cache, spec_from_config  # noqa: E402
from kvlink.engine.tiny import tiny_model  # noqa: E402
from kvlink.serde import CacheRef, PagedCache  # noqa: E402
from tests.integration.hf_stream import stream_prefill as streamed  # noqa: E402

BS = 16
STEPS = 4


def greedy(model, cache, first_logits, steps=STEPS):
    """Logits of ``steps`` greedy decode steps continuing from ``cache``."""
    out, tok = [], first_logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tok, cache=cache, use_cache=True).logits
            out.append(logits)
            tok = logits[:, -1].argmax(-1, keepdim=True)
    return out


async def stream_prefill(model, config, spec, prompt, dst_ref, decode, request_id):
    """Prefill streamed layer by layer from forward hooks (see hf_stream)."""
    src = PagedCache.allocate(spec, 16, BS, num_slots=2, fill="zeros")
    src_ref = CacheRef([9, 2, 14, 5, 11][: -(-prompt.shape[1] // BS)], prompt.shape[1], 1)
    return await streamed(model, HFCacheAdapter(spec, config), transformers.DynamicCache(config=config), prompt,
                          src, src_ref, decode.server.address, request_id, list(range(spec.num_layers)))


@pytest.mark.parametrize("family,dtype", [("kimi_linear", torch.float32), ("kimi_linear", torch.bfloat16),
                                          ("qwen3_next", torch.float32), ("llama", torch.float32),
                                          ("gemma3_text", torch.float32)])
async def test_round_trip_is_bit_exact_and_negative_control_fails(family, dtype):
    model, config = tiny_model(family, dtype)
    spec = spec_from_config(config, dtype)
    prompt = torch.randint(3, 256, (1, 45), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():  # the uninterrupted reference
        ref_cache = transformers.DynamicCache(config=config)
        ref_first = model(prompt, cache=ref_cache, use_cache=True).logits
        ref_steps = greedy(model, ref_cache, ref_first)

    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="zeros")
    dst_ref = CacheRef([3, 0, 12], prompt.shape[1], 2)
    decode = DecodeSide(dst)
    await decode.start()
    try:
        decode.start_load("r1", dst_ref)
        first, report = await stream_prefill(model, config, spec, prompt, dst_ref, decode, "r1")
        loaded = await decode.wait_all("r1")
        assert decode.server.reserved_bytes == 0  # landing buffers went back once unpacked
        decode.release("r1")
    finally:
        await decode.close()
    assert torch.equal(first, ref_first)
    assert loaded.bytes == report.bytes and sorted(loaded.layer_done) == list(range(spec.num_layers))

    adapter = HFCacheAdapter(spec, config)
    steps = greedy(model, adapter.build_cache(dst, dst_ref), ref_first)
    assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps))

    # Negative control: lose the linear state (hybrids) or one KV block (dense): logits change.
    linear = spec.layer_indices("linear")
    if linear:
        for _, pool in dst.states(linear[0]):
            pool[dst_ref.state_slot].zero_()
    else:
        for _, plane in dst.planes(spec.layer_indices("full", "sliding")[-1]):
            plane[dst_ref.block_ids[-1]].zero_()
    broken = greedy(model, adapter.build_cache(dst, dst_ref), ref_first)
    assert not all(torch.equal(a, b) for a, b in zip(broken, ref_steps))


@pytest.mark.parametrize("family", ["kimi_linear", "qwen3_next", "llama", "gemma3_text"])
def test_spec_from_config_matches_the_cache(family):
    model, config = tiny_model(family)
    spec = spec_from_config(config)
    with torch.no_grad():
        cache = model(torch.arange(3, 40)[None], use_cache=True).past_key_values
    seen = spec_from_cache(cache, spec.name)
    assert seen.layers == spec.layers and seen.fingerprint == spec.fingerprint  # one layout, one fingerprint


def test_the_adapter_does_not_trace_a_model_its_spec_was_traced_from(monkeypatch):
    """Regression: the first ``build_cache`` traced the model on the meta device again to learn
    its cache class, on the first request's path (the demo's first restore took ~200 ms, the
    next 2 ms), although ``spec_from_config`` had traced the same config moments before. A
    config changed since is traced again (the class is remembered by the config's contents)."""
    from kvlink.engine.hf import spec as hf_spec

    model, config = tiny_model("kimi_linear")
    spec = spec_from_config(config)
    traced = []
    real = hf_spec._trace
    monkeypatch.setattr(hf_spec, "_trace", lambda *args: traced.append(args) or real(*args))
    paged = PagedCache.allocate(spec, 4, BS, num_slots=1, fill="zeros")
    cache = HFCacheAdapter(spec, config).build_cache(paged, CacheRef([1, 2], 20, 0))
    assert traced == [] and type(cache).__name__ == type(hf_spec.trace_cache(config)).__name__
    traced.clear()
    config.use_cache = not config.use_cache  # another config now: its class is not assumed
    HFCacheAdapter(spec, config).build_cache(paged, CacheRef([1, 2], 20, 0))
    assert len(traced) == 1
