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

    ``rows`` is a plane ``[num_blocks, block_size * elems]``; ``packed`` a contiguous tensor of
    ``(t1 - t0) * elems`` values. Token ``t`` lives in block ``ids[t // block_size]``.
    """
    if t1 <= t0:
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
