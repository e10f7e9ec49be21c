"""The SSD tier's byte level: entry views, the fixed index record, verified reads, starting
writeback early, and telling a full disk (the put is refused) from a failing one (an error)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

import xxhash

from kvlink.errors import ConfigError, PoolError
from kvlink.pool.slab import _as_bytes_tensor, _host_view

# magic, version, segment, offset, nbytes, xxh3, stored-at (unix seconds). No pickle: a fixed struct.
RECORD = struct.Struct("<4sBIQQQd")
RECORD_MAGIC, RECORD_VERSION = b"KVLS", 2
# Bytes per read call, hashed right after (from L2/L3). Reads of 1 MiB measured 0.75x of a plain
# sequential read into one buffer, of 8 MiB (the kernel's read-ahead window here) 0.88x.
READ_PIECE = 8 << 20

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


def out_view(out) -> memoryview:
    """A writable byte view of a caller's output buffer: bytes-like, or a contiguous CPU tensor
    (read into in place: no staging copy). Raises :class:`ConfigError` for a device tensor or a
    non-contiguous one (read into a host buffer and copy it over instead)."""
    if hasattr(out, "element_size"):
        if out.device.type != "cpu":
            raise ConfigError("SSD reads land in host memory: pass a CPU tensor or buffer as out")
        out = _as_bytes_tensor(out)
        return memoryview(out.numpy()) if out.numel() else memoryview(bytearray(0))
    return memoryview(out).cast("B")


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
        # Read a piece and hash it while it is still in (last-level) cache.
        n = os.preadv(fd, [buf[got: got + READ_PIECE]], offset + got)
        if not n:
            break
        if h is not None:
            h.update(buf[got: got + n])
        got += n
    return got, None if h is None else h.intdigest()


_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages in the range, do not wait
_libc = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` to disk now, without waiting
    (``sync_file_range``, Linux). A durable put's final ``fdatasync`` then waits for writes already
    in flight instead of starting them all at once; a non-durable put does not leave a backlog of
    dirty pages that someone else's sync pays for later. A hint: it never fails."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):  # not Linux / glibc: the kernel's own writeback does it later
            _libc = False
    if _libc:
        _libc.sync_file_range(fd, offset, nbytes, _SFR_WRITE)


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
