"""Sender and receiver over real loopback sockets: delivery, streaming, sharing, faults, security."""

import asyncio
import os
import socket
import time

import pytest

from kvlink.config import TransportConfig
from kvlink.errors import (AuthenticationError, FingerprintMismatch, PeerUnreachable, TransferCancelled, TransferFailed,
                           TransferRejected, TransferTimeout)
from kvlink.transport import TransferClient, TransferServer
from kvlink.transport.frame import HEADER_SIZE, FrameType, make_frame, parse_header

from tests.conftest import require_free_memory
from tests.integration.netfaults import FaultProxy
from tests.integration.rawframes import read_frame, send_frame

FP = bytes(range(16))
SMALL = TransportConfig(connections=3, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=512 << 10)


def blobs(sizes, seed=0):
    rng = __import__("random").Random(seed)
    return [rng.randbytes(n) for n in sizes]


async def start_server(config=SMALL, **kwargs):
    server = TransferServer(config, [FP], **kwargs)
    host, port = await server.start()
    return server, port


async def test_bit_exact_streaming_parts_in_any_order():
    server, port = await start_server()
    data = blobs([3 << 20, 0, 5, (1 << 20) + 17, 2 << 20])
    async with TransferClient("127.0.0.1", port, FP, SMALL) as client:
        t = client.open(len(data), meta={"request": "r1"})
        # Parts arrive out of order and later than the transfer begins, as layers do from prefill;
        # the last one is given as several buffers (header + segments).
        t.add_part(3, data[3])
        incoming = await server.accept()
        assert incoming.meta == {"request": "r1"}
        got3 = await incoming.part(3)
        assert bytes(got3) == data[3]
        assert not incoming.complete
        t.add_part(1, data[1])
        t.add_part(0, data[0])
        t.add_part(4, [memoryview(data[4])[:100], memoryview(data[4])[100:70000], memoryview(data[4])[70000:]])
        t.add_part(2, data[2])
        parts = await incoming.done()
        await t.done()
    assert [bytes(p) for p in parts] == data
    assert t.bytes_acked == sum(map(len, data))
    await server.close()


async def test_multi_gigabyte_payload_bit_exact():
    require_free_memory(3.5)
    config = TransportConfig(connections=4)
    server, port = await start_server(config)
    # 2 GiB of distinct bytes without holding 2 GiB twice: one 256 MiB block sent as 8 parts.
    block = memoryview(os.urandom(1 << 20) * 256)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(8)
        for i in range(8):
            t.add_part(i, block)
        incoming = await server.accept()
        for i in range(8):
            part = await incoming.part(i)
            assert part == block, f"part {i} differs"
        await t.done()
    assert t.bytes_acked == 8 * len(block)
    await server.close()


async def test_paced_transfer_meets_its_rate():
    server, port = await start_server()
    rate = 160e6  # bits/s
    data = blobs([8 << 20])
    async with TransferClient("127.0.0.1", port, FP, SMALL) as client:
        t0 = time.monotonic()
        t = await client.send(data, rate=rate)
        seconds = time.monotonic() - t0
    goodput = len(data[0]) * 8 / seconds
    # The bucket starts full (one burst), so allow a little above; never much below.
    assert 0.9 * rate <= goodput <= 1.1 * rate, goodput / rate
    assert t.goodput_bps > 0
    await server.close()


async def test_weighted_shares_follow_weights():
    server, port = await start_server()
    weights = [1, 1, 2, 4]
    data = blobs([6 << 20])[0]
    config = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10, rate_cap=400e6,
                             adaptive=False)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        transfers = [client.open(1, weight=w) for w in weights]
        for t in transfers:
            t.add_part(0, data)
        await transfers[3].done()  # the heaviest finishes first
        acked = [t.bytes_acked for t in transfers]
        for t in transfers[:3]:
            await t.done()
    shares = [a / sum(acked) for a in acked]
    for share, w in zip(shares, weights):
        assert abs(share - w / sum(weights)) <= 0.1 * w / sum(weights) + 0.01, shares
    await server.close()


