"""Append-only segment files: where the SSD tier keeps entry bytes.

Entries are appended one after another to the newest segment (``seg-<n>.kvs``); a new segment
starts when the current one would grow past its target size. Why not a file per entry: a hit's
entries were stored together, so here they lie next to each other and a read of them is one
sequential read (the kernel's readahead spans entries); a file per entry read at about half the
speed of one sequential file on this machine's disk, and millions of small files strain a file
system. The bytes carry no framing: the tier's index says where each entry is.

Readers and the tier's compaction share segments safely: a retired segment's descriptor is
closed only when the last read through it has finished (``acquire``/``release``).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path

_NAME = re.compile(r"^seg-(\d{8})\.kvs$")


def segment_name(seg: int) -> str:
    return f"seg-{seg:08d}.kvs"


class _Segment:
    __slots__ = ("id", "fd", "end", "readers", "retired")

    def __init__(self, seg: int, fd: int, end: int):
        self.id, self.fd, self.end = seg, fd, end
        self.readers = 0
        self.retired = False


class SegmentFiles:
    """The segments under ``root``. Thread-safe. ``durable``: new segments' directory entries
    are synced (entry bytes are synced by :meth:`sync`)."""

    def __init__(self, root: Path, target_bytes: int, durable: bool = False):
        self.root = Path(root)
        self.target = target_bytes
        self.durable = durable
        self._lock = threading.Lock()
        self._segs: dict[int, _Segment] = {}
        for path in self.root.iterdir():
            m = _NAME.match(path.name)
            if m:
                seg = int(m.group(1))
                self._segs[seg] = _Segment(seg, os.open(path, os.O_RDWR), path.stat().st_size)
        # Appends always go to a fresh segment: an old one may end in bytes of a write that was
        # cut short, and nothing is ever written into the middle of a segment.
        self._head: _Segment | None = None
        self._next = max(self._segs, default=0) + 1

    def sizes(self) -> dict[int, int]:
        """Segment id -> bytes on disk."""
        with self._lock:
            return {s.id: s.end for s in self._segs.values()}

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return sum(s.end for s in self._segs.values())

    def head(self) -> int | None:
        with self._lock:
            return None if self._head is None else self._head.id

    # -- writing ------------------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> tuple[int, int]:
        """A place for ``nbytes``: (segment, offset) at the end of the newest segment, or of a new
        one. The caller writes there with :meth:`write`, or gives it back with :meth:`unreserve`."""
        with self._lock:
            head = self._head
            if head is None or (head.end and head.end + nbytes > self.target):
                head = self._new_segment()
            offset = head.end
            head.end += nbytes
            return head.id, offset

    def _new_segment(self) -> _Segment:
        seg = self._next
        self._next += 1
        fd = os.open(self.root / segment_name(seg), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if self.durable:
            dfd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._head = self._segs[seg] = _Segment(seg, fd, 0)
        return self._head

    def unreserve(self, seg: int, offset: int, nbytes: int) -> None:
        """A reservation that was not (fully) written: if nothing was reserved after it, the
        segment is cut back (a full disk gets its space back); else it stays as dead bytes."""
        with self._lock:
            s = self._segs.get(seg)
            if s is not None and s.end == offset + nbytes:
                s.end = offset
                try:
                    os.ftruncate(s.fd, offset)
                except OSError:
                    pass

    def write(self, seg: int, offset: int, pieces, hasher=None, piece_bytes: int = 1 << 20) -> None:
        """Write ``pieces`` (buffers) back to back at ``offset`` (a reservation not yet given
        back, so the segment is there), each hashed into ``hasher`` just before it is written
        (it is then copied from cache). Raises OSError (ENOSPC: disk full)."""
        with self._lock:
            fd = self._segs[seg].fd
        at = offset
        for v in pieces:
            for start in range(0, v.nbytes, piece_bytes):
                piece = v[start: start + piece_bytes]
                if hasher is not None:
                    hasher.update(piece)
                while piece.nbytes:
                    n = os.pwrite(fd, piece, at)
                    if n == 0:
                        raise OSError(errno.ENOSPC, "no progress writing a segment")
                    at += n
                    piece = piece[n:]

    def sync(self, seg: int) -> None:
        os.fdatasync(self._segs[seg].fd)

    # -- reading ------------------------------------------------------------------------------------
    def acquire(self, seg: int) -> int | None:
        """The segment's descriptor, held open until :meth:`release`; None if it is gone."""
        with self._lock:
            s = self._segs.get(seg)
            if s is None:
                return None
            s.readers += 1
            return s.fd

    def release(self, seg: int) -> None:
        with self._lock:
            s = self._segs.get(seg)
            if s is None:
                return
            s.readers -= 1
            if s.retired and s.readers == 0:
                self._close(s)

    def advise(self, seg: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to read this range ahead (asynchronously)."""
        fd = self.acquire(seg)
        if fd is None:
            return
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            self.release(seg)

    # -- removing -----------------------------------------------------------------------------------
    def remove(self, seg: int) -> None:
        """Delete a segment; reads in progress through it finish first (their descriptor stays open)."""
        with self._lock:
            s = self._segs.get(seg)
            if s is None:
                return
            if s is self._head:
                self._head = None
            s.retired = True
            (self.root / segment_name(seg)).unlink(missing_ok=True)
            if s.readers == 0:
                self._close(s)

    def _close(self, s: _Segment) -> None:
        del self._segs[s.id]
        os.close(s.fd)

    def close(self) -> None:
        with self._lock:
            for s in list(self._segs.values()):
                self._close(s)
            self._head = None
