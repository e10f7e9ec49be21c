"""Segment checksums: xxh3-64 over the bytes as stored or sent (after encoding)."""

from __future__ import annotations

import xxhash

from kvlink.codec.parallel import PARALLEL_MIN_BYTES, parallel_map
from kvlink.ops import native
from kvlink.ops.landing import Xxh3State
from kvlink.ops.runs import checksums_native, native_available


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object (memoryview, bytes, numpy buffer) without copying it."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_stream():
    """A running :func:`checksum`: ``update(piece)`` in order, then ``intdigest()`` (``reset()``
    to start over) equals ``checksum`` of the pieces joined."""
    return xxhash.xxh3_64()


def native_checksum_stream():
    """A :func:`checksum_stream` kept in native memory when the CPU library is loaded (a
    :class:`~kvlink.ops.landing.Xxh3State`: native code such as a socket landing can feed it
    through its ``address``), else the plain one. Never builds the library: it is made on an
    event loop (a receiver announcing a part), and a transport reader thread builds it."""
    if native.cpu_lib_loaded():
        return Xxh3State()
    return checksum_stream()


def checksum_pieces(pieces) -> int:
    """:func:`checksum` of ``pieces`` (buffers) joined, without joining them."""
    pieces = list(pieces)
    if len(pieces) == 1:
        return checksum(pieces[0])
    hasher = checksum_stream()
    for piece in pieces:
        hasher.update(piece)
    return hasher.intdigest()


def checksums(buffers: list) -> list[int]:
    """Checksums of many buffers, hashed on all cores when they are large (in one native call
    when the CPU library is built, else on the codec thread pool: xxhash releases the GIL)."""
    total = sum(memoryview(b).nbytes for b in buffers)
    if len(buffers) > 1 and total >= PARALLEL_MIN_BYTES:
        if native_available():
            return checksums_native(buffers)
    return parallel_map(checksum, buffers, total)
