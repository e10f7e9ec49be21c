"""Receiver limits against hostile peers, over real loopback sockets: part counts and sizes,
per-peer memory shares and their expiry, connection limits and idle timeouts, TLS and
handshake failures, and warnings for exposed listeners (issue 15, items 4, 5, 6, 17)."""

import asyncio
import logging
import os
import socket
import time
import tracemalloc

import pytest

from kvlink.config import TransportConfig
from kvlink.errors import TransferTimeout
from kvlink.transport import TransferClient, TransferServer
from kvlink.transport import handshake as hs
from kvlink.transport.frame import FrameType
from kvlink.transport.receiver import PART_OVERHEAD, TRANSFER_OVERHEAD

from tests.integration.rawframes import read_frame, send_frame

FP = bytes(range(16))
BASE = dict(connections=1, grid_bytes=16 << 10, chunk_bytes=64 << 10, window_bytes=256 << 10)
SLACK = TRANSFER_OVERHEAD + PART_OVERHEAD  # bookkeeping charged for a transfer with one part announced


def cfg(**kwargs) -> TransportConfig:
    return TransportConfig(**{**BASE, **kwargs})


async def start(config, **kwargs):
    server = TransferServer(config, [FP], **kwargs)
    _, port = await server.start()
    return server, port


def connect(port, source="127.0.0.1", timeout=5.0):
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def send(sock, ftype, tid=0, stream=0, body=b""):
    send_frame(sock, ftype, tid, stream, 0, body)


def hello(sock, session=None):
    send(sock, FrameType.HELLO, body=hs.encode({"v": 1, "session": (session or os.urandom(16)).hex(), "conn": 0,
                                                "fingerprint": FP.hex(), "nonce": os.urandom(16).hex()}))
    return read_frame(sock)


def begin(sock, tid, parts, chunk=16384):
    send(sock, FrameType.BEGIN, tid, body=hs.encode({"parts": parts, "chunk": chunk, "meta": {}}))


def part(sock, tid, index, length):
    send(sock, FrameType.PART, tid, index, body=hs.encode({"length": length}))


def expect_error(sock, tid):
    header, body = read_frame(sock)
    assert header is not None and header.type is FrameType.ERROR and header.transfer_id == tid, (header, body)
    return hs.error_from_body(body)


async def roundtrip(port, config, nbytes=256 << 10, **kwargs):
    data = os.urandom(nbytes)
    async with TransferClient("127.0.0.1", port, FP, config, **kwargs) as client:
        await asyncio.wait_for(client.send([data]), 10)


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)  # polling a condition with a bound, not a sleep standing in for one


# -- item 4: per-frame work and sizes are bounded before anything is allocated ------------------------
BEGINS = 2000


async def test_begin_with_a_million_parts_is_refused_and_many_max_parts_begins_cost_little():
    config = cfg()
    server, port = await start(config)

    def attack():
        sock = connect(port)
        assert hello(sock)[0].type is FrameType.ACCEPT
        t0 = time.monotonic()
        begin(sock, 1, 1 << 20)
        error = expect_error(sock, 1)
        assert "max_parts" in str(error) and time.monotonic() - t0 < 1.0
        # Many of the largest allowed BEGINs are cheap: parts get state only when announced, and
        # a peer may hold max_live_transfers_per_peer unfinished transfers; the rest are refused.
        tracemalloc.start()
        t0 = time.monotonic()
        for tid in range(100, 100 + BEGINS):
            begin(sock, tid, config.max_parts)
        begin(sock, 3, 0)  # refused: its ERROR says every BEGIN before it was handled (in order)
        refused = []
        while (header := read_frame(sock)[0]).transfer_id != 3:
            assert header.type is FrameType.ERROR
            refused.append(header.transfer_id)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sock.close()
        return elapsed, peak, refused

    elapsed, peak, refused = await asyncio.to_thread(attack)
    live = config.max_live_transfers_per_peer
    assert refused == list(range(100 + live, 100 + BEGINS))
    assert len(server._transfers) == live and server.reserved_by("127.0.0.1") == live * TRANSFER_OVERHEAD
    # Before: one 1 MiB part table per BEGIN, none refused (GiBs); now a few KiB per live transfer.
    assert elapsed < 5 and peak < 4 << 20, (elapsed, peak)
    await server.close()


