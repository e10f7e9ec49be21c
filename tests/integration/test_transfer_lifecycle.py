"""Transfer lifecycle: a receiver holds nothing for a released transfer (no queue, no cycle, no
buffer), engine sides serve more requests than any backlog, and transfers of 100k parts work."""

import asyncio
import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from kvlink.config import TransportConfig
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.serde import CacheRef, Packer, PagedCache
from kvlink.spec import MLA, CacheSpec
from kvlink.transport import TransferClient, TransferServer

TINY = CacheSpec("lifecycle-tiny", (MLA(16, 16),))
BIG = CacheSpec("lifecycle-big", (MLA(512, 64), MLA(512, 64)))  # 2304 bytes a token
FP = b"\x07" * 16
ONE = TransportConfig(connections=1)


def paged(spec: CacheSpec, blocks: int, seed: int) -> PagedCache:
    torch.manual_seed(seed)
    return PagedCache.allocate(spec, blocks, 16, num_slots=1, fill="randn")


async def one_request(prefill: PrefillSide, decode: DecodeSide, rid: str, src: CacheRef, dst: CacheRef) -> None:
    decode.start_load(rid, dst)
    await prefill.begin(rid, src, decode.server.address)
    for layer in range(prefill.cache.spec.num_layers):
        prefill.save_layer(rid, layer)
    await prefill.finish(rid, timeout=30)
    await asyncio.wait_for(decode.wait_all(rid), 30)
    decode.release(rid)


async def test_decode_side_serves_more_requests_than_the_accept_backlog():
    # Old code queued every begun transfer for accept(), which DecodeSide never calls: the
    # 1025th request (accept_backlog + 1) was refused. 1100 tiny requests, one connection,
    # ten at a time (each request is latency-bound; this keeps the test short).
    wave = 10
    prefill = PrefillSide(paged(TINY, 1, 1), transport=ONE)
    decode = DecodeSide(paged(TINY, wave, 2), ONE, begin_timeout=10)
    await decode.start()
    try:
        src = CacheRef([0], 16, 0)
        for first in range(0, 1100, wave):
            await asyncio.gather(*(one_request(prefill, decode, f"r{first + k}", src, CacheRef([k], 16, 0))
                                   for k in range(wave)))
        assert decode.server.stats["transfers_done"] == 1100
        assert not decode.server._unclaimed and not decode.server._transfers and not decode._loads
        assert decode.server.reserved_bytes == 0
    finally:
        await prefill.close()
        await decode.close()


def _tracking_allocator(arrays: list):
    def allocate(nbytes: int):
        array = np.empty(nbytes, dtype=np.uint8)
        arrays.append(weakref.ref(array))
        return memoryview(array), None
    return allocate


async def test_a_reader_thread_not_scheduled_again_holds_no_released_transfer():
    # Regression: the reader thread handed a landed frame to the loop and only then dropped its
    # references. Until the thread ran again, a transfer the claimer had released (and its part
    # buffer) stayed alive: test_released_transfer_is_freed_by_reference_counting failed now and
    # then on a busy machine (a fresh-clone CI run). Here the reader
    # is held right after the hand-off until the transfer has been released and checked.
    arrays: list = []
    server = TransferServer(ONE, allocator=_tracking_allocator(arrays))
    host, port = await server.start()
    loop = asyncio.get_running_loop()
    handoff, gate = threading.Event(), threading.Event()
    schedule = loop.call_soon_threadsafe

    def hold_reader(callback, *args, **kwargs):
        handle = schedule(callback, *args, **kwargs)
        if threading.current_thread().name == "kvlink-reader" and not handoff.is_set() \
                and getattr(callback, "__name__", "") in ("_deliver", "on_data"):
            handoff.set()
            gate.wait(30)  # released below, once the check is done
        return handle

    loop.call_soon_threadsafe = hold_reader
    gc.collect()
    gc.disable()
    try:
        async with TransferClient(host, port, FP, ONE) as client:
            part = b"\x05" * 20000
            out = client.open(1, transfer_id=7)
            claim = asyncio.ensure_future(server.transfer(7))
            out.add_part(0, part)
            await asyncio.wait_for(out.done(), 10)
            incoming = await asyncio.wait_for(claim, 10)
            assert [bytes(b) for b in await incoming.done()] == [part]
            assert handoff.is_set()  # the reader is held after handing the frame over
            ref = weakref.ref(incoming)
            incoming.release()
            del incoming, claim
            try:
                assert ref() is None, "the reader thread still holds the released transfer"
                assert all(a() is None for a in arrays), "the reader thread still holds the part buffer"
            finally:
                gate.set()
    finally:
        gate.set()
        gc.enable()
        del loop.call_soon_threadsafe
        await server.close()


