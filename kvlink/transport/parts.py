"""What a receiver's parts land in and are judged by: buffer allocators and the streaming
part-verifier protocol (split from incoming.py)."""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from kvlink.errors import StagingExhausted, TransferRejected

# allocator(nbytes) -> (writable buffer of exactly nbytes, release callback or None)
Allocator = Callable[[int], tuple[memoryview, Callable[[], None] | None]]


class PartScan(Protocol):
    """A part verifier's streaming form (e.g. :class:`kvlink.serde.payload.PayloadScan`)."""

    def advance(self, end: int) -> None:
        """``buf[:end]`` is final; judge what is new in it."""

    def verdict(self) -> bool:
        """After advancing to the end: whether the part is intact."""

    @property
    def scanned(self) -> int:
        """How far it has been advanced (bytes); one that found the part bad may stop short."""

    # Optional (a scan without them is advanced over landed bytes only): hash bytes as they land.
    # ``hot_span(pos) -> (stop, state)``: ``buf[pos:stop]`` may be landed next, hashed into the
    # native running hash at address ``state`` (0: unhashed); ``took(end, hashed)`` after each
    # landing. See :meth:`kvlink.serde.payload.PayloadScan.hot_span`.


Scanner = Callable[[memoryview], PartScan]


def default_allocator(nbytes: int) -> tuple[memoryview, None]:
    """A fresh, uninitialised host buffer (no memset: the received bytes are its first writes)."""
    return memoryview(np.empty(nbytes, dtype=np.uint8)), None


def arena_allocator(arena, overflow: bool = False) -> Allocator:
    """Parts land in leases of a preallocated (pinned when CUDA exists) :class:`StagingArena`,
    so receiving costs no page faults and decode-side unpacking copies from registered memory.
    A full arena rejects the transfer (:class:`TransferRejected`), or with ``overflow`` gives
    the part a fresh buffer of its own instead."""

    def allocate(nbytes: int):
        try:
            lease = arena.lease(nbytes)
        except StagingExhausted as exc:
            if overflow:
                return default_allocator(nbytes)
            raise TransferRejected(f"receive arena full: {exc}") from None
        return memoryview(lease.tensor.numpy()), lease.release

    return allocate
