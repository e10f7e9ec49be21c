"""Gather/scatter of paged-cache rows: one dispatch point over the available backends.

Backends, best first for each device:

- CUDA tensors: ``cuda`` (csrc/cuda, built on demand), ``triton``, ``reference``;
- CPU tensors: ``native`` (csrc/cpu via ctypes, built on demand), ``reference``.
  ``triton`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` when asked for explicitly.

Every call checks its inputs here, before any backend touches memory.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kvlink.config import OpsConfig, triton_interpret_enabled
from kvlink.errors import BackendUnavailable, ConfigError
from kvlink.ops import native, reference, triton_rows

_IMPLS = {
    "reference": (reference.gather_rows, reference.scatter_rows),
    "native": (native.cpu_gather_rows, native.cpu_scatter_rows),
    "triton": (triton_rows.gather_rows, triton_rows.scatter_rows),
    "cuda": (lambda r, i, o: native.cuda_ext().gather_rows(r, i, o),
             lambda p, i, r: native.cuda_ext().scatter_rows(p, i, r)),
}


def _usable(backend: str, device_type: str) -> bool:
    try:
        if backend == "reference":
            return True
        if backend == "native":
            return device_type == "cpu" and native.cpu_lib() is not None
        if backend == "triton":
            return triton_rows.available() and (device_type == "cuda" or triton_interpret_enabled())
        if backend == "cuda":
            return device_type == "cuda" and native.cuda_ext() is not None
    except BackendUnavailable:
        return False
    return False


@lru_cache(maxsize=None)
def select_backend(device_type: str, requested: str | None = None) -> str:
    """Name of the backend used for tensors on ``device_type``.

    ``requested`` (or ``KVLINK_OPS_BACKEND``) forces one; raises :class:`BackendUnavailable` if
    that one cannot run here.
    """
    requested = requested or OpsConfig.from_env().backend
    if requested != "auto":
        if requested not in _IMPLS:
            raise ConfigError(f"unknown backend {requested!r}")
        if not _usable(requested, device_type):
            raise BackendUnavailable(f"backend {requested!r} cannot run on {device_type} tensors here")
        return requested
    order = ("cuda", "triton", "reference") if device_type == "cuda" else ("native", "reference")
    return next(b for b in order if _usable(b, device_type))


def available_backends(device_type: str) -> list[str]:
    return [b for b in _IMPLS if _usable(b, device_type)]


def _wide(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View two [N, R] tensors with contiguous rows as the widest integer type both layouts allow."""
    def fits(t: torch.Tensor, size: int) -> bool:
        es = t.element_size()
        return (t.shape[1] * es) % size == 0 and (t.storage_offset() * es) % size == 0 and (t.stride(0) * es) % size == 0

    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1)):
        if fits(a, size) and fits(b, size):
            return tuple(t.view(dtype) if t.element_size() == size else t.view(torch.uint8).view(dtype) for t in (a, b))
    raise AssertionError("unreachable: every tensor fits uint8")


def _check(rows: torch.Tensor, ids: torch.Tensor, packed: torch.Tensor) -> None:
    if rows.dim() != 2 or packed.dim() != 2:
        raise ConfigError(f"rows and packed must be 2-D, got {tuple(rows.shape)} and {tuple(packed.shape)}")
    if rows.dtype != packed.dtype:
        raise ConfigError(f"dtype mismatch: rows {rows.dtype}, packed {packed.dtype}")
    if rows.shape[1] != packed.shape[1]:
        raise ConfigError(f"row length mismatch: {rows.shape[1]} vs {packed.shape[1]}")
    if rows.stride(1) != 1 or not packed.is_contiguous():
        raise ConfigError("rows need a contiguous last dim and packed must be contiguous")
    if ids.dim() != 1 or ids.dtype != torch.int64 or not ids.is_contiguous():
        raise ConfigError("ids must be a 1-D contiguous int64 tensor")
    if ids.numel() != packed.shape[0]:
        raise ConfigError(f"{ids.numel()} ids for {packed.shape[0]} packed rows")
    if ids.device != rows.device:
        raise ConfigError(f"ids on {ids.device}, rows on {rows.device}")
    if rows.device.type == "cpu" and packed.device.type != "cpu":
        raise ConfigError("a CPU cache needs a CPU packed buffer")


def _check_range(ids: torch.Tensor, num_rows: int) -> None:
    # Only for CPU ids: on CUDA this would synchronise the stream; callers validate block tables
    # on the host before moving them (CacheRef.block_ids_checked).
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_rows):
        raise ConfigError(f"block id out of range [0, {num_rows})")


def gather_rows(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, backend: str | None = None) -> None:
    """``out[i] = rows[ids[i]]`` for a paged plane ``rows`` [num_blocks, R] and contiguous ``out`` [n, R]."""
    _check(rows, ids, out)
    _check_range(ids, rows.shape[0])
    name = select_backend(rows.device.type, backend)
    if out.device != rows.device and not (name == "cuda" and out.is_pinned()):
        # Only the CUDA kernel writes pinned host memory directly; others gather on the device first.
        tmp = torch.empty(out.shape, dtype=out.dtype, device=rows.device)
        wide_rows, wide_tmp = _wide(rows, tmp)
        _IMPLS[name][0](wide_rows, ids, wide_tmp)
        out.copy_(tmp, non_blocking=out.is_pinned())
        return
    wide_rows, wide_out = _wide(rows, out)
    _IMPLS[name][0](wide_rows, ids, wide_out)


def scatter_rows(packed: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, backend: str | None = None) -> None:
    """``rows[ids[i]] = packed[i]``; ``ids`` must not repeat."""
    _check(rows, ids, packed)
    _check_range(ids, rows.shape[0])
    name = select_backend(rows.device.type, backend)
    if packed.device != rows.device and not (name == "cuda" and packed.is_pinned()):
        packed = packed.to(rows.device, non_blocking=packed.is_pinned())
    wide_rows, wide_packed = _wide(rows, packed)
    _IMPLS[name][1](wide_packed, ids, wide_rows)


__all__ = ["gather_rows", "scatter_rows", "select_backend", "available_backends"]
