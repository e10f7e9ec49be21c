"""The global index: which pool daemon, in which cluster, holds which prefix-cache entry.

The bytes stay in kvlink's pool daemons; a Valkey/Redis Cluster holds only who has what.

Records (binary keys; ``P`` is ``ClusterConfig.key_prefix``):

- ``P{tttt}`` + 16-byte block hash: one hash per block (the pool's chained hash, rooted in the
  layout fingerprint and the tenant, so models and tenants never share a key). ``tttt`` is the
  hash's first two bytes in hex, a hash tag that spreads blocks over the cluster's slots. Fields:
  holder id (u16), kind code (1 byte: full, sliding, state), holder epoch (u32); values: tier
  (u8), entry bytes (u32), stored-at unix seconds (u32). 7 + 9 bytes per (holder, kind). The
  epoch sits in the field so a lookup decides from the field names alone (decoded once per
  distinct set of names, not once per block).
- ``P{m}:ids`` (holder name -> id), ``P{m}:next`` (id counter), ``P{m}:holders`` (id -> JSON:
  name, cluster, host, ports, epoch) and ``P{m}:alive:<id>`` (the epoch, with a TTL the
  holder's heartbeat renews): membership, all in one slot.

A record counts only while its holder's ``alive`` key exists with the record's epoch: a daemon
that dies stops being offered within ``heartbeat_ttl_s``; a restarted daemon gets a new epoch and
re-publishes what it still holds. A record that is still wrong (evicted a moment ago) costs a
miss at fetch time, never wrong bytes: fetched entries are verified against their checksums and
the layout fingerprint. Records of dead holders are deleted lazily by lookups that meet them.
"""

from __future__ import annotations

import collections
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kvlink.config import ClusterConfig
from kvlink.errors import ConfigError, TierUnavailable
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit, PrefixIndex

from kvlink.cluster.store import IndexStore

KIND_CODES = {FULL: b"f", SLIDING: b"s", STATE: b"c"}
CODE_KINDS = {v[0]: k for k, v in KIND_CODES.items()}
TIERS = ("gpu", "host", "ssd")
_FIELD = struct.Struct(">HBI")
_VALUE = struct.Struct(">BII")
RECORD_BYTES = _FIELD.size + _VALUE.size


@dataclass(frozen=True)
class Holder:
    """A pool daemon registered in the index."""

    id: int
    name: str
    cluster: str
    host: str
    http_port: int
    data_port: int
    epoch: int


@dataclass(frozen=True)
class ClusterHit(PrefixHit):
    """:class:`PrefixHit` restorable in one cluster, with who serves each entry.

    ``plan``: holder id -> the (kind, key) entries to fetch from it (spread over the holders of
    each entry by bytes, so several daemons serve one prefix in parallel); ``holders``: those
    holders; ``by_holder``: holder name -> tokens restorable from that daemon alone (for routing
    a request to the node whose own daemon holds most of it)."""

    cluster: str = ""
    plan: Mapping[int, tuple[tuple[str, bytes], ...]] = field(default_factory=dict)
    holders: Mapping[int, Holder] = field(default_factory=dict)
    by_holder: Mapping[str, int] = field(default_factory=dict)


def block_key(prefix: bytes, key: bytes) -> bytes:
    return prefix + b"{" + key[:2].hex().encode() + b"}" + key