async def test_deadline_transfer_goes_first():
    server, port = await start_server()
    config = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10, rate_cap=400e6,
                             adaptive=False)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        background = client.open(1, weight=8)
        background.add_part(0, blobs([8 << 20])[0])
        urgent = client.open(1, deadline=0.5)
        urgent.add_part(0, blobs([1 << 20], seed=1)[0])
        await urgent.done()
        assert not background.is_done
        assert background.bytes_acked < 4 << 20
        await background.done()
    await server.close()


async def test_connection_killed_mid_transfer_resumes():
    server, port = await start_server()
    data = blobs([12 << 20, 4 << 20])
    proxy = FaultProxy(port, kill_after=6 << 20)
    proxy_port = await proxy.start()
    async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
        t = client.open(2)
        t.add_part(0, data[0])
        t.add_part(1, data[1])
        incoming = await server.accept()
        parts = await incoming.done()
        await t.done()
        assert client.stats["reconnects"] >= 1
    assert proxy.killed == 1
    assert [bytes(p) for p in parts] == data
    assert t.bytes_resent < 0.1 * sum(map(len, data)), t.bytes_resent
    await proxy.close()
    await server.close()


@pytest.mark.parametrize("reader_threads", [True, False], ids=["reader-threads", "event-loop-reader"])
async def test_corrupt_chunk_is_detected_and_resent(reader_threads):
    server, port = await start_server()
    server.reader_threads = reader_threads
    data = blobs([4 << 20])
    proxy = FaultProxy(port, corrupt_data_frame=5)
    proxy_port = await proxy.start()
    async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
        t = client.open(1)
        t.add_part(0, data[0])
        incoming = await server.accept()
        parts = await incoming.done()
        await t.done()
        assert client.stats["chunks_nacked"] == 1
    assert proxy.corrupted == 1 and server.stats["chunks_corrupt"] == 1
    assert bytes(parts[0]) == data[0]
    await proxy.close()
    await server.close()


async def send_parts(client, server, data, verifiable=True):
    """Send ``data`` as one transfer, one part each; returns it, the incoming side and its parts."""
    t = client.open(len(data), verifiable=verifiable)
    for i, d in enumerate(data):
        t.add_part(i, d)
    incoming = await server.accept()
    parts = await incoming.done()
    await t.done()
    return t, incoming, parts


def digest_verifier(expected: dict[bytes, bool]):
    """A part verifier that knows the good parts by their sha256 (stands in for payload checksums)."""
    import hashlib
    return lambda buf: hashlib.sha256(buf).digest() in expected


async def test_part_verifier_replaces_chunk_checksums_and_resends_a_corrupt_part_whole():
    import hashlib
    data = blobs([3 << 20, 100, 1 << 20])
    server, port = await start_server(part_verifier=digest_verifier({hashlib.sha256(d).digest(): True for d in data}))
    proxy = FaultProxy(port, corrupt_data_frame=7)
    proxy_port = await proxy.start()
    async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
        assert all(cc.peer_verifies_parts and not cc.checked for cc in client._conns)
        t, incoming, parts = await send_parts(client, server, data)
    assert proxy.corrupted == 1 and server.stats["parts_corrupt"] == 1 and server.stats["chunks_corrupt"] == 0
    assert [bytes(p) for p in parts] == data
    assert all(incoming.verified_whole(i) for i in range(len(data)))
    assert t.bytes_resent >= min(len(d) for d in data if d)  # a whole part went again
    await proxy.close()
    await server.close()


@pytest.mark.parametrize("size", [200 << 10, 30 << 10])  # judged after landing / in the reader thread
async def test_part_that_never_verifies_fails_the_transfer_after_bounded_retries(size):
    server, port = await start_server(part_verifier=lambda buf: False)
    config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=512 << 10,
                             chunk_retries=2)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(1, verifiable=True)
        t.add_part(0, blobs([size])[0])
        with pytest.raises(TransferFailed):
            await asyncio.wait_for(t.done(), 30)
    assert server.stats["parts_corrupt"] == 3
    await server.close()


