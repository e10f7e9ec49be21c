"""A preallocated, reusable staging area that payload segments live in.

Packing writes straight into leases of one byte buffer (pinned host memory when CUDA exists), and
the transport and pool send or store those bytes without another copy. Leases are handed out as a
ring: released space is reused once every older lease is released too, so memory stays bounded.

Ring semantics (what tests/unit/test_staging_arena.py checks against a model): a lease takes its
size rounded up to ``ALIGN`` and goes right after the newest live lease if it fits before the end
of the buffer; otherwise, unless the ring has already wrapped, at offset 0 if it fits before the
oldest live lease (the skipped tail counts as in use until the ring drains past it). Releasing
frees nothing until every older lease is released; an empty ring starts again at offset 0.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from kvlink.errors import ConfigError, StagingExhausted

ALIGN = 256  # keeps every segment aligned for wide loads and CUDA vector stores


@dataclass
class _Span:
    start: int
    end: int
    released: bool = False


class StagingLease:
    """Bytes ``[start, end)`` of an arena, viewed as ``tensor`` (uint8). Release when sent or stored."""

    def __init__(self, arena: "StagingArena | None", span: _Span | None, tensor: torch.Tensor):
        self._arena, self._span, self.tensor = arena, span, tensor

    def release(self) -> None:
        if self._arena is not None and self._span is not None:
            self._arena._release(self._span)
            self._span = None

    @classmethod
    def standalone(cls, nbytes: int, pin: bool = False) -> "StagingLease":
        """A lease over its own fresh buffer (no arena): convenient, but allocates each time."""
        return cls(None, None, torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin))


class StagingArena:
    """One preallocated byte buffer, leased out in ring order."""

    def __init__(self, capacity: int, pin: bool | None = None):
        if capacity <= 0:
            raise ConfigError(f"staging capacity must be positive, got {capacity}")
        if pin is None:
            pin = torch.cuda.is_available()
        self.capacity = capacity
        self.pinned = pin
        self.buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        if not pin:
            self.buffer.zero_()  # fault the pages in now, not on the first pack's hot path
        self._spans: deque[_Span] = deque()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        with self._lock:
            if not self._spans:
                return 0
            first, last = self._spans[0].start, self._spans[-1].end
            # last == first with live spans is a full wrapped ring, never an empty one.
            return last - first if last > first else self.capacity - first + last

    def lease(self, nbytes: int) -> StagingLease:
        """Reserve ``nbytes``; raises :class:`StagingExhausted` when the ring has no room."""
        if nbytes < 0:
            raise ConfigError(f"cannot lease {nbytes} bytes")
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            start = self._place(size)
            if start is None:
                raise StagingExhausted(f"staging area full: need {size} bytes of {self.capacity}")
            span = _Span(start, start + size)
            self._spans.append(span)
        return StagingLease(self, span, self.buffer[start : start + nbytes])

    def _place(self, size: int) -> int | None:
        if not self._spans:
            return 0 if size <= self.capacity else None
        first, last = self._spans[0].start, self._spans[-1].end
        # Spans are never empty, so last == first means the ring wrapped and is exactly full.
        if last > first:  # not wrapped: room after the last span, else at the front
            if last + size <= self.capacity:
                return last
            return 0 if size <= first else None
        return last if last + size <= first else None

    def _release(self, span: _Span) -> None:
        with self._lock:
            span.released = True
            while self._spans and self._spans[0].released:
                self._spans.popleft()
