"""Hybrid-aware prefix index: which cached prefix of a prompt can be restored, and from what.

Prompts are cut into blocks of ``block_size`` tokens; each full block gets a chained 128-bit
hash (the previous block's hash and the block's token ids), rooted in the layout fingerprint and
an optional namespace, so different models or tenants never share an entry.

Entries follow the spec's component groups (:meth:`~kvlink.spec.CacheSpec.group`), whatever
layer holds them (one layer may hold attention KV and an SSM state):

- **Full-window token tensors per block** (K/V, MLA latents, indexer keys): reusable by any prompt
  sharing the prefix up to that block.
- **Windowed token tensors per block** (sliding and chunked windows): a restore point needs only
  the blocks holding its last ``window_tokens`` tokens, so a block may keep its full-window
  entry and lose its windowed one (stored apart, evicted apart).
- **States per boundary** (conv, recurrent, any fixed-shape tensor): a state summarises *all*
  tokens before it, so a checkpoint taken after block ``b`` restores exactly
  ``(b + 1) * block_size`` tokens and nothing else.

A hit is the longest boundary where every component of every layer can be restored: every
full-window block before it, the windowed blocks ending at it, and a state checkpoint exactly at
it. Restoring KV without the matching state would silently corrupt the
output, so a boundary with KV but no state is never returned.
"""

from __future__ import annotations

import array
import hashlib
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import xxhash

from kvlink.errors import ConfigError, PoolError
from kvlink.spec import CacheSpec

FULL, SLIDING, STATE = "full", "sliding", "state"
_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)


def prefix_root(spec: CacheSpec, namespace: str = "") -> bytes:
    """The chain's root: layout fingerprint and namespace, so nothing is shared across either."""
    return hashlib.sha256(b"kvlink-prefix-v1|" + spec.fingerprint + b"|" + namespace.encode()).digest()[:16]


