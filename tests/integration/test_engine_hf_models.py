"""Real tiny transformers models of every cache kind kvlink claims, through the documented flow.

For each model: ``spec = spec_from_config(config)`` (the model's dtype by default), ``adapter =
HFCacheAdapter(spec, config)``, prefill exported (layer by layer from forward hooks through the real
transport, or whole through Packer / Unpacker), ``adapter.build_cache(dst, dst_ref)``; then the
restored cache must continue bit for bit like the uninterrupted one (greedy decode steps: tokens and
logits; a several-token append: logits), the payload must be exactly ``spec.bytes_at(n)`` and
exactly what the transformers cache row holds, and zeroing one carried component must change the
continuation (so the comparison can fail).
"""

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvlink.engine import DecodeSide  # noqa: E402
from kvlink.engine.hf import HFCacheAdapter, spec_from_cache, spec_from_config  # noqa: E402
from kvlink.errors import ConfigError, IncompatibleLayoutError, SpecError  # noqa: E402
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, Unpacker  # noqa: E402
from tests.integration.hf_stream import stream_prefill as streamed  # noqa: E402
from tests.integration.hf_zoo import ZOO, build, one_torch_thread  # noqa: E402,F401  (autouse fixture)

BS = 8
PROMPT = 21  # 3 blocks, the last one partial; overflows the 8-token sliding windows and chunks
APPEND = 5
STEPS = 4
SRC_BLOCKS = [9, 2, 14]
DST_BLOCKS = [3, 0, 12]

# Through the real transport (PrefillSide -> DecodeSide, loopback), layer by layer from forward hooks.
STREAMED = ["falcon_h1", "minimax", "zamba2", "nemotron_h", "llama4_text"]
# Whole-cache export -> Packer -> payload bytes -> Unpacker (the same adapter calls, no sockets).
DIRECT = ["jamba", "lfm2", "mimo_v2_flash", "mamba2", "bailing_hybrid", "qwen3_5_text", "kimi_linear",
          "qwen3_next", "gemma3_text", "deepseek_v32"]
# What the negative control zeroes where the default (the first state, else the last live block of
# the first windowed token tensor, else of the first full one) would not show the component at stake:
# the KV of layers that also hold an SSM state (Falcon-H1) or come from a shared block (Zamba2),
# DeepSeek-V3.2's indexer keys.
CORRUPT = {"falcon_h1": "k", "zamba2": "k", "deepseek_v32": "indexer_k"}


def new_cache(config):
    """The cache the model fills: MiniMax refuses a DynamicCache and uses its own class."""
    if config.model_type == "minimax":
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        return MiniMaxCache()
    return transformers.DynamicCache(config=config)


def prompts(batch=1, length=PROMPT, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=gen), torch.randint(3, 250, (batch, APPEND), generator=gen)


def prefill(model, config, prompt):
    cache = new_cache(config)
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
    return cache, logits


def decode(model, cache, first_logits, steps=STEPS):
    """Greedy decode ``steps`` tokens from ``cache``: (tokens, logits of each step)."""
    tokens, logits, tok = [], [], first_logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for _ in range(steps):
            out = model(tok, cache=cache, use_cache=True).logits
            tok = out[:, -1:].argmax(-1)
            tokens.append(tok)
            logits.append(out)
    return torch.cat(tokens, 1), logits


def append(model, cache, extra):
    """Logits of feeding ``extra`` (several tokens) at once after the cached prefix."""
    with torch.no_grad():
        return model(extra, cache=cache, use_cache=True).logits


def continuations(model, make_cache, first_logits, extra):
    """Both scenarios, each from its own fresh cache: (decode tokens, decode logits, append logits)."""
    tokens, logits = decode(model, make_cache(), first_logits)
    return tokens, logits, append(model, make_cache(), extra)


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and torch.equal(a[2], b[2])