async def test_huge_part_gets_a_typed_error_and_the_connection_survives():
    # Limits far above what exists, so the allocator itself fails (numpy: 128 TiB).
    config = cfg(receive_budget_bytes=1 << 50, max_transfer_bytes=1 << 50)
    server, port = await start(config)
    small = cfg(receive_budget_bytes=1 << 30)
    server2, port2 = await start(small)

    def attack():
        sock = connect(port)
        assert hello(sock)[0].type is FrameType.ACCEPT
        begin(sock, 5, 2)
        part(sock, 5, 0, 1 << 47)
        assert "allocate" in str(expect_error(sock, 5))
        begin(sock, 6, 0)  # the same connection (and its reader thread) still answers
        expect_error(sock, 6)
        sock.close()
        # Within real limits, 48 GiB is refused by the budget before any allocation.
        sock = connect(port2)
        assert hello(sock)[0].type is FrameType.ACCEPT
        begin(sock, 7, 1)
        part(sock, 7, 0, 48 << 30)
        assert "exceed" in str(expect_error(sock, 7))
        sock.close()

    await asyncio.to_thread(attack)
    assert server.reserved_bytes == 0 and server2.reserved_bytes == 0
    await roundtrip(port, config)
    await roundtrip(port2, small)
    await server.close()
    await server2.close()


# -- item 6: per-peer memory shares, and reservations that expire -----------------------------------
async def test_a_peer_cannot_reserve_beyond_its_share_and_others_still_get_through():
    share = 4 * ((256 << 10) + SLACK)
    config = cfg(receive_budget_bytes=2 * share, peer_share_bytes=share, idle_timeout=30.0)
    server, port = await start(config)

    def hog():
        # Grab as much of the budget as it can, one transfer of 256 KiB after another, from
        # several sessions of one address (a trickle of data would keep them all alive).
        sock = connect(port, source="127.0.0.2")
        assert hello(sock)[0].type is FrameType.ACCEPT
        other = connect(port, source="127.0.0.2")
        assert hello(other)[0].type is FrameType.ACCEPT
        for tid in range(20, 28):
            s = sock if tid % 2 else other
            begin(s, tid, 1)
            part(s, tid, 0, 256 << 10)
            begin(s, 99, 0)  # a marker: its ERROR comes after any ERROR for tid
            header, body = read_frame(s)
            if header.transfer_id == tid:
                assert "peer_share_bytes" in body.decode()  # refused at BEGIN (its bookkeeping) or PART
                while (header := read_frame(s)[0]).transfer_id == tid:
                    assert header.type is FrameType.ERROR  # the PART of a refused BEGIN
                assert header.type is FrameType.ERROR and header.transfer_id == 99
                return sock, other, tid - 20
            assert header.transfer_id == 99

    sock, other, granted = await asyncio.to_thread(hog)
    assert granted == 4 and server.reserved_bytes == share == server.reserved_by("127.0.0.2")
    await roundtrip(port, config, nbytes=1 << 20)  # a whole share left for the peer at 127.0.0.1
    sock.close()
    other.close()
    await server.close()


async def test_reservations_of_a_silent_peer_expire():
    config = cfg(receive_budget_bytes=4 << 20, peer_share_bytes=(1 << 20) + SLACK, idle_timeout=0.5)
    server, port = await start(config)

    def reserve():
        sock = connect(port, source="127.0.0.2")
        assert hello(sock)[0].type is FrameType.ACCEPT
        begin(sock, 11, 2)
        part(sock, 11, 0, 1 << 20)
        begin(sock, 13, 0)
        expect_error(sock, 13)  # the PART before it was handled
        return sock

    sock = await asyncio.to_thread(reserve)
    incoming = await asyncio.wait_for(server.transfer(11), 5)
    assert incoming.reserved == 1 << 20 or isinstance(incoming.error, TransferTimeout)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        await asyncio.wait_for(incoming.done(), 5)
    assert time.monotonic() - t0 < 3
    assert server.reserved_bytes == 0 and server.reserved_by("127.0.0.2") == 0 and not server._ledger.by_peer

    def reserve_again():  # the same peer has its whole share back
        begin(sock, 12, 1)
        part(sock, 12, 0, 1 << 20)
        begin(sock, 14, 0)
        expect_error(sock, 14)

    await asyncio.to_thread(reserve_again)
    assert server.reserved_bytes == (1 << 20) + SLACK
    sock.close()
    await server.close()


