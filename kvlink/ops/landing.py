"""Hashed socket landings: the launcher of ``csrc/cpu/landing.c`` and a native running xxh3.

A receiver's reader thread lands a frame's bytes with :meth:`Lander.recv` and can hash them on the
way into a :class:`Xxh3State` (the running hash a :class:`~kvlink.serde.payload.PayloadScan`
keeps per segment, or a frame's own checksum): one pass over the bytes while they sit in a small
bounce buffer in cache hashes them and streams them to their destination, so verifying them costs
no second pass over memory. Both need the native CPU library
(:func:`kvlink.ops.runs.native_available` says whether it built); callers keep their plain path
when it did not.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from kvlink.errors import ConfigError
from kvlink.ops import native

BOUNCE_BYTES = 1 << 20  # fits a core's L2 (128 KiB to 4 MiB measured the same on loopback)


def _address(view: memoryview) -> int:
    """Address of a contiguous buffer (read-only ones too)."""
    return np.frombuffer(view, np.uint8).ctypes.data if view.nbytes else 0


class Xxh3State:
    """A running xxh3-64 in native memory: equal to ``xxhash.xxh3_64`` fed the same pieces, and
    updatable by native code through :attr:`address`. Raises :class:`BackendUnavailable` without
    the native library. Its memory is a bytearray it owns (freed with it, by reference count)."""

    __slots__ = ("_lib", "_mem", "address")

    def __init__(self):
        lib = native.cpu_lib()
        size, align = lib.kvlink_xxh3_state_size(), lib.kvlink_xxh3_state_align()
        self._lib = lib
        self._mem = bytearray(size + align)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self.address = base + (-base % align)
        lib.kvlink_xxh3_reset(self.address)

    def reset(self) -> None:
        self._lib.kvlink_xxh3_reset(self.address)

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes:
            self._lib.kvlink_xxh3_update(self.address, _address(view), view.nbytes)

    def intdigest(self) -> int:
        return self._lib.kvlink_xxh3_digest(self.address)


class Lander:
    """One reader's landing of socket bytes: a bounce buffer of its own and the native receive.
    Not thread-safe: one per reader thread. Raises :class:`BackendUnavailable` without the
    native library, :class:`ConfigError` for an empty bounce buffer."""

    def __init__(self, bounce_bytes: int = BOUNCE_BYTES):
        if bounce_bytes < 1:
            raise ConfigError(f"a landing's bounce buffer needs at least one byte, got {bounce_bytes}")
        self._lib = native.cpu_lib()
        self._bounce = np.empty(bounce_bytes, np.uint8)
        self._bounce_address = self._bounce.ctypes.data

    def recv(self, fd: int, dst: memoryview, state: int = 0) -> int:
        """Receive up to ``len(dst)`` bytes (> 0) from the non-blocking socket ``fd`` into ``dst``,
        hashing them into the :class:`Xxh3State` at address ``state`` (0: no hash). Returns the
        bytes landed; 0 when the peer closed. Raises :class:`BlockingIOError` when nothing is
        there yet, :class:`OSError` for a socket error, :class:`ConfigError` for a read-only or
        empty ``dst``."""
        if dst.readonly or not dst.nbytes:
            raise ConfigError("a landing needs a writable, non-empty buffer")
        got = self._lib.kvlink_recv_land(fd, _address(dst), dst.nbytes, self._bounce_address, self._bounce.nbytes,
                                         state or None)
        if got < 0:
            raise OSError(-got, os.strerror(-got))  # EAGAIN makes a BlockingIOError
        return got
