"""Hybrid prefix cache pool.

The hybrid-aware prefix index (:mod:`~kvlink.pool.index`), memory tiers as page slabs
(:mod:`~kvlink.pool.slab`, host and GPU, allocated lazily against a shared
:class:`~kvlink.pool.budget.HostBudget`), the SSD tier (:mod:`~kvlink.pool.ssd`, segment files
plus a RocksDB index), LRU and S3-FIFO eviction (:mod:`~kvlink.pool.eviction`) and the
in-process :class:`Pool` tying them together. The ``kvlink pool serve`` daemon and its clients
are in :mod:`kvlink.daemon`.
"""

from kvlink.pool.budget import HostBudget
from kvlink.pool.index import Lease, PrefixHit, PrefixIndex, block_hashes, prefix_root
from kvlink.pool.pool import Pool, StoreReport
from kvlink.pool.slab import SlabTier
from kvlink.pool.ssd import SsdTier

__all__ = ["HostBudget", "Lease", "Pool", "PrefixHit", "PrefixIndex", "SlabTier", "SsdTier", "StoreReport",
           "block_hashes", "prefix_root"]
