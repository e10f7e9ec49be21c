"""Copy a token range between a paged plane and a packed ``[tokens, elems]`` buffer.

Whole blocks go through one row gather/scatter (:mod:`kvlink.ops`); at most two partial blocks
(a sliding window's first block, a request's last block) are copied on their own.
"""

from __future__ import annotations

import torch

from kvlink import ops


def copy_tokens(rows: torch.Tensor, ids: torch.Tensor, ids_host: list[int], t0: int, t1: int,
                block_size: int, packed: torch.Tensor, to_packed: bool, backend: str | None = None) -> None:
    """Copy tokens [t0, t1) of the request whose blocks are ``ids`` between ``rows`` and ``packed``.

    ``rows`` is a plane ``[num_blocks, block_size * elems]``, or a strided ``[num_blocks,
    block_size, *shape]`` view (:func:`_copy_strided`); ``packed`` a contiguous tensor of
    ``(t1 - t0) * elems`` values. Token ``t`` lives in block ``ids[t // block_size]``.
    """
    if t1 <= t0:
        return
    if rows.dim() > 2:
        _copy_strided(rows, ids, ids_host, t0, t1, block_size, packed, to_packed)
        return
    elems = rows.shape[1] // block_size
    flat = packed.reshape(-1)

    def partial(b: int, a: int, z: int, at: int) -> None:
        cache_part = rows[ids_host[b], a * elems : z * elems]
        packed_part = flat[at * elems : (at + z - a) * elems]
        if to_packed:
            packed_part.copy_(cache_part)
        else:
            cache_part.copy_(packed_part)

    t = t0
    if t0 % block_size:
        b = t0 // block_size
        end = min(t1, (b + 1) * block_size)
        partial(b, t0 - b * block_size, end - b * block_size, 0)
        t = end
    nfull = (t1 - t) // block_size
    if nfull:
        first = t // block_size
        region = flat[(t - t0) * elems : (t - t0 + nfull * block_size) * elems].view(nfull, block_size * elems)
        block_ids = ids[first : first + nfull]
        if to_packed:
            ops.gather_rows(rows, block_ids, region, backend)
        else:
            ops.scatter_rows(region, block_ids, rows, backend)
        t += nfull * block_size
    if t < t1:
        partial(t // block_size, 0, t1 - t, t - t0)


def _copy_strided(plane: torch.Tensor, ids: torch.Tensor, ids_host: list[int], t0: int, t1: int,
                  block_size: int, packed: torch.Tensor, to_packed: bool) -> None:
    """:func:`copy_tokens` through a strided plane ``[num_blocks, block_size, *shape]``: one
    ``index_select`` / ``index_copy_`` for the whole blocks, so the engine's layout is read and
    written in place and the packed side stays token-major."""
    tokens = packed.reshape(-1).view(t1 - t0, *plane.shape[2:])
    t = t0
    while t < t1:
        b, a = divmod(t, block_size)
        if a or t1 - t < block_size:  # a partial block: at most the first and the last
            z = min(block_size, a + t1 - t)
            part = tokens[t - t0 : t - t0 + z - a]
            if to_packed:
                part.copy_(plane[ids_host[b], a:z])
            else:
                plane[ids_host[b], a:z].copy_(part)
            t += z - a
            continue
        nfull = (t1 - t) // block_size
        region = tokens[t - t0 : t - t0 + nfull * block_size].view(nfull, block_size, *plane.shape[2:])
        block_ids = ids[b : b + nfull]
        if to_packed:
            torch.index_select(plane, 0, block_ids, out=region)
        else:
            plane.index_copy_(0, block_ids, region)
        t += nfull * block_size