def held_bytes(cache, row=0) -> int:
    """Bytes of one batch row of every tensor the transformers cache holds, found by walking its
    objects (not through the adapter), less the config-derived sliding-window constant."""
    found = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            found[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for obj in (cache, *cache.layers):
        for attr, value in vars(obj).items():
            if attr not in ("layers", "_sliding_window_tensor"):
                visit(value)
    return sum(t[row].numel() * t.element_size() for t in found.values())


class CountingUnpacker(Unpacker):
    """The decode side's real unpacker, adding up the raw bytes of the segments it receives."""

    def __init__(self, cache):
        super().__init__(cache)
        self.raw_nbytes = 0
        self._lock = threading.Lock()  # layers land in worker threads

    def unpack(self, payload, ref, verify=True, group=None):
        payload = payload if isinstance(payload, Payload) else Payload.from_buffer(payload)
        with self._lock:
            self.raw_nbytes += sum(s.raw_nbytes for s in payload.segments)
        return super().unpack(payload, ref, verify, group)


def corrupt(spec, paged: PagedCache, ref: CacheRef, name: str | None = None) -> str:
    """Zero one live component of the request in ``paged``; returns what was zeroed."""
    last_block = ref.block_ids[(ref.num_tokens - 1) // BS]
    picks = []
    for layer, spec_layer in enumerate(spec.layers):
        for index, comp in enumerate(spec_layer.components):
            rank = 0 if comp.is_state else 1 if comp.window != "full" else 2
            picks.append((name != comp.name, rank, layer, index, comp))
    _, _, layer, index, comp = min(picks, key=lambda p: p[:3])
    if comp.is_state:
        paged.tensor(layer, index)[ref.state_slot].zero_()
    else:
        paged.tensor(layer, index)[last_block].zero_()
    return f"layer {layer} {comp.name}"


async def stream_prefill(model, config, adapter, prompt, layers, decode_side, request_id):
    """Prefill streamed layer by layer from forward hooks (see hf_stream); also returns the cache."""
    src = PagedCache.allocate(adapter.spec, 16, BS, num_slots=2, fill="zeros")
    cache = new_cache(config)
    logits, report = await streamed(model, adapter, cache, prompt, src, CacheRef(SRC_BLOCKS, prompt.shape[1], 1),
                                    decode_side.server.address, request_id, layers)
    return cache, logits, report


def holding(spec) -> list[int]:
    """The layers that hold something (NemotronH's MoE and MLP layers hold nothing)."""
    return [i for i, layer in enumerate(spec.layers) if layer.components]


async def transfer_streamed(model, config, adapter, prompt, dst, dst_ref, layers=None):
    """(prefill's cache, its logits, raw bytes of the segments the decode side received).
    ``layers``: the layers sent (default: those that hold something)."""
    layers = holding(adapter.spec) if layers is None else layers
    decode_side = DecodeSide(dst)
    counting = decode_side.unpacker = CountingUnpacker(dst)
    await decode_side.start()
    try:
        decode_side.start_load("r1", dst_ref, layers)
        cache, logits, report = await stream_prefill(model, config, adapter, prompt, layers, decode_side, "r1")
        loaded = await decode_side.wait_all("r1")
        decode_side.release("r1")
    finally:
        await decode_side.close()
    assert loaded.bytes == report.bytes and sorted(loaded.layer_done) == layers
    return cache, logits, counting.raw_nbytes


def transfer_direct(model, config, adapter, prompt, dst, dst_ref):
    """The same with the whole-cache export (of the cache the model makes itself): a payload's
    bytes, unpacked on the other side."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache, logits = out.past_key_values, out.logits
    src = PagedCache.allocate(adapter.spec, 16, BS, num_slots=2, fill="zeros")
    src_ref = CacheRef(SRC_BLOCKS, prompt.shape[1], 1)
    adapter.export(cache, src, src_ref)
    wire = Packer(src).pack(src_ref).tobytes()
    received = Payload.from_buffer(wire)
    Unpacker(dst).unpack(received, dst_ref)
    return cache, logits, sum(s.raw_nbytes for s in received.segments)


def direct_round_trip(model, config, adapter, spec):
    """transfer_direct, then: bit-exact continuation, payload bytes == spec == the cache, and a
    negative control that breaks it. Returns the destination and its reference."""
    prompt, extra = prompts()
    _, ref_first = prefill(model, config, prompt)
    reference = continuations(model, lambda: prefill(model, config, prompt)[0], ref_first, extra)
    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="randn")
    dst_ref = CacheRef(DST_BLOCKS, PROMPT, 2)
    cache, first, received = transfer_direct(model, config, adapter, prompt, dst, dst_ref)
    assert torch.equal(first, ref_first) and received == spec.bytes_at(PROMPT) == held_bytes(cache)
    assert same(continuations(model, lambda: adapter.build_cache(dst, dst_ref), ref_first, extra), reference)
    built = adapter.build_cache(dst, dst_ref)
    corrupt(spec, dst, dst_ref)
    assert not same(continuations(model, lambda: adapter.build_cache(dst, dst_ref), ref_first, extra), reference)
    return built


@pytest.mark.parametrize("model_type", STREAMED + DIRECT)
async def test_continues_bit_exact_and_payload_is_the_cache(model_type):
    config, model = build(model_type)
    spec = spec_from_config(config)  # the documented flow: config alone, the model's dtype
    adapter = HFCacheAdapter(spec, config)
    prompt, extra = prompts()

    ref_cache, ref_first = prefill(model, config, prompt)  # uninterrupted
    reference = continuations(model, lambda: prefill(model, config, prompt)[0], ref_first, extra)

    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="randn")  # anything not written shows
    dst_ref = CacheRef(DST_BLOCKS, PROMPT, 2)
    if model_type in STREAMED:
        cache, first, received = await transfer_streamed(model, config, adapter, prompt, dst, dst_ref)
    else:
        cache, first, received = transfer_direct(model, config, adapter, prompt, dst, dst_ref)
    assert torch.equal(first, ref_first)
    assert received == spec.bytes_at(PROMPT) == held_bytes(cache) == held_bytes(ref_cache)

    restored = continuations(model, lambda: adapter.build_cache(dst, dst_ref), ref_first, extra)
    assert torch.equal(restored[0], reference[0]), f"{model_type}: decode tokens differ"
    assert same(restored, reference), f"{model_type}: logits differ"

    what = corrupt(spec, dst, dst_ref, CORRUPT.get(model_type))
    broken = continuations(model, lambda: adapter.build_cache(dst, dst_ref), ref_first, extra)
    assert not same(broken, reference), f"{model_type}: zeroing {what} changed nothing (the test cannot fail)"


async def test_layers_holding_nothing_stream_too():
    """NemotronH's MoE/MLP layers hold nothing; sending every layer (what a hook on each decoder
    layer does) must still load (regression: DecodeSide refused their payloads without segments)."""
    config, model = build("nemotron_h")
    spec = spec_from_config(config)
    assert holding(spec) != list(range(spec.num_layers))
    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="randn")
    await transfer_streamed(model, config, HFCacheAdapter(spec, config), prompts()[0], dst,
                            CacheRef(DST_BLOCKS, PROMPT, 2), list(range(spec.num_layers)))


@pytest.mark.parametrize("model_type", ["falcon_h1", "qwen3_next"])
def test_batch_rows_are_requests(model_type):
    """A batch of 2: each row exported as its own request, rebuilt as one batch, continues exactly."""
    config, model = build(model_type)
    spec = spec_from_config(config)
    adapter = HFCacheAdapter(spec, config)
    prompt, extra = prompts(batch=2)
    cache, first = prefill(model, config, prompt)
    reference = continuations(model, lambda: prefill(model, config, prompt)[0], first, extra)

    src = PagedCache.allocate(spec, 16, BS, num_slots=2, fill="zeros")
    rows = [CacheRef([9, 2, 14], PROMPT, 1), CacheRef([4, 7, 1], PROMPT, 0)]
    for row, ref in enumerate(rows):
        adapter.export(cache, src, ref, row=row)
    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="randn")
    refs = [CacheRef([3, 0, 12], PROMPT, 2), CacheRef([5, 11, 6], PROMPT, 0)]
    for row, (src_ref, dst_ref) in enumerate(zip(rows, refs)):
        payload = Packer(src).pack(src_ref)
        assert sum(s.raw_nbytes for s in payload.segments) == spec.bytes_at(PROMPT) == held_bytes(cache, row)
        Unpacker(dst).unpack(payload.tobytes(), dst_ref)
    restored = continuations(model, lambda: adapter.build_cache(dst, refs), first, extra)
    assert same(restored, reference)
    swapped = continuations(model, lambda: adapter.build_cache(dst, refs[::-1]), first, extra)
    assert not same(swapped, reference)  # the rows really are different requests

    with pytest.raises(ConfigError):  # transformers caches are not ragged
        adapter.build_cache(dst, [refs[0], CacheRef([5, 11, 6], PROMPT - 1, 0)])
    with pytest.raises(ConfigError):
        adapter.export(cache, src, rows[0], row=2)


def test_bfloat16_model_by_default_and_a_cast_model_is_refused():
    """The spec follows the model's dtype from its config: a model made (or loaded) with
    ``dtype=torch.bfloat16`` sets ``config.dtype``; bf16 K/V and conv state, fp32 SSM state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = "falcon_h1"
    config = AutoConfig.for_model(model_type, **ZOO[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    spec = spec_from_config(config)
    dtypes = {c.name: c.dtype for c in spec.layers[0].components}
    assert dtypes == {"k": "bfloat16", "v": "bfloat16", "conv": "bfloat16", "recurrent": "float32"}
    restored_cache = direct_round_trip(model, config, HFCacheAdapter(spec, config), spec)
    assert restored_cache.layers[0].keys.dtype == torch.bfloat16
    assert restored_cache.layers[0].recurrent_states[0].dtype == torch.float32
    prompt = prompts()[0]

    # model.to(bfloat16) leaves config.dtype unset: the default spec is float32, and export says so.
    cast_config, cast_model = build(model_type, torch.bfloat16)
    assert getattr(cast_config, "dtype", None) in (None, torch.float32)
    f32_adapter = HFCacheAdapter(spec_from_config(cast_config), cast_config)
    cast_cache, _ = prefill(cast_model, cast_config, prompt)
    with pytest.raises(IncompatibleLayoutError, match="bfloat16"):
        f32_adapter.export(cast_cache, PagedCache.allocate(f32_adapter.spec, 16, BS, num_slots=2),
                           CacheRef(SRC_BLOCKS, PROMPT, 1))
    explicit = spec_from_config(cast_config, torch.bfloat16)  # the fix for a cast model: name the dtype
    assert explicit.layers == spec.layers


def fallback_spec(model_type):
    """Where the meta-device trace fails, the fallback the SpecError advises: a real prefill's cache."""
    config, model = build(model_type)
    with pytest.raises(SpecError, match="cannot trace"):
        spec_from_config(config)
    cache, _ = prefill(model, config, prompts()[0])
    return config, model, spec_from_cache(cache, f"hf:{model_type}", config.get_text_config(decoder=True).num_hidden_layers)


@pytest.mark.parametrize("model_type", ["longcat_flash", "moshi"])
def test_spec_from_cache_fallback_continues_bit_exact(model_type):
    """LongCat-Flash (torch.nonzero) and Moshi (Tensor.item) cannot run on the meta device; with the
    spec from a real cache and a cache factory, they round-trip bit-exact."""
    config, model, spec = fallback_spec(model_type)
    direct_round_trip(model, config, HFCacheAdapter(spec, config, cache_factory=lambda: new_cache(config)), spec)


def test_spec_from_cache_fallback_rebuilds_without_a_cache_factory():
    """Regression: build_cache traced the model again and raised the SpecError the fallback avoids."""
    config, model, spec = fallback_spec("moshi")
    dst = PagedCache.allocate(spec, 16, BS, num_slots=3, fill="randn")
    cache = HFCacheAdapter(spec, config).build_cache(dst, CacheRef(DST_BLOCKS, PROMPT, 2))
    assert len(cache.layers) == spec.num_layers and cache.get_seq_length() == PROMPT
