"""Eviction policies for a tier: which key goes when space is needed.

- :class:`LRU`: least recently used first.
- :class:`S3FIFO`: scan-resistant (Yang et al., SOSP'23). New keys enter a small FIFO (10% of
  the budget); a key read again while there moves to the main FIFO, one that is not is evicted
  early and remembered in a ghost FIFO, so a key coming back soon after goes straight to main.
  Main evicts in FIFO order but gives keys read since their last pass another round (up to 3).
  One long scan of new prefixes thus cycles through the small queue without flushing the
  prefixes that are actually reused.

Both track bytes per key and never choose a pinned key (``victim(pinned)`` skips those).
Not thread-safe: the pool calls them under its own lock.
"""

from __future__ import annotations

import collections
from typing import Callable

from kvlink.errors import ConfigError


class LRU:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._keys: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def admit(self, key: bytes, nbytes: int) -> None:
        self._keys[key] = nbytes
        self._keys.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._keys.pop(key, None)

    def victim(self, pinned: Callable[[bytes], bool]) -> bytes | None:
        return next((k for k in self._keys if not pinned(k)), None)

    def __len__(self) -> int:
        return len(self._keys)


class S3FIFO:
    def __init__(self, capacity: int, small_fraction: float = 0.1):
        if not 0 < small_fraction < 1:
            raise ConfigError("small_fraction must be in (0, 1)")
        self.capacity = capacity
        self.small_capacity = capacity * small_fraction
        self._small: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._main: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._ghost: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._small_bytes = 0

    def admit(self, key: bytes, nbytes: int) -> None:
        self.remove(key)
        self._freq[key] = 0
        if key in self._ghost:  # evicted from small recently and wanted again: it is reused
            del self._ghost[key]
            self._main[key] = nbytes
        else:
            self._small[key] = nbytes
            self._small_bytes += nbytes

    def touch(self, key: bytes) -> None:
        if key in self._freq:
            self._freq[key] = min(3, self._freq[key] + 1)

    def remove(self, key: bytes) -> None:
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        self._main.pop(key, None)
        self._freq.pop(key, None)

    def victim(self, pinned: Callable[[bytes], bool]) -> bytes | None:
        """The next key to evict (the caller removes it); moves keys between queues as it looks."""
        for _ in range(4 * (len(self._small) + len(self._main)) + 1):
            if self._small and (self._small_bytes > self.small_capacity or not self._main):
                key, nbytes = next(iter(self._small.items()))
                del self._small[key]
                self._small_bytes -= nbytes
                if self._freq.get(key, 0) > 0:  # read while on probation: promote
                    self._freq[key] = 0
                    self._main[key] = nbytes
                    continue
                if pinned(key):
                    self._small[key] = nbytes  # back of the queue; try others
                    self._small_bytes += nbytes
                    continue
                self._small[key] = nbytes  # stays tracked until the caller removes it
                self._small_bytes += nbytes
                self._remember(key)
                return key
            if self._main:
                key, nbytes = next(iter(self._main.items()))
                if self._freq.get(key, 0) > 0 or pinned(key):
                    self._freq[key] = max(0, self._freq.get(key, 0) - 1)
                    self._main.move_to_end(key)  # another round
                    continue
                return key
            return None
        return None

    def _remember(self, key: bytes) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(16, len(self._main) + len(self._small)):
            self._ghost.popitem(last=False)

    def __len__(self) -> int:
        return len(self._small) + len(self._main)


def make_policy(name: str, capacity: int):
    """``lru`` or ``s3fifo``."""
    if name == "lru":
        return LRU(capacity)
    if name == "s3fifo":
        return S3FIFO(capacity)
    raise ConfigError(f"unknown eviction policy {name!r}; expected lru or s3fifo")
