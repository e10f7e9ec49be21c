"""Append-only segment files: where the SSD tier keeps entry bytes.

Entries are appended one after another to the newest segment (``seg-<n>.kvs``); a new segment
starts when the current one would grow past its target size. Why not a file per entry: a hit's
entries were stored together, so here they lie next to each other and a read of them is one
sequential read (the kernel's readahead spans entries); a file per entry read at about half the
speed of one sequential file on this machine's disk, and millions of small files strain a file
system. The bytes carry no framing: the tier's index says where each entry is.

Descriptors are opened on use and at most ``MAX_OPEN`` idle ones are kept (a daemon runs a tier
per model and tenant). Every use holds a reference (:meth:`acquire`/:meth:`release`), so a
descriptor is never closed under a read or write in progress, nor when compaction deletes its
segment meanwhile: a retired segment is closed when its last user lets go.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import threading
from pathlib import Path

from kvlink.pool.ssd_io import start_writeback

_NAME = re.compile(r"^seg-(\d{8})\.kvs$")
MAX_OPEN = 32


def segment_name(seg: int) -> str:
    return f"seg-{seg:08d}.kvs"


class _Segment:
    __slots__ = ("id", "fd", "end", "users", "retired")

    def __init__(self, seg: int, fd: int | None, end: int):
        self.id, self.fd, self.end = seg, fd, end
        self.users = 0
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
        self._open: collections.OrderedDict[int, None] = collections.OrderedDict()  # least recent first
        for path in self.root.iterdir():
            m = _NAME.match(path.name)
            if m:
                seg = int(m.group(1))
                self._segs[seg] = _Segment(seg, None, path.stat().st_size)
        # Appends always go to a fresh segment: an old one may end in bytes of a write that was
        # cut short, and nothing is ever written into the middle of a segment.
        self._head: _Segment | None = None
        self._next = max(self._segs, default=0) + 1

    def sizes(self) -> dict[int, int]:
        """Segment id -> bytes on disk (segments not yet deleted)."""
        with self._lock:
            return {s.id: s.end for s in self._segs.values() if not s.retired}

    @property
    def disk_bytes(self) -> int:
        """Bytes in segment files, counting deleted ones still open for a read in progress."""
        with self._lock:
            return sum(s.end for s in self._segs.values())

    def head(self) -> int | None:
        with self._lock:
            return None if self._head is None else self._head.id

    # -- descriptors --------------------------------------------------------------------------------
    def acquire(self, seg: int) -> int | None:
        """The segment's descriptor, held open until :meth:`release`; None if it is gone."""
        with self._lock:
            s = self._segs.get(seg)
            if s is None or s.retired:
                return None
            if s.fd is None:
                s.fd = os.open(self.root / segment_name(seg), os.O_RDWR)
            self._open[seg] = None
            self._open.move_to_end(seg)
            s.users += 1
            self._trim()
            return s.fd

    def release(self, seg: int) -> None:
        with self._lock:
            s = self._segs.get(seg)
            if s is None:
                return
            s.users -= 1
            if s.retired and s.users == 0:
                self._close(s)
                del self._segs[seg]
            else:
                self._trim()

    def _trim(self) -> None:
        """Close the least recently used idle descriptors beyond ``MAX_OPEN`` (under the lock)."""
        for seg in list(self._open):
            if len(self._open) <= MAX_OPEN:
                return
            s = self._segs[seg]
            if s.users == 0:
                self._close(s)

    def _close(self, s: _Segment) -> None:
        if s.fd is not None:
            os.close(s.fd)
            s.fd = None
        self._open.pop(s.id, None)

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
        self._open[seg] = None
        return self._head

    def unreserve(self, seg: int, offset: int, nbytes: int) -> None:
        """A reservation that was not (fully) written: if nothing was reserved after it, the
        segment is cut back (a full disk gets its space back); else it stays as dead bytes."""
        fd = self.acquire(seg)
        if fd is None:
            return
        try:
            with self._lock:
                s = self._segs[seg]
                if s.end == offset + nbytes:
                    s.end = offset
                    try:
                        os.ftruncate(fd, offset)
                    except OSError:
                        pass
        finally:
            self.release(seg)

    def write(self, seg: int, offset: int, pieces, hasher=None, piece_bytes: int = 1 << 20,
              writeback: int = 0) -> None:
        """Write ``pieces`` (buffers) back to back at ``offset`` (a reservation not yet given
        back), each hashed into ``hasher`` just before it is written (it is then copied from
        cache). ``writeback``: start the disk writes of every this many bytes as soon as they are
        written (0: leave it to the kernel). Raises OSError (ENOSPC: disk full)."""
        fd = self.acquire(seg)
        if fd is None:
            raise OSError(errno.ENOENT, f"segment {seg} is gone")
        try:
            at = flushed = offset
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
                    if writeback and at - flushed >= writeback:
                        start_writeback(fd, flushed, at - flushed)
                        flushed = at
            if writeback and at > flushed:
                start_writeback(fd, flushed, at - flushed)
        finally:
            self.release(seg)

    def sync(self, seg: int) -> None:
        fd = self.acquire(seg)
        if fd is not None:
            try:
                os.fdatasync(fd)
            finally:
                self.release(seg)

    # -- reading ------------------------------------------------------------------------------------
    def advise(self, seg: int, offset: int, nbytes: int) -> None:
        """Ask the kernel to read this range ahead (asynchronously); a hint, so it never fails."""
        try:
            fd = self.acquire(seg)
        except OSError:  # the file is gone: the read that follows reports it
            return
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
        """Delete a segment; uses in progress finish first (their descriptor stays open)."""
        with self._lock:
            s = self._segs.get(seg)
            if s is None or s.retired:
                return
            if s is self._head:
                self._head = None
            s.retired = True
            (self.root / segment_name(seg)).unlink(missing_ok=True)
            if s.users == 0:
                self._close(s)
                del self._segs[seg]

    def close(self) -> None:
        with self._lock:
            for s in list(self._segs.values()):
                self._close(s)
            self._segs.clear()
            self._head = None