def block_hashes(tokens: Sequence[int], block_size: int, root: bytes) -> list[bytes]:
    """Chained hashes of the full blocks of ``tokens`` (a trailing partial block has none)."""
    if block_size <= 0:
        raise ConfigError(f"block_size must be positive, got {block_size}")
    if isinstance(tokens, np.ndarray) or hasattr(tokens, "numpy"):
        ids = np.asarray(tokens).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
            raise ConfigError("token ids must be in [0, 2**32)")
        raw = ids.astype("<u4").tobytes()
    else:
        try:  # a list of ints: array() converts and range-checks in C, 3x faster than numpy
            ids = array.array(_U32, tokens)
        except (OverflowError, TypeError) as exc:
            raise ConfigError(f"token ids must be integers in [0, 2**32): {exc}") from None
        if sys.byteorder != "little":
            ids.byteswap()
        raw = ids.tobytes()
    step, digest = block_size * 4, xxhash.xxh3_128_digest
    out, prev = [], root
    for off in range(0, (len(raw) // step) * step, step):
        prev = digest(prev + raw[off: off + step])
        out.append(prev)
    return out


@dataclass
class Entry:
    """One stored piece: a block's full or sliding KV, or a state checkpoint at a boundary."""

    key: bytes          # the block hash (for state: the hash of the block that ends the boundary)
    kind: str           # FULL, SLIDING or STATE
    position: int       # block index from the start of the prompt
    nbytes: int
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PrefixHit:
    """What :meth:`PrefixIndex.lookup` found. ``tokens`` is the usable prefix (0: miss)."""

    tokens: int
    full: tuple[bytes, ...]       # keys whose full-attention KV to restore (blocks before the boundary)
    sliding: tuple[bytes, ...]    # keys whose sliding KV to restore (the window ending at the boundary)
    state: bytes | None           # key of the state checkpoint at the boundary (hybrid models)
    kv_tokens: int                # how far full-attention KV alone matched
    stopped: str                  # why the hit ends where it does

    def keys(self) -> list[tuple[str, bytes]]:
        """(kind, key) of every entry to restore: full blocks, sliding blocks, the state."""
        keys = [(FULL, k) for k in self.full] + [(SLIDING, k) for k in self.sliding]
        if self.state is not None:
            keys.append((STATE, self.state))
        return keys


class Lease:
    """Entries pinned against eviction while a restore reads them; release when done (idempotent)."""

    def __init__(self, entries: list[Entry]):
        self._entries = entries

    def release(self) -> None:
        for entry in self._entries:
            entry.pins -= 1
        self._entries = []

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_positions(block_size: int, checkpoint_every: int | None, end: int, start: int = 0) -> list[int]:
    """Token positions in ``(start, end]`` at which a pool with these settings wants the
    linear-attention state: after every ``checkpoint_every`` blocks (None: none in between) and
    at the last block boundary up to ``end``. A pure function of the pool's settings, so an
    engine talking to a daemon computes the same positions as the daemon's pool would."""
    num_blocks = max(0, end) // block_size
    if num_blocks == 0:
        return []
    every = checkpoint_every or num_blocks
    blocks = sorted(set(range(every - 1, num_blocks, every)) | {num_blocks - 1})
    return [(b + 1) * block_size for b in blocks if (b + 1) * block_size > start]


class PrefixIndex:
    """Metadata of what a pool holds for one layout and namespace (the bytes live in tiers).

    ``checkpoint_every``: take state checkpoints every N blocks (besides the request end) when
    :meth:`checkpoints_for` plans an insert.
    """

    def __init__(self, spec: CacheSpec, block_size: int, namespace: str = "", checkpoint_every: int | None = None):
        if block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {block_size}")
        if checkpoint_every is not None and checkpoint_every <= 0:
            raise ConfigError("checkpoint_every must be positive")
        self.spec = spec
        self.block_size = block_size
        self.namespace = namespace
        self.checkpoint_every = checkpoint_every
        self.root = prefix_root(spec, namespace)
        # A boundary is restorable when every component of every layer is: full-window token
        # tensors from every block before it, windowed ones (sliding, chunked) from the blocks
        # holding its last `window_tokens` tokens, states from a checkpoint exactly at it.
        self.needs_full = bool(spec.group("full"))
        self.needs_state = bool(spec.group("state"))
        self.window_blocks = -(-spec.window_tokens // block_size) if spec.group("window") else 0
        self._entries: dict[tuple[str, bytes], Entry] = {}

    # -- planning ---------------------------------------------------------------------------------
    def hashes(self, tokens: Sequence[int]) -> list[bytes]:
        return block_hashes(tokens, self.block_size, self.root)

    def checkpoints_for(self, num_blocks: int) -> list[int]:
        """Block indices after which to checkpoint state: every ``checkpoint_every`` and the last."""
        if not self.needs_state:
            return []
        bs = self.block_size
        return [p // bs - 1 for p in checkpoint_positions(bs, self.checkpoint_every, num_blocks * bs)]

    # -- queries ------------------------------------------------------------------------------------
    def has(self, kind: str, key: bytes) -> bool:
        return (kind, key) in self._entries

    def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest restorable prefix of ``tokens`` (a multiple of the block size)."""
        keys = self.hashes(tokens)
        kv = len(keys)
        if self.needs_full:
            kv = next((i for i, k in enumerate(keys) if (FULL, k) not in self._entries), len(keys))
        best, reasons = 0, {}
        for b in range(kv, 0, -1):  # b = number of blocks restored
            if self.needs_state and (STATE, keys[b - 1]) not in self._entries:
                reasons.setdefault(STATE, f"no state checkpoint at token {b * self.block_size}")
                continue
            lo = max(0, b - self.window_blocks)
            if self.window_blocks and any((SLIDING, k) not in self._entries for k in keys[lo:b]):
                reasons.setdefault(SLIDING, f"sliding-window blocks missing before token {b * self.block_size}")
                continue
            best = b
            break
        if not keys:
            stopped = f"shorter than one block ({self.block_size} tokens)"
        elif best == len(keys):
            stopped = "whole prompt cached"
        elif kv == 0:
            stopped = "no cached blocks"
        else:
            if best == kv:
                reasons[FULL] = f"full-attention KV ends at token {kv * self.block_size}"
            stopped = "; ".join(reasons.values())
        now = time.monotonic()
        full = tuple(keys[:best]) if self.needs_full else ()
        sliding = tuple(keys[max(0, best - self.window_blocks): best]) if self.window_blocks else ()
        state = keys[best - 1] if self.needs_state and best else None
        for kind, group in ((FULL, full), (SLIDING, sliding), (STATE, (state,) if state else ())):
            for key in group:
                self._entries[(kind, key)].last_used = now
        return PrefixHit(best * self.block_size, full, sliding, state, kv * self.block_size, stopped)

    # -- updates ------------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], sizes: dict[str, int], *, full_blocks: Iterable[int] | None = None,
               sliding_blocks: Iterable[int] | None = None, state_after: Iterable[int] = ()) -> list[tuple[str, bytes]]:
        """Record stored pieces of ``tokens``: the blocks (by index) whose full / sliding KV was
        stored (default: all full blocks of the prompt; sliding: the window at the end) and the
        blocks after which a state checkpoint was stored. ``sizes`` gives bytes per block for
        ``full``/``sliding`` and per checkpoint for ``state``. Returns the (kind, key) added."""
        keys = self.hashes(tokens)
        n = len(keys)
        if full_blocks is None:
            full_blocks = range(n) if self.needs_full else ()
        if sliding_blocks is None:
            sliding_blocks = range(max(0, n - self.window_blocks), n) if self.window_blocks else ()
        added, now = [], time.monotonic()
        for kind, blocks in ((FULL, full_blocks), (SLIDING, sliding_blocks), (STATE, state_after)):
            for b in blocks:
                if not 0 <= b < n:
                    raise PoolError(f"{kind} block {b} outside the prompt's {n} full blocks")
                if kind == STATE and not self.needs_state or kind == SLIDING and not self.window_blocks:
                    raise PoolError(f"{self.spec.name} has no {kind} layers")
                if (kind, keys[b]) not in self._entries:
                    self._entries[(kind, keys[b])] = Entry(keys[b], kind, b, sizes.get(kind, 0), last_used=now)
                    added.append((kind, keys[b]))
        return added

    def add(self, kind: str, key: bytes, nbytes: int, position: int = 0) -> None:
        """Register one stored entry by key (a pool storing pieces, or one rebuilt from SSD)."""
        self._entries.setdefault((kind, key), Entry(key, kind, position, nbytes))

    def entry(self, kind: str, key: bytes) -> Entry | None:
        return self._entries.get((kind, key))

    def entries(self) -> list[Entry]:
        """Every entry (a snapshot)."""
        return list(self._entries.values())

    def pin(self, hit: PrefixHit) -> Lease:
        """Protect every entry of ``hit`` from eviction until the lease is released."""
        entries = [self._entries[key] for key in hit.keys()]
        for entry in entries:
            entry.pins += 1
        return Lease(entries)

    def remove(self, kind: str, key: bytes, force: bool = False) -> Entry | None:
        """Forget one entry whose bytes were evicted (pinned ones stay) or lost (``force``)."""
        entry = self._entries.get((kind, key))
        if entry is None or (entry.pins and not force):
            return None
        return self._entries.pop((kind, key))

    def evict(self, nbytes: int) -> list[Entry]:
        """Drop unpinned entries, least recently used first (deepest block first on ties, so
        prefixes shrink from their ends), until ``nbytes`` are freed; returns what was dropped."""
        victims = sorted((e for e in self._entries.values() if not e.pins), key=lambda e: (e.last_used, -e.position))
        freed, out = 0, []
        for entry in victims:
            if freed >= nbytes:
                break
            self._entries.pop((entry.kind, entry.key))
            freed += entry.nbytes
            out.append(entry)
        return out

    def stats(self) -> dict:
        by_kind: dict[str, dict[str, int]] = {}
        for e in self._entries.values():
            s = by_kind.setdefault(e.kind, {"entries": 0, "bytes": 0, "pinned": 0})
            s["entries"] += 1
            s["bytes"] += e.nbytes
            s["pinned"] += bool(e.pins)
        return {"namespace": self.namespace, "block_size": self.block_size, "kinds": by_kind,
                "bytes": sum(s["bytes"] for s in by_kind.values())}
