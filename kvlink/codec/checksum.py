"""Segment checksums: xxh3-64 over the bytes as stored or sent (after encoding)."""

from __future__ import annotations

import xxhash


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object (memoryview, bytes, numpy buffer) without copying it."""
    return xxhash.xxh3_64_intdigest(data)