@pytest.mark.parametrize("accept_queue", [True, False])
async def test_released_transfer_is_freed_by_reference_counting(accept_queue):
    # The receiver must keep no reference (accept queue, waiters, closure cycle, part buffers in
    # futures) once the claimer releases a transfer: with the GC off, refcounting alone frees it.
    arrays: list = []
    server = TransferServer(ONE, allocator=_tracking_allocator(arrays), accept_queue=accept_queue)
    host, port = await server.start()
    gc.collect()
    gc.disable()
    try:
        async with TransferClient(host, port, FP, ONE) as client:
            for round_ in range(3):
                parts = [bytes([round_, i]) * 5000 for i in range(3)]
                out = client.open(len(parts), transfer_id=100 + round_)
                claim = asyncio.ensure_future(server.transfer(100 + round_)) if round_ != 1 else None
                for i, part in enumerate(parts):
                    out.add_part(i, part)
                await asyncio.wait_for(out.done(), 10)
                # round 1 claims only after the transfer ended (it waited, unclaimed, meanwhile)
                incoming = await asyncio.wait_for(claim or server.transfer(100 + round_), 10)
                first = await incoming.part(0)
                assert [bytes(b) for b in await incoming.done()] == parts
                ref = weakref.ref(incoming)
                incoming.release()
                del incoming, first, claim
                assert ref() is None, "the released transfer is still referenced"
                assert all(a() is None for a in arrays), "a released part buffer is still referenced"
                del out
        assert server.reserved_bytes == 0 and not server._unclaimed and not server._waiters
    finally:
        gc.enable()
        await server.close()


async def test_decode_side_keeps_nothing_of_a_released_request():
    prefill = PrefillSide(paged(TINY, 4, 1), transport=ONE)
    decode = DecodeSide(paged(TINY, 4, 2), ONE, begin_timeout=10)
    await decode.start()
    gc.collect()
    gc.disable()
    try:
        for i in range(3):
            rid = f"held{i}"
            decode.start_load(rid, CacheRef([1], 16, 0))
            await prefill.begin(rid, CacheRef([0], 16, 0), decode.server.address)
            prefill.save_layer(rid, 0)
            await prefill.finish(rid, timeout=30)
            await asyncio.wait_for(decode.wait_all(rid), 30)
            ref = weakref.ref(decode._loads[rid].incoming)
            decode.release(rid)
            assert ref() is None, "DecodeSide or its receiver still holds a released request's transfer"
        client = prefill._clients[decode.server.address]
        assert not client._transfers and not prefill._requests
        assert all(not cc.announced for cc in client._conns if cc is not None)  # sender-side state too
    finally:
        gc.enable()
        await prefill.close()
        await decode.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_rss_stays_flat_over_many_multi_mib_requests():
    # Old code: every request's landed bytes stayed in the accept queue (~payload per request).
    tokens = 1024  # 2.25 MiB a request
    blocks = tokens // 16
    prefill = PrefillSide(paged(BIG, blocks, 1), transport=ONE)
    decode = DecodeSide(paged(BIG, blocks, 2), ONE, begin_timeout=10)
    await decode.start()
    try:
        src, dst = CacheRef(list(range(blocks)), tokens, 0), CacheRef(list(range(blocks))[::-1], tokens, 0)
        payload = BIG.bytes_at(tokens)
        for i in range(8):  # warm-up: allocator pools, thread stacks, caches
            await one_request(prefill, decode, f"w{i}", src, dst)
        before = _rss()
        for i in range(30):
            await one_request(prefill, decode, f"r{i}", src, dst)
        grown = _rss() - before  # old code: ~30 payloads (67 MiB)
        assert grown < 16 << 20, f"RSS grew {grown >> 20} MiB over 30 requests of {payload / 2**20:.1f} MiB"
        a, b = Packer(prefill.cache).pack(src).tobytes(), Packer(decode.cache).pack(dst).tobytes()
        assert a == b
    finally:
        await prefill.close()
        await decode.close()


