"""The SSD tier's byte level: entry views, the fixed index record, verified reads, and telling
a full disk (the put is refused) from a failing one (an error)."""

from __future__ import annotations

import errno
import os
import struct

import xxhash

from kvlink.errors import PoolError
from kvlink.pool.slab import _as_bytes_tensor, _host_view

# magic, version, segment, offset, nbytes, xxh3, stored-at (unix seconds). No pickle: a fixed struct.
RECORD = struct.Struct("<4sBIQQQd")
RECORD_MAGIC, RECORD_VERSION = b"KVLS", 2
READ_PIECE = 1 << 20

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the put is refused, not an error
_FULL_TEXT = tuple(os.strerror(code) for code in _FULL)  # "No space left on device", ...


def views(data) -> list[memoryview]:
    """Byte views of ``data`` (bytes-like, a tensor on any device, or a list of them)."""
    out = []
    for d in data if isinstance(data, (list, tuple)) else [data]:
        if hasattr(d, "element_size"):  # a tensor: its bytes (device tensors are copied to the host)
            d = _host_view(_as_bytes_tensor(d))
        out.append(memoryview(d).cast("B"))
    return out


def encode_record(seg: int, offset: int, nbytes: int, digest: int, stamp: float) -> bytes:
    return RECORD.pack(RECORD_MAGIC, RECORD_VERSION, seg, offset, nbytes, digest, stamp)


def decode_record(raw: bytes) -> tuple[int, int, int, int, float]:
    """(segment, offset, nbytes, xxh3, stored-at) of an index record; :class:`PoolError` for
    another version's (or a damaged) record."""
    try:
        magic, version, seg, offset, nbytes, digest, stamp = RECORD.unpack(raw)
    except struct.error:
        raise PoolError("unknown SSD index record") from None
    if magic != RECORD_MAGIC or version != RECORD_VERSION:
        raise PoolError("unknown SSD index record")
    return seg, offset, nbytes, digest, stamp


def read_into(fd: int, offset: int, buf: memoryview, verify: bool) -> tuple[int, int | None]:
    """Read ``buf`` from ``offset``; (bytes read, their xxh3 when ``verify``)."""
    h = xxhash.xxh3_64() if verify else None
    got = 0
    while got < buf.nbytes:
        # Read a cache-sized piece and hash it while it is still in cache.
        n = os.preadv(fd, [buf[got: got + READ_PIECE]], offset + got)
        if not n:
            break
        if h is not None:
            h.update(buf[got: got + n])
        got += n
    return got, None if h is None else h.intdigest()


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write means "no room" (ENOSPC, EDQUOT, EFBIG) rather than a failing disk.

    An OSError, here or down its cause chain, says so by its errno. rocksdict raises bare
    Exceptions carrying only RocksDB's message, which embeds ``strerror(errno)`` (e.g. "IO error:
    No space left on device"): for those alone the text of those three errnos is matched."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno in _FULL
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, OSError):
        return False  # an OSError without an errno is not a known full disk
    return any(text in str(exc) for text in _FULL_TEXT)
