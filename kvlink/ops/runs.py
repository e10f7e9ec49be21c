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
        return sa, da, sl  # the common case: pieces already match (e.g. rows <-> a packed buffer cut per row)
    sc, dc = np.cumsum(sl), np.cumsum(dl)
    ends = np.union1d(sc, dc)
    starts = np.concatenate(([0], ends[:-1]))
    si = np.searchsorted(sc, starts, side="right")
    di = np.searchsorted(dc, starts, side="right")
    return sa[si] + (starts - (sc[si] - sl[si])), da[di] + (starts - (dc[di] - dl[di])), ends - starts


class Runs:
    """A batch of jobs, done by one :meth:`run`. Not thread-safe (one builder per call)."""

    def __init__(self) -> None:
        self._src: list[np.ndarray] = []
        self._dst: list[np.ndarray] = []
        self._len: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._len)

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
        return len(self._len) - 1

    @property
    def nbytes(self) -> int:
        return int(sum(int(n.sum()) for n in self._len))

    def run(self, copy: bool = True, hash: bool = True, stream: bool = True) -> list[int]:
        """Do every job; returns the digests (zeros without ``hash``). ``stream``: large copies use
        non-temporal stores (right when the destination is not read again soon)."""
        if not self._len:
            return []
        counts = np.array([len(n) for n in self._len], np.int64)
        starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        src, dst, lens = (np.ascontiguousarray(np.concatenate(x)) for x in (self._src, self._dst, self._len))
        digests = np.zeros(len(self._len), np.uint64)
        flags = (_HASH if hash else 0) | (_COPY if copy else 0) | (_STREAM if stream else 0)
        try:
            lib = native.cpu_lib()
        except BackendUnavailable:
            return reference_runs(src, dst, lens, starts, flags)
        threads = max(1, min(_threads(), len(self._len)))
        # ctypes releases the GIL for the call: other Python threads (the transport) keep going.
        lib.kvlink_copy_runs(src.ctypes.data, dst.ctypes.data, lens.ctypes.data, starts.ctypes.data,
                             len(self._len), digests.ctypes.data, flags, threads)
        return [int(d) for d in digests]


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
