"""Which transfer's chunk goes next: deadlines first (earliest first), weighted fair otherwise.

Weighted fairness is start-time fair queueing: each transfer carries a finish tag that grows by
``bytes / weight`` per chunk it sends; the transfer with the smallest start tag
``max(virtual_time, finish_tag)`` goes next. Over any busy interval each transfer's share of
the bytes is its weight over the sum of the weights of the transfers that had data to send.
A transfer with its own rate limit is skipped while its token bucket is in debt.
"""

from __future__ import annotations

import time

from kvlink.transport.outgoing import Chunk, OutgoingTransfer


class ChunkScheduler:
    def __init__(self) -> None:
        self._active: dict[int, OutgoingTransfer] = {}
        self._vtime = 0.0

    def add(self, transfer: OutgoingTransfer) -> None:
        if transfer.has_work:
            self._active[transfer.transfer_id] = transfer

    def remove(self, transfer: OutgoingTransfer) -> None:
        self._active.pop(transfer.transfer_id, None)

    def __len__(self) -> int:
        return len(self._active)

    def pick(self, max_bytes: int, now: float | None = None,
             lane: int | None = None) -> tuple[OutgoingTransfer | None, Chunk | None, float]:
        """The next (transfer, run of at most ``max_bytes``) for connection ``lane`` (see
        :meth:`OutgoingTransfer.take`), or (None, None, wait) where ``wait`` is how long until a
        rate-limited transfer may send again (0: nothing to send at all)."""
        now = time.monotonic() if now is None else now
        best, best_key, wait = None, None, 0.0
        for tid, t in list(self._active.items()):
            if not t.has_work:
                del self._active[tid]
                continue
            if t.bucket is not None:
                delay = t.bucket.wait_time(0)
                if delay > 0:
                    wait = delay if wait == 0 else min(wait, delay)
                    continue
            # Deadline transfers sort before all others (class 0), by deadline; the rest by tag.
            key = (0, t.deadline, 0.0) if t.deadline is not None else (1, 0.0, max(self._vtime, t.vfinish))
            if best_key is None or key < best_key:
                best, best_key = t, key
        if best is None:
            return None, None, wait
        limit = max_bytes
        if best.bucket is not None:  # a capped transfer sends runs of ~4 ms at its own rate
            limit = min(limit, max(best.chunk, int(best.bucket.rate * 0.004)))
        chunk = best.take(limit, lane)
        start = max(self._vtime, best.vfinish)
        best.vfinish = start + chunk[2] / best.weight
        if best.deadline is None:
            self._vtime = start
        if best.bucket is not None:
            best.bucket.reserve(chunk[2])
        if not best.has_work:
            self._active.pop(best.transfer_id, None)
        return best, chunk, 0.0
