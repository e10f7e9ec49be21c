"""Long-lived host byte buffers (staging arenas, pool slabs, daemon arenas), backed by huge pages.

Bytes stream through these buffers at memory speed: received frames land in them, payloads are
packed into them, pool entries are copied in and out. With 4 KiB pages a 1 GiB buffer is 262144
TLB entries' worth, and streaming through it misses the TLB every 64 cache lines; with
transparent huge pages it is 512. Measured on the 2-core VM (loopback transport, 293 MiB, the
receive arena and the raw-socket baseline's buffer both backed by huge pages): kvlink went from
0.87-0.88x to 0.90-0.92x of raw sockets. Linux lets a process ask for them per range
(``madvise(MADV_HUGEPAGE)``, honoured when THP is ``always`` or ``madvise``); elsewhere, and for
pinned buffers (the CUDA allocator places those), the request is skipped.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE = 2 << 20
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def host_bytes(nbytes: int, pin: bool = False, fault: bool = True) -> torch.Tensor:
    """A host byte tensor of ``nbytes``: pinned when ``pin``; otherwise asked to be backed by huge
    pages (before any page is touched) and, with ``fault``, faulted in now rather than page by
    page on the first hot copy. Raises what ``torch.empty`` raises (RuntimeError, MemoryError)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if not pin:
        if sys.platform == "linux" and nbytes >= 2 * _HUGE:
            start = -(-buf.data_ptr() // _HUGE) * _HUGE
            end = (buf.data_ptr() + nbytes) // _HUGE * _HUGE
            if end > start:
                _libc_madvise()(start, end - start, _MADV_HUGEPAGE)  # a refusal leaves 4 KiB pages
        if fault:
            buf.zero_()
    return buf
