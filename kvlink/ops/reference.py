"""Pure-torch reference gather/scatter of cache rows. Every other backend must match it bit for bit.

A *row* is one block of one plane of a paged cache: ``rows`` is a 2-D view ``[num_blocks, R]``
whose last dim is contiguous (the block stride may be larger than ``R``, e.g. for
``[num_blocks, 2, block_size, heads, dim]`` caches); ``packed`` is a contiguous ``[n, R]`` tensor.
"""

from __future__ import annotations

import torch
import xxhash


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Copy bit patterns as integers: index kernels do not cover every float dtype (fp8).
    return t.view(_INT_OF_SIZE[t.element_size()])


def gather_rows(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = rows[ids[i]]``."""
    torch.index_select(_bits(rows), 0, ids, out=_bits(out))


def scatter_rows(packed: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """``rows[ids[i]] = packed[i]``; ``ids`` must not repeat."""
    _bits(rows).index_copy_(0, ids, _bits(packed))


def xxh3_segments(data: torch.Tensor, offsets, lengths) -> list[int]:
    """xxh3-64 of ``data[o:o + n]`` per segment, hashed on the host: what
    :func:`kvlink.ops.digest.queue_xxh3` must match."""
    raw = data.cpu().numpy().tobytes()
    return [xxhash.xxh3_64_intdigest(raw[o:o + n]) for o, n in zip(offsets, lengths)]