class GlobalIndex:
    """Membership, updates and lookups on the index cluster. Thread-safe. Every method raises
    :class:`~kvlink.errors.TierUnavailable` when the index cannot be reached."""

    def __init__(self, config: ClusterConfig, store: IndexStore | None = None):
        self.config = config
        self.store = store or IndexStore(config)
        p = config.key_prefix.encode()
        self._prefix = p
        self._ids, self._next, self._members = p + b"{m}:ids", p + b"{m}:next", p + b"{m}:holders"
        self._live: dict[int, Holder] = {}
        self._live_at = -1e9
        self._lock = threading.Lock()
        self._stale: collections.deque = collections.deque(maxlen=1 << 16)  # (block key, field) to delete
        self._reaped_at = 0.0
        self._fields_for: tuple | None = None

    def close(self) -> None:
        self.store.close()

    def _alive_key(self, holder_id: int) -> bytes:
        return self._prefix + b"{m}:alive:%d" % holder_id

    # -- membership ---------------------------------------------------------------------------------
    def register(self, name: str, cluster: str, host: str, http_port: int, data_port: int) -> Holder:
        """Enter a daemon (a new epoch for a known name) and start its liveness."""
        call = self.store.call
        raw = call("HGET", self._ids, name)
        if raw is None:
            candidate = int(call("INCR", self._next))
            if candidate > 0xFFFF:
                raise ConfigError("the index holds 65,535 daemon names already")
            call("HSETNX", self._ids, name, candidate)
            raw = call("HGET", self._ids, name)
        holder_id = int(raw)
        epoch = int(call("HINCRBY", self._members + b":epochs", holder_id, 1)) & 0xFFFFFFFF
        holder = Holder(holder_id, name, cluster, host, http_port, data_port, epoch)
        record = {"name": name, "cluster": cluster, "host": host, "http_port": http_port,
                  "data_port": data_port, "epoch": epoch}
        call("HSET", self._members, holder_id, json.dumps(record))
        self.heartbeat(holder)
        self._live_at = -1e9
        return holder

    def heartbeat(self, holder: Holder) -> bool:
        """Renew ``holder``'s liveness; returns False when it had lapsed (its records may have been
        reaped meanwhile: the caller re-publishes everything it holds)."""
        ttl_ms = int(self.config.heartbeat_ttl_s * 1000)
        # get=True: without it redis-py turns the previous value into "was the reply OK" (False).
        previous = self.store.call("SET", self._alive_key(holder.id), holder.epoch, "PX", ttl_ms, "GET", get=True)
        return previous is not None and int(previous) == holder.epoch

    def retire(self, holder: Holder) -> None:
        """Stop offering ``holder``'s entries now (a clean shutdown)."""
        self.store.call("DEL", self._alive_key(holder.id))
        self._live_at = -1e9

    def live_holders(self, max_age: float | None = None) -> dict[int, Holder]:
        """Holders whose heartbeat is current, by id (cached for a quarter of the TTL)."""
        max_age = self.config.heartbeat_ttl_s / 4 if max_age is None else max_age
        with self._lock:
            if time.monotonic() - self._live_at <= max_age:
                return self._live
        records = {int(k): v for k, v in (self.store.call("HGETALL", self._members) or {}).items()}
        ids = sorted(records)
        alive = self.store.call("MGET", *[self._alive_key(i) for i in ids]) if ids else []
        live = {}
        for holder_id, epoch in zip(ids, alive):
            if epoch is None:
                continue
            try:
                rec = json.loads(records[holder_id])
                holder = Holder(holder_id, rec["name"], rec["cluster"], rec["host"], int(rec["http_port"]),
                                int(rec["data_port"]), int(epoch))
            except (KeyError, TypeError, ValueError):
                continue  # a malformed record: not offered
            if holder.epoch == int(rec.get("epoch", -1)):
                live[holder_id] = holder
        with self._lock:
            self._live, self._live_at = live, time.monotonic()
        return live

    # -- updates ------------------------------------------------------------------------------------
    def publish(self, holder: Holder, changes: Sequence[tuple[str, str, bytes, int, str]]) -> None:
        """Apply ``(op, kind, key, nbytes, tier)`` changes of ``holder``'s entries, in order, in one
        batch: op "add" records the entry as held, "remove" forgets it."""
        now = int(time.time()) & 0xFFFFFFFF
        cmds = []
        for op, kind, key, nbytes, tier in changes:
            fld = _FIELD.pack(holder.id, KIND_CODES[kind][0], holder.epoch)
            if op == "add":
                value = _VALUE.pack(TIERS.index(tier) if tier in TIERS else 1, min(nbytes, 0xFFFFFFFF), now)
                cmds.append((b"HSET", block_key(self._prefix, key), fld, value))
            else:
                cmds.append((b"HDEL", block_key(self._prefix, key), fld))
        self.store.fanout(cmds)

    def forget(self, holder: Holder, entries: Sequence[tuple[str, bytes]]) -> None:
        """Delete records a fetch found wrong (the holder no longer has those entries)."""
        self.store.fanout([(b"HDEL", block_key(self._prefix, key), _FIELD.pack(holder.id, KIND_CODES[kind][0],
                                                                                 holder.epoch))
                           for kind, key in entries])

    # -- lookups ------------------------------------------------------------------------------------
    def probe(self, keys: Sequence[bytes], needs_full: bool) -> list[list[bytes]]:
        """The record field names of ``keys`` (block hashes), in order (the names say who holds
        what; the values are only for operators). Probes ``lookup_batch`` blocks first and the
        rest only when every one of those is held somewhere (a prefix cannot extend past a block
        nobody holds)."""
        first = min(len(keys), self.config.lookup_batch)
        out = self.store.fanout([(b"HKEYS", block_key(self._prefix, k)) for k in keys[:first]])
        if first < len(keys) and (not needs_full or all(out)):
            out += self.store.fanout([(b"HKEYS", block_key(self._prefix, k)) for k in keys[first:]])
        return out

    def lookup(self, layout: PrefixIndex, tokens: Sequence[int]) -> dict[str, ClusterHit]:
        """Per cluster with live holders: the longest prefix of ``tokens`` restorable there under
        the hybrid rule (every full block before the boundary, the sliding window ending at it, a
        state checkpoint exactly at it, each from some live daemon of that cluster)."""
        keys = layout.hashes(tokens)
        live = self.live_holders()
        records = self.probe(keys, layout.needs_full) if keys and live else []
        fields = self._fields(live)
        n = len(records)
        # per[cluster][kind][b]: None, or the frozenset of holder ids holding that entry
        per: dict[str, dict[str, list]] = {}
        decoded: dict[tuple, tuple[list, list]] = {}
        stale = self._stale
        for b, rec in enumerate(records):
            if not rec:
                continue
            names = tuple(rec)
            info = decoded.get(names)
            if info is None:
                info = decoded[names] = _decode(names, fields)
            entries, dead = info
            if dead:
                stale.extend((block_key(self._prefix, keys[b]), fld) for fld in dead)
            for cluster, kind, holders in entries:
                lists = per.get(cluster)
                if lists is None:
                    lists = per[cluster] = {k: [None] * n for k in KIND_CODES}
                lists[kind][b] = holders
        self._reap()
        out = {}
        for cluster in {h.cluster for h in live.values()}:
            lists = per.get(cluster) or {k: [None] * n for k in KIND_CODES}
            members = {i: h for i, h in live.items() if h.cluster == cluster}
            out[cluster] = _cluster_hit(layout, keys[:n], lists, cluster, members, len(keys))
        return out

    def _fields(self, live: dict[int, Holder]) -> dict[bytes, tuple[int, str, str]]:
        """Record field of a live holder's current epoch -> (holder id, cluster, kind), cached per
        live set. Any other field is a dead holder's or an old epoch's."""
        cached = self._fields_for
        if cached is not None and cached[0] is live:
            return cached[1]
        out = {}
        for holder_id, holder in live.items():
            for kind, code in KIND_CODES.items():
                out[_FIELD.pack(holder_id, code[0], holder.epoch)] = (holder_id, holder.cluster, kind)
        self._fields_for = (live, out)
        return out

    def _reap(self) -> None:
        """Delete records of dead holders met by lookups (a few thousand at a time, once a second)."""
        now = time.monotonic()
        if len(self._stale) < 256 and not (self._stale and now - self._reaped_at > 10):
            return
        if now - self._reaped_at < 1.0:
            return
        self._reaped_at = now
        batch = []
        while self._stale and len(batch) < 4096:
            batch.append(self._stale.popleft())
        try:
            # The lookups judged by a cached live set: a holder that registered (or renewed a lapsed
            # heartbeat, same epoch) since then is live, and its records must stay.
            current = self._fields(self.live_holders(max_age=0.0))
            self.store.fanout([(b"HDEL", key, fld) for key, fld in set(batch) if fld not in current])
        except TierUnavailable:
            pass  # they will be met again


