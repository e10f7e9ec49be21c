"""Copy-and-hash runs: the launcher of ``csrc/cpu/runs.c`` and its pure-Python reference.

A *job* moves one segment's bytes between two lists of pieces (a packed buffer, cache rows,
pool pages) and hashes them on the way: its digest is xxh3-64 over the source bytes in order,
i.e. the segment's checksum. Pack, unpack and pool restores batch every segment of a call into
one :class:`Runs` and make one native call: the jobs run on all cores, each byte is hashed while
it is in cache and copied from there, so integrity costs no second pass over memory.

Pieces are ``(addresses, lengths)`` int64 arrays. They are only made here, from tensors and
buffers whose bounds the callers checked (block ids, slots, segment lengths): the native code
trusts them.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np
import torch
import xxhash

from kvlink.config import OpsConfig
from kvlink.errors import BackendUnavailable, ConfigError
from kvlink.ops import native

Pieces = tuple[np.ndarray, np.ndarray]
_HASH, _COPY, _STREAM = 1, 2, 4


@lru_cache(maxsize=1)
def _threads() -> int:
    return OpsConfig.from_env().threads or os.cpu_count() or 1


def native_available() -> bool:
    try:
        native.cpu_lib()
        return True
    except BackendUnavailable:
        return False


def buffer_pieces(buf) -> Pieces:
    """One piece over a bytes-like object or a contiguous CPU tensor (read-only views too)."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ConfigError("copy runs need contiguous CPU tensors")
        return np.array([buf.data_ptr()], np.int64), np.array([buf.numel() * buf.element_size()], np.int64)
    view = memoryview(buf)
    if not view.contiguous:
        raise ConfigError("copy runs need contiguous buffers")
    arr = np.frombuffer(view.cast("B"), np.uint8)
    return np.array([arr.ctypes.data], np.int64), np.array([arr.nbytes], np.int64)


def concat(pieces: list[Pieces]) -> Pieces:
    if len(pieces) == 1:
        return pieces[0]
    return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])


def slice_pieces(pieces: Pieces, start: int, length: int) -> Pieces:
    """Bytes ``[start, start + length)`` of the pieces' concatenation, as pieces.
    Raises :class:`ConfigError` when the range runs past the end."""
    addr, lens = pieces
    if len(addr) == 1 and 0 <= start and 0 <= length and start + length <= int(lens[0]):
        return np.array([int(addr[0]) + start], np.int64), np.array([length], np.int64)
    ends = np.cumsum(lens)
    if start < 0 or length < 0 or start + length > (int(ends[-1]) if len(ends) else 0):
        raise ConfigError(f"bytes [{start}, {start + length}) lie outside pieces of {int(ends[-1]) if len(ends) else 0}")
    if length == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = int(np.searchsorted(ends, start, side="right"))
    z = int(np.searchsorted(ends, start + length, side="left"))
    out_addr, out_lens = addr[a:z + 1].copy(), lens[a:z + 1].copy()
    skip = start - (int(ends[a]) - int(lens[a]))
    out_addr[0] += skip
    out_lens[0] -= skip
    out_lens[-1] -= int(ends[z]) - (start + length)
    return out_addr, out_lens


