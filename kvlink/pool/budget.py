"""One host-memory budget shared by every pool of a process (a daemon's tenants and models).

Memory tiers allocate their pages lazily, a chunk at a time, and charge each chunk here before
allocating it. A tier's own ``capacity`` is its tenant's quota; this budget bounds the sum of all
of them, so quotas may be overcommitted without the process ever holding more than ``total_bytes``.
A pool whose charge is refused evicts its own entries to make room, then refuses the store: it
never takes memory another pool holds.
"""

from __future__ import annotations

import threading

from kvlink.errors import ConfigError


class HostBudget:
    """``total_bytes`` of host memory to hand out in charges; thread-safe."""

    def __init__(self, total_bytes: int):
        if total_bytes <= 0:
            raise ConfigError(f"a host budget must be positive, got {total_bytes}")
        self.total_bytes = total_bytes
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self.total_bytes - self._used

    def charge(self, nbytes: int) -> bool:
        """Take ``nbytes`` from the budget; False (and nothing taken) when they are not there."""
        with self._lock:
            if self._used + nbytes > self.total_bytes:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back bytes an earlier :meth:`charge` took."""
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def __repr__(self) -> str:
        return f"HostBudget(used={self.used_bytes}, total={self.total_bytes})"
