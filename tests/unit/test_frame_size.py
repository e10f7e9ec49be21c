"""The sender's frame-size policy: rate-sized frames, and before any estimate 4 MiB frames for
concurrent transfers and growing ones for a transfer alone on its client; how many frames a
connection's writer may hold (counted by a real writer thread on a real socket)."""

import socket
import threading

from kvlink.transport.frame_size import EarlyRate, has_room, run_bytes
from kvlink.transport.frame import HEADER_SIZE
from kvlink.transport.writer import ThreadWriter

GRID, CAP = 256 << 10, 64 << 20
MiB = 1 << 20


def test_frames_follow_the_rate_once_there_is_one():
    assert run_bytes(GRID, CAP, 1e9, paced=True, lone=False, early=None) == 4_000_000 // GRID * GRID
    assert run_bytes(GRID, CAP, 1e9, paced=False, lone=True, early=5e9) == 16_000_000 // GRID * GRID
    assert run_bytes(GRID, CAP, 1e3, paced=True, lone=False, early=None) == GRID  # at least one chunk
    assert run_bytes(GRID, CAP, 1e12, paced=False, lone=False, early=None) == CAP


def test_before_an_estimate_concurrent_transfers_send_4_mib_and_a_lone_one_more():
    assert run_bytes(GRID, CAP, None, paced=False, lone=False, early=3e9) == 4 * MiB
    assert run_bytes(GRID, CAP, None, paced=False, lone=True, early=None) == 16 * MiB
    assert run_bytes(GRID, CAP, None, paced=False, lone=True, early=3e9) == int(3e9 * 0.016) // GRID * GRID
    assert run_bytes(GRID, CAP, None, paced=False, lone=True, early=1e6) == 16 * MiB  # never below the start
    assert run_bytes(GRID, 8 * MiB, None, paced=False, lone=True, early=3e9) == 8 * MiB  # the receiver's cap
    assert run_bytes(GRID, CAP, 0.0, paced=False, lone=False, early=None) == 4 * MiB  # a stale zero estimate


def test_the_early_rate_counts_from_the_first_send():
    now = [10.0]
    early = EarlyRate(clock=lambda: now[0])
    assert early.rate() is None
    early.acked(100)
    assert early.rate() is None  # nothing sent yet: no clock
    early.sent()
    now[0] = 10.5
    early.sent()  # later sends do not restart it
    early.acked(400)
    assert early.rate() == 500 / 0.5


def test_a_connection_holds_few_frames_however_small_they_are():
    # Regression: the rule counted bytes only. A lone transfer's frames are up to 64 MiB, so a
    # connection writing a 36 MiB part could take 2 MiB parts behind it until 64 MiB were queued,
    # which the other connections, idle at the end of the transfer, could not take.
    run = 64 * MiB
    assert has_room(backlog=36 * MiB, frames=1, run=run, lone=True)  # one ready behind it
    assert not has_room(backlog=38 * MiB, frames=2, run=run, lone=True)
    assert not has_room(backlog=run, frames=1, run=run, lone=True)  # bytes still count
    # Concurrent transfers: ~3 frames ahead, by bytes and by count.
    assert has_room(backlog=3 * MiB, frames=3, run=4 * MiB, lone=False)
    assert not has_room(backlog=4 * MiB, frames=4, run=4 * MiB, lone=False)
    assert not has_room(backlog=12 * MiB, frames=2, run=4 * MiB, lone=False)


def test_a_writer_counts_the_frames_it_has_not_yet_handed_to_the_kernel():
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    errors, emptied = [], threading.Event()
    writer = ThreadWriter(a, errors.append, timeout=30.0, on_sent=lambda: writer.frames or emptied.set())
    try:
        body = memoryview(bytearray(4 * MiB))
        for offset in range(0, 20 * MiB, 4 * MiB):  # far more than the socket buffers hold
            writer.data(1, 0, offset, [body], checked=False)
        assert writer.frames >= 4  # nobody reads b yet: at most one of them is in the kernel

        def drain():
            got = 0
            while got < 5 * (4 * MiB + HEADER_SIZE):
                got += len(b.recv(1 << 20))

        reader = threading.Thread(target=drain)
        reader.start()
        assert emptied.wait(30) and not errors  # set by the writer once its last frame is out
        assert writer.frames == 0 and writer.backlog == 0
        reader.join(30)
    finally:
        writer.close()
        writer.join()
        a.close()
        b.close()
