"""Hybrid prefix cache pool (issue 4). Built so far: the hybrid-aware prefix index
(:mod:`kvlink.pool.index`); tiers, eviction policies and the daemon are still to come."""

from kvlink.pool.index import Lease, PrefixHit, PrefixIndex, block_hashes, prefix_root

__all__ = ["Lease", "PrefixHit", "PrefixIndex", "block_hashes", "prefix_root"]
