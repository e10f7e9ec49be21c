"""Every failure a caller of the transfer and engine APIs sees is a KvlinkError (typed), never a
raw TimeoutError / IndexError / OSError / asyncio.InvalidStateError. Other areas add their own
cases in their own test files."""

import asyncio
import socket

import pytest
import torch

from kvlink.config import TransportConfig
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.engine.decode import SyncDecodeSide
from kvlink.errors import (ConfigError, EngineError, KvlinkError, LoadFailed, PartIndexError, PeerUnreachable,
                           TransferCancelled, TransferRejected, TransferTimeout, TransportError)
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import MLA, CacheSpec
from kvlink.transport import IncomingTransfer, TransferClient, TransferServer

SPEC = CacheSpec("error-contract", (MLA(512, 64), MLA(512, 64)))
FP = b"\x05" * 16
ONE = TransportConfig(connections=1)


def paged(blocks: int = 16, seed: int = 0) -> PagedCache:
    torch.manual_seed(seed)
    return PagedCache.allocate(SPEC, blocks, 16, num_slots=1, fill="randn")


async def raises(kind: type, awaitable_or_call):
    """Run it; assert it raised ``kind`` and that ``kind`` is a KvlinkError. Returns the error."""
    with pytest.raises(kind) as info:
        result = awaitable_or_call()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            await result
    assert isinstance(info.value, KvlinkError), f"{info.value!r} is not a KvlinkError"
    return info.value


async def test_incoming_transfer_failures_are_typed():
    t = IncomingTransfer(1, b"s" * 16, 2, 4096, {}, lambda nbytes: None)
    err = await raises(PartIndexError, lambda: t.part(2))
    assert isinstance(err, IndexError) and isinstance(err, TransferRejected)  # still catchable as before
    await raises(PartIndexError, lambda: t.part(-1))
    await raises(TransportError, t.buffers)  # not complete yet (was asyncio.InvalidStateError)
    t.cancel()
    await raises(TransferCancelled, lambda: t.part(0))
    await raises(TransferCancelled, t.done)


async def test_released_transfer_refuses_further_use():
    server = TransferServer(ONE)
    host, port = await server.start()
    try:
        async with TransferClient(host, port, FP, ONE) as client:
            await client.send([b"a" * 100, b"b" * 10], transfer_id=3)
            incoming = await asyncio.wait_for(server.accept(), 10)
            assert [bytes(b) for b in await incoming.done()] == [b"a" * 100, b"b" * 10]
            incoming.release()
            await raises(TransportError, lambda: incoming.part(0))
            await raises(TransportError, incoming.done)
            await raises(TransportError, incoming.buffers)
    finally:
        await server.close()


async def test_transfer_api_misuse_is_typed():
    await raises(ConfigError, TransferServer(ONE, accept_queue=False).accept)
    client = TransferClient("127.0.0.1", 9, FP, ONE)  # open() needs no connection
    await raises(ConfigError, lambda: client.open(0))
    await raises(ConfigError, lambda: client.open(1, weight=0))
    await raises(ConfigError, lambda: client.open(1, meta={"x": "y" * (61 << 10)}))
    out = client.open(2, transfer_id=11)
    await raises(ConfigError, lambda: client.open(1, transfer_id=11))
    await raises(ConfigError, lambda: out.add_part(2, b"x"))
    out.add_part(0, b"x")
    await raises(ConfigError, lambda: out.add_part(0, b"x"))
    await client.close()


async def test_connect_to_a_closed_port_is_peer_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        client = TransferClient("127.0.0.1", port, FP, TransportConfig(connections=1, reconnect_attempts=0))
        await raises(PeerUnreachable, client.connect)


async def test_prefill_finish_timeout_is_typed_and_cancels_the_transfer():
    # Old code: a raw TimeoutError, and the transfer went on sending buffers already given back.
    slow = TransportConfig(connections=1, rate_cap=800e3, adaptive=False)  # 100 kB/s: ~6 s of data
    decode = DecodeSide(paged(seed=1), ONE, begin_timeout=10)
    await decode.start()
    prefill = PrefillSide(paged(seed=2), transport=slow)
    try:
        decode.start_load("slow", CacheRef(list(range(16)), 256, 0))
        await prefill.begin("slow", CacheRef(list(range(16)), 256, 0), decode.server.address)
        for layer in range(SPEC.num_layers):
            prefill.save_layer("slow", layer)
        await raises(TransferTimeout, lambda: prefill.finish("slow", timeout=0.2))
        err = await raises(LoadFailed, lambda: asyncio.wait_for(decode.wait_all("slow"), 10))
        assert err.causes and all(isinstance(c, TransferCancelled) for c in err.causes.values()), err.causes
        await raises(EngineError, lambda: prefill.finish("slow"))  # forgotten
    finally:
        await prefill.close()
        await decode.close()


async def test_engine_misuse_and_timeouts_are_typed():
    decode = DecodeSide(paged(), ONE, begin_timeout=0.1)
    addr = await decode.start()
    prefill = PrefillSide(paged(seed=2), transport=ONE)
    try:
        await raises(TransportError, lambda: DecodeSide(paged(), ONE).start(*addr))  # port in use (was OSError)
        await raises(EngineError, lambda: decode.wait_all("nobody"))
        decode.start_load("r", CacheRef([0], 16, 0))
        await raises(EngineError, lambda: decode.start_load("r", CacheRef([0], 16, 0)))
        await raises(EngineError, lambda: decode.wait_layer("r", 5))
        err = await raises(LoadFailed, lambda: decode.wait_all("r"))  # nothing began within 0.1 s
        assert isinstance(err.causes[-1], TransferTimeout)
        await raises(EngineError, lambda: prefill.save_layer("nobody", 0))
        await prefill.begin("p", CacheRef([0], 16, 0), addr, layers=[0])
        await raises(EngineError, lambda: prefill.begin("p", CacheRef([0], 16, 0), addr))
        await raises(EngineError, lambda: prefill.save_layer("p", 1))
        prefill.save_layer("p", 0)
        await raises(EngineError, lambda: prefill.save_layer("p", 0))  # was a ConfigError lost in the loop
        await prefill.abort("p")
    finally:
        await prefill.close()
        await decode.close()


def test_sync_decode_side_wait_timeout_is_typed():
    side = SyncDecodeSide(paged(), ONE, begin_timeout=30)
    try:
        side.start_load("r", CacheRef([0], 16, 0))
        with pytest.raises(TransferTimeout):  # was concurrent.futures.TimeoutError
            side.wait_all("r", timeout=0.05)
        with pytest.raises(TransferTimeout):
            side.wait_layer("r", 0, timeout=0.05)
        side.release("r")
    finally:
        side.close()