def _decode(names: tuple, fields: dict) -> tuple[list, list]:
    """One block's field names -> ([(cluster, kind, frozenset of holder ids)], [dead fields])."""
    groups: dict[tuple[str, str], set] = {}
    dead = []
    for fld in names:
        known = fields.get(fld)
        if known is None:
            dead.append(fld)
            continue
        holder_id, cluster, kind = known
        groups.setdefault((cluster, kind), set()).add(holder_id)
    return [(c, k, frozenset(h)) for (c, k), h in groups.items()], dead


def _best(layout: PrefixIndex, n: int, lists: dict, holder: int | None = None) -> tuple[int, int]:
    """(restorable blocks, blocks of full KV) given which entries are held: by any holder of the
    cluster (``holder`` None) or by that one holder. Plain loops: this runs per holder per lookup."""
    full, state, sliding = lists[FULL], lists[STATE], lists[SLIDING]
    kv = n
    if layout.needs_full:
        for b in range(n):
            slot = full[b]
            if slot is None or (holder is not None and holder not in slot):
                kv = b
                break
    w = layout.window_blocks
    for b in range(kv, 0, -1):
        if layout.needs_state:
            slot = state[b - 1]
            if slot is None or (holder is not None and holder not in slot):
                continue
        if w and not all(sliding[k] is not None and (holder is None or holder in sliding[k])
                         for k in range(max(0, b - w), b)):
            continue
        return b, kv
    return 0, kv