def _align(src: Pieces, dst: Pieces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut two piece lists of equal total length at each other's boundaries: (src, dst, len) runs."""
    (sa, sl), (da, dl) = src, dst
    keep_s, keep_d = sl > 0, dl > 0
    sa, sl, da, dl = sa[keep_s], sl[keep_s], da[keep_d], dl[keep_d]
    if len(sl) == len(dl) and np.array_equal(sl, dl):
        return sa, da, sl  # pieces already match (e.g. rows <-> a packed buffer cut per row)
    if len(sl) == 1:  # one contiguous source: cut it as the destination is cut
        return sa[0] + np.concatenate(([0], np.cumsum(dl)[:-1])), da, dl
    if len(dl) == 1:
        return sa, da[0] + np.concatenate(([0], np.cumsum(sl)[:-1])), sl
    sc, dc = np.cumsum(sl), np.cumsum(dl)
    ends = np.union1d(sc, dc)
    starts = np.concatenate(([0], ends[:-1]))
    si = np.searchsorted(sc, starts, side="right")
    di = np.searchsorted(dc, starts, side="right")
    return sa[si] + (starts - (sc[si] - sl[si])), da[di] + (starts - (dc[di] - dl[di])), ends - starts


class Runs:
    """A batch of jobs, done by one :meth:`run`. Not thread-safe (one builder per call).

    Two kinds of job: :meth:`add` (any two piece lists) and plane jobs (:meth:`add_plane`,
    :meth:`add_planes`: a packed segment and token rows of a paged plane, described by a few
    integers: no per-row Python work)."""

    def __init__(self) -> None:
        self._chunks: list[tuple[bool, int]] = []  # jobs in the order added: (plane jobs?, how many)
        self._count = 0
        self._src: list[np.ndarray] = []
        self._dst: list[np.ndarray] = []
        self._len: list[np.ndarray] = []
        self._planes: list[np.ndarray] = []  # [n, 8] descriptors
        self._nplanes = 0
        self._ids: list[np.ndarray] = [np.zeros(1, np.int64)]  # index 0: a block id 0, for single pieces
        self._ids_len = 1

    def __len__(self) -> int:
        return self._count

    def _added(self, plane: bool, n: int) -> int:
        first = self._count
        if self._chunks and self._chunks[-1][0] == plane:
            self._chunks[-1] = (plane, self._chunks[-1][1] + n)
        else:
            self._chunks.append((plane, n))
        self._count += n
        return first

    def add(self, src: Pieces, dst: Pieces | None = None) -> int:
        """Add a job copying ``src`` to ``dst`` (or only hashing ``src``); returns its index.
        Raises :class:`ConfigError` when the two do not hold the same number of bytes."""
        if dst is None:
            keep = src[1] > 0
            s, d, n = src[0][keep], src[0][keep], src[1][keep]
        else:
            if int(src[1].sum()) != int(dst[1].sum()):
                raise ConfigError(f"copy of {int(src[1].sum())} bytes into {int(dst[1].sum())}")
            s, d, n = _align(src, dst)
        self._src.append(s.astype(np.int64, copy=False))
        self._dst.append(d.astype(np.int64, copy=False))
        self._len.append(n.astype(np.int64, copy=False))
        return self._added(False, 1)

    def block_ids(self, ids: np.ndarray) -> int:
        """Register a request's block ids for plane jobs; returns their offset."""
        at = self._ids_len
        self._ids.append(np.ascontiguousarray(ids, np.int64))
        self._ids_len += len(ids)
        return at

    def add_plane(self, flat: int, base: int, stride: int, row: int, skip: int, length: int, ids_at: int,
                  scatter: bool) -> int:
        """Add a job between ``length`` packed bytes at address ``flat`` and token rows of a plane:
        block ``k`` of the segment is row ``ids[ids_at + k]`` at ``base + id * stride``, of which
        ``row`` bytes hold tokens; the first ``skip`` bytes of the first row are not part of it.
        ``scatter``: packed -> rows (else rows -> packed). A single piece at ``base``: ``stride``
        0, ``row == length``, ``ids_at`` 0. The caller guarantees every address is in bounds."""
        return self.add_planes(np.array([[flat, base, stride, row, skip, length, ids_at, int(scatter)]], np.int64))

    def add_planes(self, desc: np.ndarray) -> int:
        """Add ``len(desc)`` plane jobs at once, one :meth:`add_plane` argument list per row of the
        int64 array ``desc`` (``[n, 8]``, not copied: leave it alone until :meth:`run`); returns
        the first one's index."""
        if desc.ndim != 2 or desc.shape[1] != 8 or desc.dtype != np.int64:
            raise ConfigError(f"plane jobs are [n, 8] int64 rows, got {desc.dtype} {tuple(desc.shape)}")
        self._planes.append(desc)
        self._nplanes += len(desc)
        return self._added(True, len(desc))

    def run(self, copy: bool = True, hash: bool = True, stream: bool = True) -> list[int]:
        """Do every job; returns the digests (zeros without ``hash``), in the order added.
        ``stream``: large copies use non-temporal stores (right when the destination is not
        read again soon)."""
        return [int(d) for d in self.run_digests(copy, hash, stream)]

    def run_digests(self, copy: bool = True, hash: bool = True, stream: bool = True) -> np.ndarray:
        """:meth:`run`, the digests as one uint64 array."""
        out = np.zeros(self._count, np.uint64)
        if not self._count:
            return out
        flags = (_HASH if hash else 0) | (_COPY if copy else 0) | (_STREAM if stream else 0)
        generic = self._run_generic(flags) if self._len else out[:0]
        planes = self._run_planes(flags) if self._nplanes else out[:0]
        at, gi, pi = 0, 0, 0
        for is_plane, n in self._chunks:
            if is_plane:
                out[at:at + n] = planes[pi:pi + n]
                pi += n
            else:
                out[at:at + n] = generic[gi:gi + n]
                gi += n
            at += n
        return out

    def _run_generic(self, flags: int) -> np.ndarray:
        counts = np.array([len(n) for n in self._len], np.int64)
        starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        src, dst, lens = (np.ascontiguousarray(np.concatenate(x)) for x in (self._src, self._dst, self._len))
        try:
            lib = native.cpu_lib()
        except BackendUnavailable:
            return np.array(reference_runs(src, dst, lens, starts, flags), np.uint64)
        digests = np.zeros(len(self._len), np.uint64)
        # ctypes releases the GIL for the call: other Python threads (the transport) keep going.
        lib.kvlink_copy_runs(src.ctypes.data, dst.ctypes.data, lens.ctypes.data, starts.ctypes.data,
                             len(self._len), digests.ctypes.data, flags, max(1, min(_threads(), len(self._len))))
        return digests

    def _run_planes(self, flags: int) -> np.ndarray:
        desc = np.ascontiguousarray(np.concatenate(self._planes) if len(self._planes) > 1 else self._planes[0])
        ids = np.concatenate(self._ids)
        try:
            lib = native.cpu_lib()
        except BackendUnavailable:
            return np.array([reference_plane(tuple(int(x) for x in job), ids, flags) for job in desc], np.uint64)
        digests = np.zeros(len(desc), np.uint64)
        lib.kvlink_plane_runs(desc.ctypes.data, len(desc), ids.ctypes.data, digests.ctypes.data, flags,
                              max(1, min(_threads(), len(desc))))
        return digests


def reference_plane(job: tuple[int, ...], ids: np.ndarray, flags: int) -> int:
    """What ``kvlink_plane_runs`` computes for one job, in Python."""
    flat, base, stride, row, pos, left, at, scatter = job
    src, dst, lens = [], [], []
    while left > 0:
        n = min(row - pos, left)
        cell = base + int(ids[at]) * stride + pos
        src.append(flat if scatter else cell)
        dst.append(cell if scatter else flat)
        lens.append(n)
        flat, left, pos, at = flat + n, left - n, 0, at + 1
    return reference_runs(src, dst, lens, [0, len(lens)], flags)[0]


def reference_runs(src, dst, lens, starts, flags: int) -> list[int]:
    """What ``kvlink_copy_runs`` computes, in Python (ctypes copies, the xxhash package)."""
    out = []
    for j in range(len(starts) - 1):
        h = xxhash.xxh3_64()
        for r in range(int(starts[j]), int(starts[j + 1])):
            n = int(lens[r])
            if flags & _HASH:
                h.update((ctypes.c_ubyte * n).from_address(int(src[r])))
            if flags & _COPY:
                ctypes.memmove(int(dst[r]), int(src[r]), n)
        out.append(h.intdigest() if flags & _HASH else 0)
    return out


def checksums_native(buffers: list) -> list[int]:
    """xxh3-64 of each buffer, hashed in parallel in one native call."""
    runs = Runs()
    for b in buffers:
        runs.add(buffer_pieces(b))
    return runs.run(copy=False)
