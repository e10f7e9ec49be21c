"""Hashed socket landings (csrc/cpu/landing.c through kvlink/ops/landing.py), over real sockets."""

import os
import select
import socket
import threading

import numpy as np
import pytest
import xxhash

from kvlink.errors import ConfigError
from kvlink.ops.landing import Lander, Xxh3State
from kvlink.ops.runs import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="native CPU library not built")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def land_all(lander, sock, view, state=0) -> int:
    got = 0
    while got < len(view):
        try:
            n = lander.recv(sock.fileno(), view[got:], state)
        except BlockingIOError:
            select.select([sock], [], [], 5)
            continue
        if n == 0:
            break
        got += n
    return got


@pytest.mark.parametrize("bounce", [4096, 1 << 20])
@pytest.mark.parametrize("size", [1, 4095, 100_003, 3 << 20])
def test_bytes_land_exactly_and_hash_like_xxh3(pair, size, bounce):
    a, b = pair
    data = os.urandom(size)
    sender = threading.Thread(target=a.sendall, args=(data,))
    sender.start()
    dst = bytearray(size + 64)  # unaligned destination inside a larger buffer
    view = memoryview(dst)[7: 7 + size]
    state = Xxh3State()
    assert land_all(Lander(bounce), b, view, state.address) == size
    sender.join()
    assert bytes(view) == data and dst[:7] == bytes(7) and dst[7 + size:] == bytes(64 - 7)
    assert state.intdigest() == xxhash.xxh3_64_intdigest(data)


@pytest.mark.parametrize("prefix", [0, 1, 63, 64, 200, 256, 1000])
@pytest.mark.parametrize("shift", [0, 8, 33])
def test_a_landing_continues_a_running_hash_wherever_its_stripes_fall(pair, prefix, shift):
    # The hash and the streamed stores share one pass where xxh3's 64-byte stripes line up with the
    # destination's cache lines; that depends on what the state holds back from earlier updates.
    # Each case puts the first stripe taken from the socket at a known distance from a line.
    a, b = pair
    head, data = os.urandom(prefix), os.urandom(700_001)
    sender = threading.Thread(target=a.sendall, args=(data,))
    sender.start()
    buf = np.zeros(len(data) + 256, np.uint8)
    lead = (-(prefix if prefix <= 256 else (prefix - 1) % 64 + 1)) % 64  # bytes until its buffer is full
    at = (-buf.ctypes.data - lead + shift) % 64
    view = memoryview(buf)[at: at + len(data)]
    state = Xxh3State()
    state.update(head)
    assert land_all(Lander(), b, view, state.address) == len(data)
    sender.join()
    assert bytes(view) == data and not buf[:at].any() and not buf[at + len(data):].any()
    assert state.intdigest() == xxhash.xxh3_64_intdigest(head + data)


def test_unhashed_landing_and_a_state_fed_in_pieces(pair):
    a, b = pair
    data = os.urandom(300_000)
    a.sendall(data[:200_000])
    dst = bytearray(len(data))
    lander = Lander(64 << 10)
    got = land_all(lander, b, memoryview(dst)[:200_000])
    assert got == 200_000 and bytes(dst[:200_000]) == data[:200_000]
    state = Xxh3State()
    state.update(data[:1000])
    state.update(memoryview(data)[1000:])
    assert state.intdigest() == xxhash.xxh3_64_intdigest(data)
    state.reset()
    assert state.intdigest() == xxhash.xxh3_64_intdigest(b"")


def test_nothing_there_raises_blocking_and_a_closed_peer_returns_zero(pair):
    a, b = pair
    lander = Lander()
    dst = memoryview(bytearray(16))
    with pytest.raises(BlockingIOError):
        lander.recv(b.fileno(), dst)
    a.sendall(b"abc")
    a.close()
    assert land_all(lander, b, dst[:3]) == 3 and bytes(dst[:3]) == b"abc"
    assert lander.recv(b.fileno(), dst) == 0


def test_socket_errors_and_bad_buffers_are_refused(pair):
    _, b = pair
    lander = Lander()
    with pytest.raises(ConfigError):
        lander.recv(b.fileno(), memoryview(b"read-only"))
    with pytest.raises(ConfigError):
        lander.recv(b.fileno(), memoryview(bytearray(0)))
    with pytest.raises(OSError) as info:
        lander.recv(-1, memoryview(bytearray(8)))
    assert not isinstance(info.value, BlockingIOError)
