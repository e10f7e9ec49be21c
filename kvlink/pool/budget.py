"""One host-memory budget shared by every pool of a process (a daemon's tenants and models).

Memory tiers allocate their pages lazily, a chunk at a time, and charge each chunk here before
allocating it. A tier's own ``capacity`` is its tenant's quota, and quotas are guaranteed, never
overcommitted: a pool reserves its whole quota when it is created (:meth:`HostBudget.reserve_quota`,
refused with :class:`~kvlink.errors.ResourceLimit` when the live pools' quotas would exceed
``total_bytes``) and gives it back when closed. So a new tenant gets its full quota or a typed
refusal at creation, never a pool the first tenants starve for ever. Memory is still allocated
only as it is used; a pool at its quota evicts its own entries, never another pool's.
"""

from __future__ import annotations

import threading

from kvlink.errors import ConfigError, ResourceLimit


class HostBudget:
    """``total_bytes`` of host memory to hand out in charges; thread-safe."""

    def __init__(self, total_bytes: int):
        if total_bytes <= 0:
            raise ConfigError(f"a host budget must be positive, got {total_bytes}")
        self.total_bytes = total_bytes
        self._used = 0
        self._quotas = 0  # sum of the live pools' reserved quotas (at most total_bytes)
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self.total_bytes - self._used

    @property
    def reserved_bytes(self) -> int:
        """The sum of the quotas reserved by live pools."""
        with self._lock:
            return self._quotas

    def reserve_quota(self, nbytes: int) -> None:
        """Guarantee a new pool ``nbytes`` of the budget (its quota) until :meth:`release_quota`.
        Raises :class:`~kvlink.errors.ResourceLimit` (nothing reserved) when the quotas of the
        live pools would then exceed ``total_bytes``."""
        with self._lock:
            if self._quotas + nbytes > self.total_bytes:
                raise ResourceLimit(f"a pool quota of {nbytes} bytes does not fit the host budget: "
                                    f"{self._quotas} of {self.total_bytes} bytes are other pools' quotas "
                                    "(PoolConfig.host_bytes within DaemonConfig.host_budget_bytes)")
            self._quotas += nbytes

    def release_quota(self, nbytes: int) -> None:
        """Give back a quota :meth:`reserve_quota` reserved (its pool is closed)."""
        with self._lock:
            self._quotas = max(0, self._quotas - nbytes)

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
        return f"HostBudget(used={self.used_bytes}, reserved={self.reserved_bytes}, total={self.total_bytes})"