@pytest.mark.parametrize("n, size", [(6000, 1000), (100_000, 16)])
async def test_announcements_beyond_one_control_frame_complete(n, size):
    # Old code announced every part in one PART frame: over the 64 KiB control-body limit
    # (6000 parts: ~72 KiB of [index, length] pairs) the receiver dropped the connection and the
    # sender reconnected until it timed out. Now: several bounded PART frames. 100,000 parts is
    # the bound, end to end (one DATA frame each: ~35 s on 2 cores, the loop's per-frame cost).
    server = TransferServer(ONE, accept_queue=False)
    host, port = await server.start()
    try:
        async with TransferClient(host, port, FP, ONE) as client:
            blob = np.random.default_rng(0).integers(0, 256, n * size, dtype=np.uint8).tobytes()
            out = client.open(n, transfer_id=7)
            for i in range(n):
                out.add_part(i, blob[i * size: (i + 1) * size])
            incoming = await asyncio.wait_for(server.transfer(7), 30)
            got = await asyncio.wait_for(incoming.done(), 240)
            await asyncio.wait_for(out.done(), 30)
            assert len(got) == n and b"".join(bytes(b) for b in got) == blob
            incoming.release()
    finally:
        await server.close()


async def test_100k_parts_are_announced_in_bounded_frames():
    # Every PART frame of a 100_000-part transfer stays far below the control-body limit, and
    # together they announce each part once, in the order added (end to end: the test above).
    from kvlink.transport import handshake as hs
    from kvlink.transport.frame import MAX_CONTROL_BODY
    from kvlink.transport.outgoing import PARTS_PER_FRAME

    n = 100_000
    client = TransferClient("127.0.0.1", 9, FP, ONE)  # never connected: open() only queues
    out = client.open(n, transfer_id=9)
    for i in reversed(range(n)):
        out.add_part(i, b"x" * (i % 7))
    pairs, start, sizes = [], 0, []
    while start < n:
        batch = out.announcement(start)
        sizes.append(len(hs.encode({"parts": batch})))
        pairs += batch
        start += len(batch)
    assert len(sizes) == -(-n // PARTS_PER_FRAME) and max(sizes) < MAX_CONTROL_BODY // 2
    assert pairs == [[i, i % 7] for i in reversed(range(n))]
    assert out.announcement(n) == []


@pytest.mark.parametrize("accept_queue", [True, False])
async def test_unclaimed_transfers_are_bounded_by_the_backlog(accept_queue):
    # accept() applications get back-pressure (refused BEGIN); claim-by-id ones lose the oldest
    # transfer nobody claimed, never the new one.
    from kvlink.errors import TransferRejected

    server = TransferServer(TransportConfig(connections=1, accept_backlog=2), accept_queue=accept_queue)
    host, port = await server.start()
    try:
        async with TransferClient(host, port, FP, ONE) as client:
            for tid in (1, 2):
                await asyncio.wait_for(client.send([b"x" * 100], transfer_id=tid), 10)
            third = client.send([b"y" * 100], transfer_id=3)
            if accept_queue:
                with pytest.raises(TransferRejected):
                    await asyncio.wait_for(third, 10)
                assert list(server._unclaimed) == [1, 2]
            else:
                await asyncio.wait_for(third, 10)
                assert list(server._unclaimed) == [2, 3] and server.stats["unclaimed_dropped"] == 1
                from kvlink.transport.receiver import PART_OVERHEAD, TRANSFER_OVERHEAD

                # the dropped one's bytes (and bookkeeping charge) went back
                assert server.reserved_bytes == 2 * (100 + TRANSFER_OVERHEAD + PART_OVERHEAD)
                incoming = await asyncio.wait_for(server.transfer(3), 10)
                assert [bytes(b) for b in await incoming.done()] == [b"y" * 100]
                incoming.release()
    finally:
        await server.close()
