"""The transfer benchmark's physical baselines: raw sockets into the sink, plain and hashed.

The hashed baseline is only a fair yardstick if its digests are real: a byte flipped on the way
must fail it, as it would fail a verified kvlink transfer."""

import socket
import threading

import pytest

from kvlink.bench.sink import RawSink
from kvlink.bench.transfer import raw_baseline


class FlipRelay:
    """Forwards one direction of each connection to ``port``, flipping the byte at ``flip_at``
    (counted over all bytes sent upstream); replies flow back unchanged."""

    def __init__(self, port: int, flip_at: int):
        self.port, self.flip_at, self.seen = port, flip_at, 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flip: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                data = bytearray(data)
                if flip:
                    with self.lock:
                        if self.seen <= self.flip_at < self.seen + len(data):
                            data[self.flip_at - self.seen] ^= 0x40
                        self.seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink():
    buffer = memoryview(bytearray(8 << 20))
    s = RawSink("127.0.0.1", 0, buffer)
    yield s, buffer
    s.close()


def _buffers():
    data = bytes(range(256)) * (12 << 10)  # 3 MiB, in uneven pieces
    return data, [memoryview(data)[:1000], memoryview(data)[1000:(2 << 20) + 7], memoryview(data)[(2 << 20) + 7:]]


@pytest.mark.parametrize("hashed", [False, True])
def test_baseline_delivers_the_bytes(sink, hashed):
    s, buffer = sink
    data, buffers = _buffers()
    assert raw_baseline("127.0.0.1", s.port, buffers, 4, hashed=hashed) > 0
    assert buffer[:len(data)] == data


def test_hashed_baseline_catches_a_flipped_byte(sink):
    s, _ = sink
    _, buffers = _buffers()
    relay = FlipRelay(s.port, flip_at=100_000)  # inside the first connection's stripe body
    try:
        with pytest.raises(ConnectionError, match="stripe"):
            raw_baseline("127.0.0.1", relay.sock.getsockname()[1], buffers, 1, hashed=True)
    finally:
        relay.close()


def test_plain_baseline_does_not_check(sink):
    s, buffer = sink
    data, buffers = _buffers()
    relay = FlipRelay(s.port, flip_at=100_000)
    try:
        raw_baseline("127.0.0.1", relay.sock.getsockname()[1], buffers, 1, hashed=False)
    finally:
        relay.close()
    assert buffer[:len(data)] != data  # the flipped byte landed unnoticed