async def test_chunk_checksums_true_keeps_hashing_even_when_the_receiver_verifies_parts():
    server, port = await start_server(part_verifier=lambda buf: True)
    config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=512 << 10,
                             chunk_checksums=True)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        assert client._conns[0].checked
        t = client.open(1, verifiable=True)
        t.add_part(0, blobs([100 << 10])[0])
        incoming = await server.accept()
        await t.done()
        assert not incoming.verified_whole(0)  # checked per chunk, never by the part verifier
    assert server.stats["parts_corrupt"] == 0
    await server.close()


async def test_transfers_not_opened_verifiable_keep_chunk_checksums_to_a_verifying_receiver():
    server, port = await start_server(part_verifier=lambda buf: False)  # would refuse any part
    async with TransferClient("127.0.0.1", port, FP, SMALL) as client:
        assert client._conns[0].peer_verifies_parts
        data = blobs([300 << 10, 5])
        t, incoming, parts = await send_parts(client, server, data, verifiable=False)
        assert [bytes(p) for p in parts] == data and not incoming.verified_whole(0)
    assert server.stats["parts_corrupt"] == 0
    await server.close()


async def test_cancel_reaches_the_receiver():
    server, port = await start_server()
    config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=128 << 10, rate_cap=50e6)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(2)
        t.add_part(0, blobs([256 << 10])[0])
        incoming = await server.accept()
        await incoming.part(0)
        t.cancel()
        with pytest.raises(TransferCancelled):
            await incoming.part(1)
        with pytest.raises(TransferCancelled):
            await t.done()
    assert server.reserved_bytes == 0
    await server.close()


async def test_receiver_cancel_reaches_the_sender():
    server, port = await start_server()
    config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=128 << 10, rate_cap=50e6)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(1)
        t.add_part(0, blobs([4 << 20])[0])
        incoming = await server.accept()
        incoming.cancel()
        with pytest.raises(TransferCancelled):
            await t.done()
    await server.close()


@pytest.mark.parametrize("client_secret, error", [(b"s3cret", None), (b"wrong", AuthenticationError),
                                                  (None, AuthenticationError)])
async def test_shared_secret_handshake(client_secret, error):
    server, port = await start_server(secret=b"s3cret")
    client = TransferClient("127.0.0.1", port, FP, SMALL, secret=client_secret)
    if error is None:
        await client.connect()
        await client.send(blobs([100_000]))
        await client.close()
    else:
        with pytest.raises(error):
            await client.connect()
    await server.close()


async def test_client_with_secret_refuses_an_open_server():
    server, port = await start_server()
    with pytest.raises(AuthenticationError):
        await TransferClient("127.0.0.1", port, FP, SMALL, secret=b"x").connect()
    await server.close()


async def test_fingerprint_mismatch_is_refused():
    server, port = await start_server()
    with pytest.raises(FingerprintMismatch):
        await TransferClient("127.0.0.1", port, bytes(16), SMALL).connect()
    await server.close()


async def test_unreachable_peer_is_typed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(PeerUnreachable):
            await TransferClient("127.0.0.1", port, FP, SMALL).connect()


