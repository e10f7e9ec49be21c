"""Triton gather/scatter of cache rows; must match :mod:`kvlink.ops.reference` bit for bit.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None


if triton is not None:

    @triton.jit
    def _rows_kernel(src, dst, ids, src_stride, dst_stride, row_len, GATHER: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        chunk = tl.program_id(1)
        row_id = tl.load(ids + i)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_len
        if GATHER:
            vals = tl.load(src + row_id * src_stride + cols, mask=mask)
            tl.store(dst + i * dst_stride + cols, vals, mask=mask)
        else:
            vals = tl.load(src + i * src_stride + cols, mask=mask)
            tl.store(dst + row_id * dst_stride + cols, vals, mask=mask)


BLOCK = 1024


def available() -> bool:
    return triton is not None


def _launch(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
    n = ids.numel()
    row_len = src.shape[1]
    if n == 0 or row_len == 0:
        return
    grid = (n, triton.cdiv(row_len, BLOCK))
    _rows_kernel[grid](src, dst, ids, src.stride(0), dst.stride(0), row_len, GATHER=gather, BLOCK=BLOCK)


def gather_rows(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    _launch(rows, out, ids, True)


def scatter_rows(packed: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    _launch(packed, rows, ids, False)
