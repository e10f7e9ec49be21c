"""Where a segment's bytes live in a CPU paged cache, as pieces for fused copy-and-hash runs.

:class:`~kvlink.serde.pack.Packer`, :class:`~kvlink.serde.unpack.Unpacker` and the pool's
restores turn each uncompressed segment into one job of :class:`~kvlink.ops.runs.Runs` (cache
pieces on one side, the packed bytes on the other), so the checksum is computed while the copy
has the bytes in cache. A plane the pieces cannot describe (inner dims not contiguous) and
non-CPU caches take the classic path: copy with :mod:`kvlink.ops`, then hash.
"""

from __future__ import annotations

import numpy as np
import torch

from kvlink.ops import runs as runs_mod
from kvlink.serde.paged import PagedCache

Pieces = runs_mod.Pieces


def fused_usable(cache: PagedCache, backend: str | None) -> bool:
    """Whether copies for ``cache`` may go through the native fused runs: CPU caches with the
    native library built, unless a caller asked for a particular gather/scatter backend."""
    return cache.device.type == "cpu" and backend in (None, "auto", "native") and runs_mod.native_available()


def token_pieces(rows: torch.Tensor, ids_np: np.ndarray, t0: int, t1: int, block_size: int) -> Pieces | None:
    """Pieces of tokens ``[t0, t1)`` of a plane (``[num_blocks, block_size * elems]`` with
    contiguous rows, or ``[num_blocks, block_size, *shape]`` with contiguous tokens) of the
    request whose blocks are ``ids_np``, in token order; None when the plane is laid out otherwise."""
    es = rows.element_size()
    base = rows.data_ptr()
    if t1 <= t0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if rows.dim() == 2:
        if rows.stride(1) != 1:
            return None
        elems = rows.shape[1] // block_size
        tok, row = elems * es, rows.stride(0) * es
        b0, b1 = t0 // block_size, (t1 - 1) // block_size
        blocks = ids_np[b0:b1 + 1].astype(np.int64)
        addr = base + blocks * row
        lens = np.full(len(blocks), block_size * tok, np.int64)
        first_skip = (t0 - b0 * block_size) * tok
        addr[0] += first_skip
        lens[0] -= first_skip
        lens[-1] -= ((b1 + 1) * block_size - t1) * tok
        return addr, lens
    inner = rows[0, 0]
    if not inner.is_contiguous():
        return None
    t = np.arange(t0, t1, dtype=np.int64)
    addr = base + (ids_np[t // block_size].astype(np.int64) * rows.stride(0) + (t % block_size) * rows.stride(1)) * es
    return addr, np.full(len(t), inner.numel() * es, np.int64)


def state_pieces(pool: torch.Tensor, slot: int) -> Pieces | None:
    """The slot's state as one piece, or None when it is not contiguous."""
    state = pool[slot]
    if not state.is_contiguous():
        return None
    return np.array([state.data_ptr()], np.int64), np.array([state.numel() * state.element_size()], np.int64)


def segment_pieces(cache: PagedCache, seg, ids_np: np.ndarray, slot: int) -> Pieces | None:
    """Cache pieces of one segment (a :class:`SegmentLayout` or :class:`SegmentHeader`), or None."""
    if seg.is_state:
        return state_pieces(cache.tensor(seg.layer, seg.component), slot)
    rows = cache.tensor(seg.layer, seg.component)
    return token_pieces(rows, ids_np, seg.token_start, seg.token_start + seg.shape[0], cache.block_size)


def add_segment(runs: runs_mod.Runs, cache: PagedCache, seg, ids_at: int, slot: int, flat: int,
                scatter: bool) -> bool:
    """Add one segment as a plane job of ``runs``: its packed bytes at address ``flat``, its cache
    side from ``cache`` (block ids registered at ``ids_at`` with :meth:`Runs.block_ids`).
    False when the plane's layout needs pieces (:func:`segment_pieces`) instead."""
    if seg.is_state:
        state = cache.tensor(seg.layer, seg.component)[slot]
        if not state.is_contiguous():
            return False
        n = state.numel() * state.element_size()
        runs.add_plane(flat, state.data_ptr(), 0, n, 0, n, 0, scatter)
        return True
    rows = cache.tensor(seg.layer, seg.component)
    if rows.dim() != 2 or rows.stride(1) != 1:
        return False
    es, bs = rows.element_size(), cache.block_size
    tok = rows.shape[1] // bs * es
    t0 = seg.token_start
    runs.add_plane(flat, rows.data_ptr(), rows.stride(0) * es, bs * tok, (t0 % bs) * tok, seg.shape[0] * tok,
                   ids_at + t0 // bs, scatter)
    return True