def _raw_connect(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(5)
    return sock




def _hello(sock):
    from kvlink.transport import handshake as hs
    send_frame(sock, FrameType.HELLO, body=hs.encode({"v": 1, "session": os.urandom(16).hex(), "conn": 0,
                                                       "fingerprint": FP.hex(), "nonce": os.urandom(16).hex()}))
    header, _ = read_frame(sock)
    assert header.type is FrameType.ACCEPT


async def test_bad_frames_are_refused_without_disturbing_other_transfers():
    server, port = await start_server()
    data = blobs([6 << 20])
    config = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10, rate_cap=200e6)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(1)
        t.add_part(0, data[0])
        victim = await server.accept()

        def attack():
            # 1. an authenticated peer writing into someone else's transfer: refused, body dropped
            sock = _raw_connect(port)
            _hello(sock)
            send_frame(sock, FrameType.DATA, tid=victim.transfer_id, body=b"x" * 1000)
            header, body = read_frame(sock)
            assert header.type is FrameType.ERROR and b"unknown transfer" in body
            # 2. its own transfer with an out-of-range offset: refused, that transfer only
            from kvlink.transport import handshake as hs
            send_frame(sock, FrameType.BEGIN, tid=77, body=hs.encode({"parts": 1, "chunk": 16384, "meta": {}}))
            send_frame(sock, FrameType.PART, tid=77, body=hs.encode({"length": 1000}))
            send_frame(sock, FrameType.DATA, tid=77, offset=4096, body=b"y" * 10)
            header, body = read_frame(sock)
            assert header.type is FrameType.ERROR and header.transfer_id == 77
            # 2b. a malformed batch announcement: refused, that transfer only
            send_frame(sock, FrameType.BEGIN, tid=78, body=hs.encode({"parts": 2, "chunk": 16384, "meta": {}}))
            send_frame(sock, FrameType.PART, tid=78, body=hs.encode({"parts": [[0], [1, "x"]]}))
            header, body = read_frame(sock)
            assert header.type is FrameType.ERROR and header.transfer_id == 78
            # 3. garbage where a header belongs: that connection is closed
            sock.sendall(b"GARBAGE!" * 6)
            assert read_frame(sock)[0] is None
            sock.close()
            # 4. no handshake at all: data is never read into any buffer
            sock = _raw_connect(port)
            send_frame(sock, FrameType.DATA, tid=victim.transfer_id, body=b"z" * 100)
            assert read_frame(sock)[0] is None
            sock.close()

        await asyncio.to_thread(attack)
        parts = await victim.done()
        await t.done()
    assert bytes(parts[0]) == data[0]
    assert server.stats["rejected"] >= 2
    await server.close()


async def test_oversized_part_is_rejected():
    config = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10, max_transfer_bytes=1 << 20)
    server, port = await start_server(config)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        with pytest.raises(TransferRejected):
            await client.send(blobs([2 << 20]))
        await client.send(blobs([512 << 10]))  # the next transfer is fine
    await server.close()


async def test_tls_transfer_is_bit_exact(tls_pair):
    server_ctx, client_ctx = tls_pair
    server, port = await start_server(secret=b"k", ssl=server_ctx)
    data = blobs([2 << 20, 12345])
    async with TransferClient("127.0.0.1", port, FP, SMALL, secret=b"k", ssl=client_ctx,
                              server_hostname="localhost") as client:
        t, incoming, parts = await send_parts(client, server, data)
    assert [bytes(p) for p in parts] == data
    await server.close()


async def test_receiver_killed_fails_the_transfer_in_bounded_time(tmp_path):
    import subprocess
    import sys

    from kvlink.presets import get_preset

    proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "transfer", "serve", "--port", "0", "--arena", "64"],
                            stdout=subprocess.PIPE, text=True)
    try:
        import json
        port = json.loads(proc.stdout.readline())["port"]
        fp = get_preset("kimi-linear-48b-a3b").fingerprint
        config = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10,
                                 rate_cap=20e6, adaptive=False, reconnect_attempts=3)
        async with TransferClient("127.0.0.1", port, fp, config) as client:
            t = client.open(1)
            t.add_part(0, blobs([32 << 20])[0])
            while t.bytes_acked == 0:
                await asyncio.sleep(0.01)  # poll: progress is what we wait for, not time
            proc.kill()  # for real: SIGKILL, sockets reset by the kernel
            proc.wait()
            t0 = time.monotonic()
            with pytest.raises(PeerUnreachable):
                await t.done()
            assert time.monotonic() - t0 < 10
    finally:
        proc.kill()


async def test_receiver_waits_for_a_transfer_by_id():
    server, port = await start_server()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(server.transfer(42), 0.05)
    assert not server._waiters  # a waiter that gave up leaves nothing behind
    waiter = asyncio.ensure_future(server.transfer(42))
    async with TransferClient("127.0.0.1", port, FP, SMALL) as client:
        t = client.open(1, transfer_id=42)
        t.add_part(0, b"hello")
        incoming = await waiter
        assert bytes((await incoming.done())[0]) == b"hello"
        await t.done()
    await server.close()