def _cluster_hit(layout: PrefixIndex, keys: list[bytes], lists: dict, cluster: str,
                 members: dict[int, Holder], total: int) -> ClusterHit:
    n, bs = len(keys), layout.block_size
    best, kv = _best(layout, n, lists)
    by_holder = {holder.name: _best(layout, n, lists, holder_id)[0] * bs for holder_id, holder in members.items()}
    w = layout.window_blocks
    wanted = [(FULL, b) for b in range(best)] if layout.needs_full else []
    wanted += [(SLIDING, b) for b in range(max(0, best - w), best)] if w else []
    if layout.needs_state and best:
        wanted.append((STATE, best - 1))
    # Entries held by several daemons are dealt out in turn (block by block), so a prefix held by
    # two daemons is fetched from both at once; a state checkpoint (the largest entry) goes to
    # the holder with the fewest blocks planned.
    plan: dict[int, list[tuple[str, bytes]]] = {}
    orders: dict[frozenset, list[int]] = {}
    for kind, b in wanted:
        options = lists[kind][b]
        ordered = orders.get(options)
        if ordered is None:
            ordered = orders[options] = sorted(options)
        if len(ordered) == 1:
            chosen = ordered[0]
        elif kind == STATE:
            chosen = min(ordered, key=lambda h: (len(plan.get(h, ())), h))
        else:
            chosen = ordered[b % len(ordered)]
        entries = plan.get(chosen)
        if entries is None:
            entries = plan[chosen] = []
        entries.append((kind, keys[b]))
    if not keys:
        stopped = f"shorter than one block ({bs} tokens)"
    elif best == total:
        stopped = "whole prompt held in the cluster"
    elif kv == 0:
        stopped = "no cached blocks in the cluster"
    else:
        stopped = f"restorable to token {best * bs} (full KV to {kv * bs})"
    full = tuple(keys[:best]) if layout.needs_full else ()
    sliding = tuple(keys[max(0, best - w): best]) if w else ()
    state = keys[best - 1] if layout.needs_state and best else None
    return ClusterHit(best * bs, full, sliding, state, kv * bs, stopped, cluster=cluster,
                      plan={h: tuple(v) for h, v in plan.items()},
                      holders={h: members[h] for h in plan}, by_holder=by_holder)