def test_default_budget_fits_the_host():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    config = TransportConfig()
    assert config.receive_budget_bytes <= max(256 << 20, total // 2)
    assert config.transfer_limit <= config.peer_share <= config.receive_budget_bytes


# -- item 5: connection limits, idle connections, TLS and AUTH handshakes ---------------------------
async def test_connection_limits_per_peer_and_in_total():
    config = cfg(max_connections_per_peer=3, max_connections=6)
    server, port = await start(config)

    def flood():
        socks = []
        for _ in range(3):
            socks.append(connect(port, source="127.0.0.2"))
            assert hello(socks[-1])[0].type is FrameType.ACCEPT
        extra = connect(port, source="127.0.0.2")
        header, body = hello(extra)  # refused once it completes its handshake (a peer is known only then)
        assert header.type is FrameType.ERROR and "max_connections_per_peer" in body.decode()
        assert read_frame(extra)[0] is None
        extra.close()
        for _ in range(2):
            socks.append(connect(port, source="127.0.0.3"))
            assert hello(socks[-1])[0].type is FrameType.ACCEPT
        return socks

    socks = await asyncio.to_thread(flood)
    await roundtrip(port, config)  # the sixth connection: a legitimate sender gets through
    await wait_until(lambda: len(server._conns) == 5)

    def one_more():
        sock = connect(port, source="127.0.0.4")
        _ = hello(sock)  # fills the last slot
        late = connect(port, source="127.0.0.5")
        header, body = hello(late)
        assert header.type is FrameType.ERROR and "max_connections" in body.decode()
        late.close()
        sock.close()

    await asyncio.to_thread(one_more)
    assert server.stats["connections_refused"] == 2
    for s in socks:
        s.close()
    await wait_until(lambda: not server._conns and not server._peer_conns)
    await server.close()


async def test_idle_authenticated_connections_are_closed_and_senders_reconnect():
    config = cfg(conn_idle_timeout=0.3)
    server, port = await start(config)

    def idle():
        sock = connect(port)
        assert hello(sock)[0].type is FrameType.ACCEPT
        t0 = time.monotonic()
        header, _ = read_frame(sock)  # the receiver says why, then closes
        assert header.type is FrameType.ERROR
        assert read_frame(sock)[0] is None
        sock.close()
        return time.monotonic() - t0

    assert 0.25 < await asyncio.to_thread(idle) < 3
    data = os.urandom(256 << 10)
    async with TransferClient("127.0.0.1", port, FP, config) as client:
        await asyncio.wait_for(client.send([data]), 10)
        closed = server.stats["connections_idle_closed"]
        await wait_until(lambda: server.stats["connections_idle_closed"] > closed)
        await asyncio.wait_for(client.send([data]), 10)  # after its idle connection was closed
    await server.close()


async def test_silent_tls_peer_is_dropped_within_the_handshake_timeout(tls_pair):
    server_ctx, client_ctx = tls_pair
    config = cfg(handshake_timeout=0.5)
    server, port = await start(config, ssl=server_ctx)

    def silent():
        sock = connect(port)
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # closed by the receiver; never a TLS byte from us
        sock.close()
        return time.monotonic() - t0

    assert await asyncio.to_thread(silent) < 3
    await roundtrip(port, config, ssl=client_ctx, server_hostname="localhost")
    await server.close()


async def test_non_ascii_auth_mac_is_a_typed_refusal():
    config = cfg()
    server, port = await start(config, secret=b"s3cret")
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))

    def attack():
        sock = connect(port)
        header, _ = hello(sock)
        assert header.type is FrameType.CHALLENGE
        send(sock, FrameType.AUTH, body=hs.encode({"mac": "\u00e9" * 64}))
        header, body = read_frame(sock)
        assert header.type is FrameType.ERROR and type(hs.error_from_body(body)).__name__ == "AuthenticationError"
        assert read_frame(sock)[0] is None
        sock.close()

    await asyncio.to_thread(attack)
    await roundtrip(port, config, secret=b"s3cret")
    assert not errors
    await server.close()


# -- item 17: exposed listeners say so ----------------------------------------------------------
async def test_start_warns_when_exposed_without_secret_or_tls(caplog, tls_pair):
    caplog.set_level(logging.WARNING, logger="kvlink.transport")
    server = TransferServer(cfg(), [FP])
    await server.start("127.0.0.1")
    await server.close()
    assert not caplog.records  # loopback: nothing to say
    server = TransferServer(cfg(), [FP])
    await server.start("0.0.0.0")
    await server.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "kvlink.transport"]
    assert any("without a secret" in m for m in messages) and any("without TLS" in m for m in messages)
    caplog.clear()
    server = TransferServer(cfg(), [FP], secret=b"s", ssl=tls_pair[0])
    await server.start("0.0.0.0")
    await server.close()
    assert not [r for r in caplog.records if r.name == "kvlink.transport"]