async def test_stalled_receiver_bounds_sender_buffering_and_fails_in_time():
    # A peer that completes the handshake and then never reads again.
    from kvlink.transport import handshake as hs

    stalled = []

    async def handle(reader, writer):
        head = await reader.readexactly(HEADER_SIZE)
        await reader.readexactly(parse_header(head, 1 << 20).length)
        h, body = make_frame(FrameType.ACCEPT, body=hs.encode({"max_chunk": 1 << 24}))
        writer.write(h + bytes(body))
        await writer.drain()
        stalled.append(writer)  # keep it open, read nothing more

    peer = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 16)
    port = peer.sockets[0].getsockname()[1]
    config = TransportConfig(connections=2, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=1 << 20,
                             progress_timeout=0.5, reconnect_attempts=1)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        t = client.open(1)
        t.add_part(0, blobs([64 << 20])[0])
        peak = 0
        waiter = asyncio.ensure_future(t.done())
        while not waiter.done():
            peak = max(peak, sum(c.inflight_bytes for c in client._conns if c is not None))
            await asyncio.wait([waiter], timeout=0.02)
        with pytest.raises(TransferTimeout):
            waiter.result()
    assert 0 < peak <= 2 * config.window_bytes  # bounded by the windows, whatever is queued behind
    assert t.bytes_sent <= 8 * config.window_bytes  # at most a few windows before giving up
    for w in stalled:
        w.transport.abort()
    peer.close()


async def test_streaming_after_idle_gaps_is_not_paced_at_the_producers_pace():
    # Layers arrive with gaps (prefill computing): those intervals are app-limited and must not
    # teach the rate controller that the path is slow (it once paced at ~1 MB/s after this).
    server, port = await start_server(TransportConfig())
    cap = 800e6
    config = TransportConfig(connections=2, rate_cap=cap)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        sizes = [78040, 78040, 78040, 1310864]
        t = client.open(len(sizes))
        incoming = None
        for i, (n, data) in enumerate(zip(sizes, blobs(sizes))):
            await asyncio.sleep(0.35)  # the producer's compute time, not a synchronisation
            t0 = time.monotonic()
            t.add_part(i, data)
            incoming = incoming or await server.accept()
            assert bytes(await incoming.part(i)) == data
            took = time.monotonic() - t0
            assert client.controller.pacing_rate() == cap / 8  # still the cap, never the producer's pace
        assert took < 0.3  # 1.3 MB at 800 Mbit/s is 13 ms; paced at the producer's pace it took ~400 ms
        await t.done()
    await server.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="TCP_NOTSENT_LOWAT is Linux-only")
async def test_unsent_kernel_queue_is_about_a_millisecond_at_the_pacing_rate():
    # Deep enough that writers are not woken per small refill at tens of Gbit/s, shallow enough
    # at low rates that weights and deadlines decide what goes next.
    server, port = await start_server()
    for cap, want in ((2e9, 1 << 20), (24e9, (3_000_000 >> 16) << 16), (400e9, 8 << 20)):
        config = TransportConfig(connections=2, rate_cap=cap, adaptive=False, grid_bytes=16 << 10,
                                 chunk_bytes=64 << 10, window_bytes=512 << 10)
        async with TransferClient("127.0.0.1", port, FP, config) as client:
            await client.send(blobs([100_000]))
            socks = [cc.conn.sock for cc in client._conns if cc is not None and cc.conn is not None]
            assert len(socks) == 2
            assert {s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) for s in socks} == {want}, cap
    await server.close()


@pytest.mark.parametrize("reader_threads", [True, False], ids=["reader-threads", "event-loop-reader"])
async def test_payload_parts_are_judged_as_they_land_and_a_corrupt_one_goes_again_whole(reader_threads):
    from kvlink.bench.transfer import model_payloads
    from kvlink.serde.payload import PayloadScan, payload_intact

    _, payloads = model_payloads("kimi-linear-48b-a3b", 2048)  # ~2 MiB parts: ~35 frames each
    data = [p.tobytes() for p in payloads[:6]]
    server = TransferServer(SMALL, None, part_verifier=payload_intact, part_scanner=PayloadScan)
    server.reader_threads = reader_threads
    _, port = await server.start()
    proxy = FaultProxy(port, corrupt_data_frame=40)
    proxy_port = await proxy.start()
    async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
        t, incoming, parts = await send_parts(client, server, data)
    assert [bytes(p) for p in parts] == data
    assert all(incoming.verified_whole(i) for i in range(len(data)))
    assert proxy.corrupted == 1 and server.stats["parts_corrupt"] == 1 and server.stats["chunks_corrupt"] == 0
    assert t.bytes_resent >= min(map(len, data))  # the corrupt part went again, whole
    judged = server.stats["parts_scanned_on_arrival"] + server.stats["parts_scan_finished_late"]
    assert judged == len(data) + 1  # every judgement (the failed one too) came from a scan
    if reader_threads:  # reader threads scan as bytes land: most parts need nothing at the end
        assert server.stats["parts_scanned_on_arrival"] >= len(data) // 2
    await proxy.close()
    await server.close()


