"""The sender's frame-size policy: rate-sized frames, and before any estimate 4 MiB frames for
concurrent transfers and growing ones for a transfer alone on its client."""

from kvlink.transport.frame_size import EarlyRate, run_bytes

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
