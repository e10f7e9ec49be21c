"""A shared worker pool for codec work on large buffers (lz4, zstd and xxhash drop the GIL)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
PARALLEL_MIN_BYTES = 8 << 20  # below this a thread hop costs more than it saves
_pool: ThreadPoolExecutor | None = None


def parallel_map(fn: Callable[[T], R], items: Iterable[T], total_bytes: int) -> list[R]:
    """``[fn(x) for x in items]``, spread over all cores when there is enough work."""
    global _pool
    items = list(items)
    if len(items) < 2 or total_bytes < PARALLEL_MIN_BYTES:
        return [fn(x) for x in items]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="kvlink-codec")
    return list(_pool.map(fn, items))