async def test_a_parts_frames_keep_to_one_connection_and_are_verified_as_they_land():
    # Each connection carries its own parts' frames in order, so its reader hashes them into the
    # part's scan while they are in cache (kvlink/ops/landing.py). Before, consecutive frames of
    # a part went out on different connections, landed out of order and most were hashed later,
    # from memory; nothing was hashed while landing at all.
    from kvlink.bench.transfer import model_payloads
    from kvlink.ops.runs import native_available
    from kvlink.serde.payload import PayloadScan, payload_intact

    if not native_available():
        pytest.skip("native CPU library not built")
    _, payloads = model_payloads("kimi-linear-48b-a3b", 2048)
    data = [p.tobytes() for p in payloads[:12]]
    segment_bytes = sum(p.nbytes - len(p.buffers()[0]) for p in payloads[:12])
    server = TransferServer(SMALL, None, part_verifier=payload_intact, part_scanner=PayloadScan)
    _, port = await server.start()
    async with TransferClient("127.0.0.1", port, FP, SMALL) as client:
        t, incoming, parts = await send_parts(client, server, data)
    assert [bytes(p) for p in parts] == data
    assert all(incoming.verified_whole(i) for i in range(len(data)))
    assert client.stats["frames_sent"] >= 12 * 20  # ~2 MiB parts in 64 KiB frames, over 3 connections
    # Only frames a connection with no part of its own left took from another's are hashed later.
    assert server.stats["bytes_scanned_landing"] >= 0.75 * segment_bytes, (server.stats, segment_bytes)
    await server.close()


async def test_a_part_whose_scan_fails_before_its_end_is_judged_and_resent_not_stalled():
    # The flaky stall of the test above, made certain: a PayloadScan that finds a segment bad
    # stops advancing, and a reader thread landing the part's next frame used to loop on it for
    # ever (holding the scan's lock), so the part was never judged and the transfer failed with
    # TransferTimeout after idle_timeout. Above, that happened only when frame 40 fell in a
    # part's first segment; here one connection makes frame 1 (part 0's first 64 KiB) the bad one.
    from kvlink.bench.transfer import model_payloads
    from kvlink.serde.payload import PayloadScan, payload_intact
    from kvlink.serde.wire import parse_header as parse_payload_header

    _, payloads = model_payloads("kimi-linear-48b-a3b", 2048)
    data = [p.tobytes() for p in payloads[:2]]
    header = parse_payload_header(data[0])
    first_end = header.header_len + header.segments[0].offset + header.segments[0].length
    assert 32 << 10 < first_end < len(data[0]) - (128 << 10)  # the flipped byte fails the scan early
    server = TransferServer(TransportConfig(idle_timeout=8.0), None, part_verifier=payload_intact,
                            part_scanner=PayloadScan)
    _, port = await server.start()
    proxy = FaultProxy(port, corrupt_data_frame=1)
    proxy_port = await proxy.start()
    one = TransportConfig(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=512 << 10)
    try:
        async with TransferClient("127.0.0.1", proxy_port, FP, one) as client:
            t, incoming, parts = await asyncio.wait_for(send_parts(client, server, data), 30)
        assert [bytes(p) for p in parts] == data
        assert proxy.corrupted == 1 and server.stats["parts_corrupt"] == 1
        assert t.bytes_resent >= len(data[0])  # part 0 went again, whole
    finally:
        await proxy.close()
        await server.close()


