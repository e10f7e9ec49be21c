"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import os
import time
from typing import Callable


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Fastest wall time of ``repeat`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def drop_page_cache(path) -> None:
    """Drop a file's pages from the page cache (written and synced: clean pages go), so the next
    read of it is a cold one (``posix_fadvise(DONTNEED)``; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gbps(nbytes: int, seconds: float) -> float:
    """Gigabytes (1e9) per second."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds used so far by this process (all its threads), or by process
    ``pid`` (read from Linux ``/proc``); None where that cannot be read."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds spent by this process and, optionally, a peer process between start and stop."""

    def __init__(self, peer_pid: int | None = None):
        self.peer_pid = peer_pid

    def start(self) -> tuple:
        return cpu_seconds(), cpu_seconds(self.peer_pid) if self.peer_pid else None

    def stop(self, started: tuple) -> dict:
        now = self.start()
        return {"self": now[0] - started[0],
                "peer": None if now[1] is None or started[1] is None else now[1] - started[1]}
