"""Engine API faults surface per request, as LoadFailed naming the invalid layers and blocks,
while other requests complete: a prefill process killed mid-load, a corrupt chunk, a peer or
payload built for another layout."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlink.config import TransportConfig
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.errors import FingerprintMismatch, IncompatibleLayoutError, LoadFailed, TransportError
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import MLA, CacheSpec, LinearAttention
from tests.integration.netfaults import FaultProxy

SPEC = CacheSpec("engine-faults", (LinearAttention((4, 32, 32), conv_shape=(64, 4)), MLA(64, 16),
                                   LinearAttention((4, 32, 32), conv_shape=(64, 4)), MLA(64, 16)))
BS, TOKENS = 16, 16 * 40
SRC_BLOCKS = list(range(40, 80))
DST_BLOCKS = list(range(39, -1, -1))


def make_cache(seed: int = 0, spec: CacheSpec = SPEC) -> PagedCache:
    torch.manual_seed(seed)
    return PagedCache.allocate(spec, 96, BS, num_slots=2, fill="randn")


def src_ref(tokens: int = TOKENS) -> CacheRef:
    return CacheRef(SRC_BLOCKS, tokens, 1)


async def send(side: PrefillSide, request_id: str, dest, ref: CacheRef | None = None):
    await side.begin(request_id, ref or src_ref(), dest)
    for layer in range(SPEC.num_layers):
        side.save_layer(request_id, layer)
    return await side.finish(request_id, timeout=30)


def same_layers(a: PagedCache, a_ref: CacheRef, b: PagedCache, b_ref: CacheRef, layers) -> bool:
    from kvlink.serde import Packer
    return all(Packer(a).pack(a_ref, [l]).tobytes() == Packer(b).pack(b_ref, [l]).tobytes() for l in layers)


@pytest.fixture
async def decode():
    side = DecodeSide(make_cache(seed=9), TransportConfig(idle_timeout=1.0), begin_timeout=30.0)
    await side.start()
    yield side
    await side.close()


async def test_prefill_process_killed_mid_load_fails_only_its_request(decode):
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.engine_worker", str(decode.server.address[1])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    dst = CacheRef(DST_BLOCKS, TOKENS, 0)
    try:
        decode.start_load("worker", dst)
        await asyncio.wait_for(decode.wait_layer("worker", 0), 30)  # layer 0 landed: now kill the sender
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        decode.start_load("healthy", CacheRef(list(range(40, 80)), TOKENS, 1))
        healthy = PrefillSide(make_cache(seed=3))
        await send(healthy, "healthy", decode.server.address)
        await healthy.close()
        await decode.wait_all("healthy")
        with pytest.raises(LoadFailed) as info:
            await asyncio.wait_for(decode.wait_all("worker"), 30)
    finally:
        proc.kill()
        proc.wait()
    err = info.value
    assert err.request_id == "worker" and err.invalid_layers == [1, 2, 3]
    assert err.invalid_blocks == DST_BLOCKS
    with pytest.raises(LoadFailed):
        await decode.wait_layer("worker", 2)
    await decode.wait_layer("worker", 0)  # the layer that landed stays valid
    assert same_layers(make_cache(seed=2), src_ref(), decode.cache, dst, [0])
    assert same_layers(make_cache(seed=3), src_ref(), decode.cache, CacheRef(list(range(40, 80)), TOKENS, 1),
                       range(SPEC.num_layers))


async def test_corrupt_chunk_on_the_wire_is_detected_and_its_layer_resent(decode):
    proxy = FaultProxy(decode.server.address[1], corrupt_data_frame=3)
    await proxy.start()
    side = PrefillSide(make_cache(seed=4), transport=TransportConfig(connections=1))
    dst = CacheRef(DST_BLOCKS, TOKENS, 0)
    decode.start_load("corrupt", dst)
    try:
        report = await send(side, "corrupt", ("127.0.0.1", proxy.port))
        await decode.wait_all("corrupt")
    finally:
        await side.close()
        await proxy.close()
    # No chunk checksums on this path: the decode side verified each layer against the payload's
    # own checksums and asked for the corrupted one again.
    assert proxy.corrupted == 1 and decode.server.stats["parts_corrupt"] == 1
    assert report.bytes_resent > 0
    assert same_layers(make_cache(seed=4), src_ref(), decode.cache, dst, range(SPEC.num_layers))


async def test_layer_corrupt_at_the_source_fails_with_its_layer_and_blocks_named(decode):
    side = PrefillSide(make_cache(seed=4), transport=TransportConfig(chunk_retries=2))
    dst = CacheRef(DST_BLOCKS, TOKENS, 0)
    decode.start_load("bad", dst)
    decode.start_load("other", CacheRef(list(range(40, 80)), TOKENS, 1))
    await side.begin("bad", src_ref(), decode.server.address)
    for layer in range(SPEC.num_layers):
        side.save_layer("bad", layer)
        if layer == 1:  # memory corruption after packing: every copy sent carries it
            seg = side._requests["bad"].payloads[-1].datas[-1]
            seg[len(seg) // 2] ^= 0x40
    with pytest.raises(TransportError):
        await side.finish("bad", timeout=30)
    await send(side, "other", decode.server.address)
    await side.close()
    with pytest.raises(LoadFailed) as info:
        await decode.wait_all("bad")
    await decode.wait_all("other")
    err = info.value
    assert 1 in err.invalid_layers and err.invalid_blocks == DST_BLOCKS
    assert decode.server.stats["parts_corrupt"] == 3  # the first try and two resends
    good = [l for l in range(SPEC.num_layers) if l not in err.invalid_layers]
    assert same_layers(make_cache(seed=4), src_ref(), decode.cache, dst, good)


async def test_incompatible_spec_refused_at_handshake_and_load_fails(decode):
    other = CacheSpec("engine-faults", (*SPEC.layers[:3], MLA(32, 16)))
    side = PrefillSide(make_cache(seed=5, spec=other))
    decode.start_load("alien", CacheRef(DST_BLOCKS, TOKENS, 0), timeout=2.0)  # nothing will come
    with pytest.raises(FingerprintMismatch):
        await side.begin("alien", src_ref(), decode.server.address)
    await side.close()
    with pytest.raises(LoadFailed) as info:
        await decode.wait_all("alien")
    assert info.value.invalid_layers == [0, 1, 2, 3] and info.value.invalid_blocks == DST_BLOCKS


async def test_payload_for_other_tokens_fails_every_layer_and_writes_nothing(decode):
    before = make_cache(seed=9)
    side = PrefillSide(make_cache(seed=6))
    decode.start_load("short", CacheRef(DST_BLOCKS, TOKENS, 0))
    await send(side, "short", decode.server.address, src_ref(TOKENS - BS))  # one block short
    await side.close()
    with pytest.raises(LoadFailed) as info:
        await decode.wait_all("short")
    assert info.value.invalid_layers == [0, 1, 2, 3]
    assert all(isinstance(c, IncompatibleLayoutError) for c in info.value.causes.values())
    assert same_layers(before, CacheRef(DST_BLOCKS, TOKENS, 0), decode.cache, CacheRef(DST_BLOCKS, TOKENS, 0),
                       range(SPEC.num_layers))


async def test_payload_starting_after_the_held_prefix_fails_and_writes_nothing(decode):
    # Regression: a payload for tokens [4 blocks, end) into a request that holds no prefix was
    # accepted, and the first 4 blocks kept whatever they held.
    before = make_cache(seed=9)
    side = PrefillSide(make_cache(seed=6))
    decode.start_load("late", CacheRef(DST_BLOCKS, TOKENS, 0))
    await send(side, "late", decode.server.address, CacheRef(SRC_BLOCKS, TOKENS, 1, token_start=4 * BS))
    await side.close()
    with pytest.raises(LoadFailed) as info:
        await decode.wait_all("late")
    assert info.value.invalid_layers == [0, 1, 2, 3]
    assert all("starts at token 64, expected 0" in str(c) for c in info.value.causes.values())
    assert same_layers(before, CacheRef(DST_BLOCKS, TOKENS, 0), decode.cache, CacheRef(DST_BLOCKS, TOKENS, 0),
                       range(SPEC.num_layers))


async def test_receiver_killed_mid_load_fails_that_send_only(decode):
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.engine_worker", "decode"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    side = PrefillSide(make_cache(seed=7), transport=TransportConfig(reconnect_attempts=2, progress_timeout=2.0))
    try:
        port = int((await asyncio.to_thread(proc.stdout.readline)).split()[1])
        await side.begin("victim", src_ref(), ("127.0.0.1", port))
        side.save_layer("victim", 0)
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "landed 0"
        os.kill(proc.pid, signal.SIGKILL)  # the decode process dies with layer 0 in, the rest not sent
        proc.wait()
        for layer in range(1, SPEC.num_layers):
            side.save_layer("victim", layer)
        decode.start_load("alive", CacheRef(DST_BLOCKS, TOKENS, 0))
        await send(side, "alive", decode.server.address)  # the same prefill side, another receiver
        with pytest.raises(TransportError):
            await side.finish("victim", timeout=30)
        await decode.wait_all("alive")
    finally:
        proc.kill()
        proc.wait()
        await side.close()