@pytest.mark.parametrize("reader_threads", [True, False], ids=["reader-threads", "event-loop-reader"])
@pytest.mark.parametrize("verify", ["chunks", "parts"])
async def test_connection_cut_inside_a_data_frame_resumes(verify, reader_threads):
    # The run being written when the cut came must be freed, or its resend is dropped for ever.
    data = blobs([3 << 20, 2 << 20])
    server, port = await start_server(**({"part_verifier": lambda buf: True} if verify == "parts" else {}))
    server.reader_threads = reader_threads
    proxy = FaultProxy(port, cut_data_frame=9)
    proxy_port = await proxy.start()
    async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
        t, incoming, parts = await asyncio.wait_for(send_parts(client, server, data), 30)
        assert client.stats["reconnects"] >= 1
    assert proxy.killed == 1
    assert [bytes(p) for p in parts] == data
    await proxy.close()
    await server.close()


async def test_a_run_cut_while_its_part_was_hashed_on_landing_is_hashed_again_when_resent():
    # A reader hashing a frame into its part's scan as it lands was cut halfway; the resend
    # overwrote those bytes, but the scan had already vouched for the first ones and went on
    # from where it stopped: a resend corrupted in that half was accepted as verified. Now the
    # cut restarts the part's scan, the corruption is found and the part is sent again whole.
    from kvlink.bench.transfer import model_payloads
    from kvlink.serde.payload import PayloadScan, payload_intact

    _, payloads = model_payloads("kimi-linear-48b-a3b", 2048)
    data = [p.tobytes() for p in payloads[:2]]
    server = TransferServer(SMALL, None, part_verifier=payload_intact, part_scanner=PayloadScan)
    _, port = await server.start()
    proxy = FaultProxy(port, cut_data_frame=9, corrupt_resend_of_cut=True)
    proxy_port = await proxy.start()
    try:
        async with TransferClient("127.0.0.1", proxy_port, FP, SMALL) as client:
            t, incoming, parts = await asyncio.wait_for(send_parts(client, server, data), 30)
        assert proxy.killed == 1 and proxy.corrupted == 1
        assert [bytes(p) for p in parts] == data
        assert server.stats["parts_corrupt"] == 1  # found, and the part went again whole
    finally:
        await proxy.close()
        await server.close()


async def test_frames_stay_within_a_receivers_smaller_max_chunk():
    # A receiver taking frames of at most 1 MiB is sent 1 MiB frames by a sender whose own
    # largest frame is 64 MiB (before: the handshake failed).
    server, port = await start_server(TransportConfig(max_chunk_bytes=1 << 20, chunk_bytes=1 << 20,
                                                      window_bytes=4 << 20))
    proxy = FaultProxy(port)
    proxy_port = await proxy.start()
    data = blobs([5 << 20, 3])
    async with TransferClient("127.0.0.1", proxy_port, FP, TransportConfig(connections=2)) as client:
        assert client.config.chunk_bytes == 64 << 20
        t, incoming, parts = await send_parts(client, server, data)
    assert [bytes(p) for p in parts] == data
    assert proxy.data_frames >= 5 and proxy.largest_data_frame == 1 << 20
    await proxy.close()
    await server.close()


async def test_a_lone_transfer_sends_large_frames_before_the_first_estimate():
    # Regression: before any rate estimate every frame was 4 MiB, and a 300 MiB loopback
    # transfer (all of it sent before the first estimate) spent a sixth of its time on
    # per-frame costs. Concurrent transfers keep 4 MiB frames, so weights act early.
    config = TransportConfig(connections=1)
    server, port = await start_server(config)
    part = os.urandom(12 << 20)
    try:
        async with TransferClient("127.0.0.1", port, FP, config) as client:
            assert client.controller.bottleneck is None
            await client.send([part])
            assert client.stats["frames_sent"] == 1
        async with TransferClient("127.0.0.1", port, FP, config) as client:
            both = [client.open(1), client.open(1)]
            for t in both:
                t.add_part(0, part)
            await asyncio.gather(*(t.done() for t in both))
            # Each part's first frame is cut before any estimate: 4 MiB, so each takes 2 frames
            # or more (16 MiB frames would carry each in one).
            assert client.stats["frames_sent"] >= 4
    finally:
        await server.close()
