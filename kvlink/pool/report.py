"""What a store did: the pool's honest answer to a put (kept, on SSD too, refused, and why)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ERRORS = 8  # distinct error strings one StoreReport keeps


@dataclass
class StoreReport:
    """What one :meth:`~kvlink.pool.Pool.store` did. ``stored``: new entries held now (entries
    the pool already held count nowhere); ``on_ssd``: of those, written to SSD before store
    returned (write-through); ``failed``: entries not stored (no room within the pool's quota or
    the shared host budget); ``errors``: short reasons, at most ``MAX_ERRORS`` distinct ones."""

    stored: int = 0
    on_ssd: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        """Note a reason (once; the list stays bounded)."""
        if text not in self.errors and len(self.errors) < MAX_ERRORS:
            self.errors.append(text)
