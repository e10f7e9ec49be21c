"""PrefillSide with a CodecAdvisor packs each layer with the codec the link's current rate calls
for (compressing on a slow link, raw on a fast one), and the decode side restores it bit-exact."""

import asyncio

import pytest
import torch

from kvlink.codec import Codec
from kvlink.config import TransportConfig
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.serde import CacheRef, Packer, PagedCache
from kvlink.spec import MLA, CacheSpec
from kvlink.transport.adaptive import CodecAdvisor

SPEC = CacheSpec("adaptive-prefill", (MLA(64, 16), MLA(64, 16)))
TOKENS = 256
REF = CacheRef(list(range(16)), TOKENS, 0)


def paged(seed: int) -> PagedCache:
    torch.manual_seed(seed)
    return PagedCache.allocate(SPEC, 16, 16, num_slots=1, fill="randn")


@pytest.mark.parametrize("rate_bps, compressed", [(4e6, True), (400e9, False)])
async def test_layers_are_packed_for_the_link_rate(rate_bps, compressed):
    link = TransportConfig(connections=1, rate_cap=rate_bps, adaptive=False)
    decode = DecodeSide(paged(1), TransportConfig(connections=1), begin_timeout=10)
    await decode.start()
    prefill = PrefillSide(paged(2), transport=link, advisor=CodecAdvisor(cores=1))
    try:
        dst = CacheRef(list(range(15, -1, -1)), TOKENS, 0)
        decode.start_load("r", dst)
        await prefill.begin("r", REF, decode.server.address)
        for layer in range(SPEC.num_layers):
            prefill.save_layer("r", layer)
        codecs = {s.codec for p in prefill._requests["r"].payloads for s in p.segments}
        report = await prefill.finish("r", timeout=30)
        await asyncio.wait_for(decode.wait_all("r"), 30)
        raw = sum(Packer(prefill.cache).pack(REF, [layer]).nbytes for layer in range(SPEC.num_layers))
        if compressed:
            assert Codec.NONE not in codecs and report.bytes < raw
        else:
            assert codecs == {Codec.NONE} and report.bytes == raw
        for layer in range(SPEC.num_layers):  # whatever the codec, the decode side holds the same cache
            got, want = Packer(decode.cache).pack(dst, [layer]), Packer(prefill.cache).pack(REF, [layer])
            assert got.tobytes() == want.tobytes()
    finally:
        await prefill.close()
        await decode.close()


def test_uvloop_is_a_benchmark_argument_not_a_transport_option():
    # TransportConfig.use_uvloop was honoured only by the benchmark: it is the benchmark's own now.
    import inspect

    from kvlink.bench import transfer

    assert "use_uvloop" not in TransportConfig.__dataclass_fields__
    assert inspect.signature(transfer.run).parameters["use_uvloop"].default is True
