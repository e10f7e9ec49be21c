"""The daemon's landing arena: one preallocated buffer whose leases are freed in any order.

A ring (:class:`~kvlink.serde.staging.StagingArena`) frees nothing until every older lease is
released, so one tenant holding one small lease (a stalled transfer) would block the whole arena
for every other tenant. Here a released range is free at once and merged with its free
neighbours: what one tenant holds costs others only those bytes (each tenant's share is capped
by ``DaemonConfig.tenant_arena_bytes``).
"""

from __future__ import annotations

import bisect
import threading

import torch

from kvlink.errors import ConfigError, StagingExhausted
from kvlink.serde.staging import ALIGN


class ArenaLease:
    """Bytes of a :class:`FreeListArena`, viewed as ``tensor`` (uint8). ``release()`` once done (twice is harmless)."""

    def __init__(self, arena: "FreeListArena", start: int, size: int, tensor: torch.Tensor):
        self._arena, self._range, self.tensor = arena, (start, size), tensor

    def release(self) -> None:
        if self._range is not None:
            self._arena._free_range(*self._range)
            self._range = None


class FreeListArena:
    """``capacity`` bytes (pinned when CUDA exists, pre-faulted otherwise), leased first-fit."""

    def __init__(self, capacity: int, pin: bool | None = None):
        if capacity <= 0:
            raise ConfigError(f"arena capacity must be positive, got {capacity}")
        pin = torch.cuda.is_available() if pin is None else pin
        self.capacity = capacity
        self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        if not pin:
            self.buffer.zero_()  # fault the pages in now, not on the first put's hot path
        self._starts, self._ends = [0], [capacity]  # free ranges [start, end), sorted, never adjacent
        self._lock = threading.Lock()
        self.in_use = 0

    def lease(self, nbytes: int) -> ArenaLease:
        """Reserve ``nbytes`` (rounded up to ``ALIGN``); raises :class:`StagingExhausted` when no
        free range is large enough."""
        if nbytes < 0:
            raise ConfigError(f"cannot lease {nbytes} bytes")
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            for i, (start, end) in enumerate(zip(self._starts, self._ends)):
                if end - start >= size:
                    break
            else:
                raise StagingExhausted(f"landing arena has no free {size} bytes ({self.in_use} of "
                                       f"{self.capacity} in use)")
            if end - start == size:
                del self._starts[i], self._ends[i]
            else:
                self._starts[i] = start + size
            self.in_use += size
        return ArenaLease(self, start, size, self.buffer[start:start + nbytes])

    def _free_range(self, start: int, size: int) -> None:
        end = start + size
        with self._lock:
            self.in_use -= size
            i = bisect.bisect_left(self._starts, start)
            joins_prev = i > 0 and self._ends[i - 1] == start
            joins_next = i < len(self._starts) and self._starts[i] == end
            if joins_prev and joins_next:
                self._ends[i - 1] = self._ends[i]
                del self._starts[i], self._ends[i]
            elif joins_prev:
                self._ends[i - 1] = end
            elif joins_next:
                self._starts[i] = start
            else:
                self._starts.insert(i, start)
                self._ends.insert(i, end)
