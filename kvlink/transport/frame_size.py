"""How large the sender's next DATA frame is, and how many a connection may hold queued: the
frame-size policy, apart from the sending.

A frame is a run of consecutive grid chunks of one part. Larger frames cost less per byte
(dispatch, wake-ups, acknowledgement); smaller ones keep bursts short and let weights and
deadlines act at a finer grain. See :class:`~kvlink.config.TransportConfig` and docs/transport.md.
"""

from __future__ import annotations

import time
from typing import Callable

FIRST_RUN = 4 << 20         # before any rate estimate, with other transfers on the client ...
FIRST_RUN_LONE = 16 << 20   # ... and for a transfer alone on it
PACED_RUN_S = 0.004         # a frame's worth of data when paced ...
UNPACED_RUN_S = 0.016       # ... and when TCP alone sets the pace


def run_bytes(grid: int, cap: int, rate: float | None, paced: bool, lone: bool, early: float | None) -> int:
    """Largest frame now, in whole ``grid`` chunks, between one chunk and ``cap``.

    With a ``rate`` (bytes/s: the pacing rate when ``paced``, else the bottleneck estimate):
    ~4 ms of data paced, ~16 ms unpaced. Without one (the first ~100 ms): 4 MiB frames, so the
    first frames of concurrent transfers do not commit whole parts before weights can act; a
    ``lone`` transfer (alone on its client, no estimate) starts at 16 MiB and grows them with
    the ``early`` rate its acknowledgements show so far. On a fast path a 300 MiB transfer is
    over before the first estimate, and 4 MiB frames cost it a sixth of its time on loopback.
    """
    if not rate:
        first = FIRST_RUN_LONE if lone else FIRST_RUN
        if lone and early:
            first = max(first, int(early * UNPACED_RUN_S))
        return min(cap, max(grid, first // grid * grid))
    seconds = PACED_RUN_S if paced else UNPACED_RUN_S
    return max(grid, min(cap, int(rate * seconds) // grid * grid))


# DATA frames a connection's writer may hold not yet wholly in the kernel: one being written and
# one ready behind it (a lone transfer before any estimate), or ~3 ahead (see has_room).
QUEUED_FRAMES_LONE = 2
QUEUED_FRAMES = 4


def has_room(backlog: int, frames: int, run: int, lone: bool) -> bool:
    """Whether a connection whose writer holds ``backlog`` bytes in ``frames`` DATA frames not yet
    in the kernel may take another frame of up to ``run`` bytes (:func:`run_bytes`).

    Enough queued that a writer never waits for the event loop (~3 frames, ~12 ms paced, ~50 ms
    unpaced), little enough that weights still act; a ``lone`` transfer before any estimate holds
    one frame's bytes, so its large first frames do not queue far ahead of a transfer that comes
    next. Frames are counted as well as bytes: frames smaller than ``run`` (a part's last run, small
    parts) could otherwise queue by the dozen behind a large one on one connection, where the
    other connections, idle at the end of the transfer, cannot take them (counting them gained
    3-4% of goodput on the 293 MiB Kimi-Linear request over 4 loopback connections)."""
    if lone:
        return backlog < run and frames < QUEUED_FRAMES_LONE
    return backlog < 3 * run and frames < QUEUED_FRAMES


class EarlyRate:
    """Bytes/s acknowledged since a client first sent: what sizes a lone transfer's frames
    before the rate controller has an estimate (an underestimate: acknowledgements lag)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start: float | None = None
        self._acked = 0

    def sent(self) -> None:
        """A DATA frame is going out (the first one starts the clock)."""
        if self._start is None:
            self._start = self._clock()

    def acked(self, nbytes: int) -> None:
        self._acked += nbytes

    def rate(self) -> float | None:
        """None before the first acknowledgement."""
        if self._start is None or not self._acked:
            return None
        return self._acked / max(self._clock() - self._start, 1e-3)
