"""Cache-affine routing over a global KV manager (PrfaaS, arXiv 2604.15039, section 4.3).

:class:`KvManager` turns a global index's answer (duck-typed: ``lookup(tokens) -> {cluster: hit}``
with ``hit.tokens``, ``hit.by_holder``, ``hit.cluster``) into a prefix length per cluster,
:class:`Router` picks the cluster by incremental length, and :class:`AffinityRouter` picks the node
(an engine co-located with one pool daemon, its "holder") with the longest holder prefix and room.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from kvlink.errors import ConfigError, KvlinkError, ResourceLimit
from kvlink.route.router import Decision, Router

log = logging.getLogger(__name__)

MAX_NODES = 4096          # a NodeSet beyond this is a configuration mistake, not a deployment
LOG_INTERVAL_S = 60.0     # an index outage is logged at most once per this many seconds


@dataclass(frozen=True)
class Match:
    """One index answer, cleaned: prefix tokens per configured cluster and per holder inside it."""

    tokens: dict[str, int]                 # cluster -> longest restorable prefix (0 when absent)
    holders: dict[str, dict[str, int]]     # cluster -> holder -> prefix restorable from it alone
    error: str | None = None               # why the index answer was not used (index down)


class KvManager:
    """The router's view of the global KV cache index.

    ``lookup(tokens)`` returns ``{cluster: hit}``; clusters it names that are not in ``clusters`` are
    ignored (the index may serve more clusters than this router). A lookup raising a
    :class:`KvlinkError` means the index is down: the answer is "nothing cached anywhere", so routing
    goes on by length alone; it is counted (``index_errors``) and logged at most once per minute.
    Hits that cannot be true (negative, beyond the prompt, naming another cluster) count as
    ``bad_hits`` and as no cache. Raises :class:`ConfigError` for an empty or duplicated cluster list.
    """

    def __init__(self, lookup: Callable[[Sequence[int]], Mapping[str, Any]], clusters: Sequence[str],
                 *, clock: Callable[[], float] = time.monotonic):
        if not clusters or len(set(clusters)) != len(clusters) or not all(isinstance(c, str) and c for c in clusters):
            raise ConfigError(f"clusters must be distinct non-empty names, got {list(clusters)!r}")
        self._lookup, self.clusters, self._clock = lookup, tuple(clusters), clock
        self._lock = threading.Lock()
        self.index_errors = self.bad_hits = self._unlogged = 0
        self._logged_at: float | None = None
        self.last: Match | None = None    # the latest answer, for inspection (racy under threads)

    def query(self, tokens: Sequence[int]) -> Match:
        """Prefix lengths per cluster and per holder for ``tokens``. Raises nothing of its own; a
        non-kvlink exception from ``lookup`` (a bug) propagates."""
        try:
            hits = self._lookup(tokens)
        except KvlinkError as exc:
            match = Match({c: 0 for c in self.clusters}, {c: {} for c in self.clusters}, f"{type(exc).__name__}: {exc}")
            self._index_down(exc)
        else:
            match = self._clean(hits, len(tokens))
        self.last = match
        return match

    def match(self, tokens: Sequence[int]) -> dict[str, int]:
        """Prefix tokens per configured cluster (0 where nothing is cached). Raises as :meth:`query`."""
        return dict(self.query(tokens).tokens)

    def _clean(self, hits: Mapping[str, Any], prompt: int) -> Match:
        tokens, holders, bad = {c: 0 for c in self.clusters}, {c: {} for c in self.clusters}, 0
        for cluster in self.clusters:
            hit = hits.get(cluster)
            if hit is None:
                continue
            n = _length(hit.tokens, prompt)
            if n is None or hit.cluster != cluster:
                bad += 1
                continue
            tokens[cluster] = n
            for holder, m in hit.by_holder.items():
                m = _length(m, n)  # one holder alone cannot restore more than the cluster's best mix
                if m is None:
                    bad += 1
                else:
                    holders[cluster][holder] = m
        if bad:
            with self._lock:
                self.bad_hits += bad
        return Match(tokens, holders)

    def _index_down(self, exc: KvlinkError) -> None:
        with self._lock:
            self.index_errors += 1
            now = self._clock()
            if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL_S:
                self._unlogged += 1
                return
            suppressed, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warning("KV index lookup failed, routing by length only: %s: %s (%d more since the last line)",
                    type(exc).__name__, exc, suppressed)


def _length(value: Any, most: int) -> int | None:
    """``value`` as an int in ``[0, most]`` (numpy integers welcome), else None."""
    try:
        n = operator.index(value)
    except TypeError:
        return None
    return n if 0 <= n <= most and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Node:
    """An engine instance in ``cluster`` co-located with pool daemon ``holder``; ``capacity`` is
    its maximum of concurrent requests (0: drained). Raises :class:`ConfigError` for an empty name,
    cluster or holder, or a negative or non-integer capacity."""

    name: str
    cluster: str
    holder: str
    capacity: int

    def __post_init__(self):
        if not all(isinstance(v, str) and v for v in (self.name, self.cluster, self.holder)):
            raise ConfigError(f"node name, cluster and holder must be non-empty strings: {self!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 0:
            raise ConfigError(f"node {self.name}: capacity must be an integer >= 0, got {self.capacity!r}")


class NodeSet:
    """Nodes and their in-flight requests, thread-safe.

    A node may run over its capacity only through the "all busy" fallback, and by at most
    ``max_overcommit`` requests. Raises :class:`ConfigError` for no nodes, more than
    :data:`MAX_NODES`, duplicate names or a negative ``max_overcommit``.
    """

    def __init__(self, nodes: Iterable[Node], max_overcommit: int = 1024):
        nodes = list(nodes)
        if not 0 < len(nodes) <= MAX_NODES or len({n.name for n in nodes}) != len(nodes) or max_overcommit < 0:
            raise ConfigError(f"a NodeSet needs 1..{MAX_NODES} nodes with distinct names and max_overcommit >= 0, got "
                              f"{len(nodes)} nodes, {len({n.name for n in nodes})} names, {max_overcommit}")
        self._nodes = {n.name: n for n in nodes}
        self._busy = {n.name: 0 for n in nodes}
        self.max_overcommit = max_overcommit
        self._lock = threading.Lock()

    @property
    def clusters(self) -> set[str]:
        return {n.cluster for n in self._nodes.values()}

    def nodes(self, cluster: str | None = None) -> list[Node]:
        """The nodes, or those of ``cluster``."""
        return [n for n in self._nodes.values() if cluster is None or n.cluster == cluster]

    def in_flight(self, node: Node | str) -> int:
        """Requests running on ``node``. Raises :class:`ConfigError` for an unknown node."""
        with self._lock:
            return self._busy[self._known(node)]

    def snapshot(self) -> dict[str, int]:
        """Requests in flight per node name."""
        with self._lock:
            return dict(self._busy)

    def started(self, node: Node | str) -> None:
        """Count a request on ``node``. Raises :class:`ConfigError` for an unknown node and
        :class:`ResourceLimit` past capacity + ``max_overcommit``."""
        with self._lock:
            self._start(self._known(node))

    def finished(self, node: Node | str) -> None:
        """Release a request on ``node``. Raises :class:`ConfigError` for an unknown node or one
        with nothing in flight (a double release)."""
        with self._lock:
            name = self._known(node)
            if self._busy[name] == 0:
                raise ConfigError(f"node {name}: finished() without a started request")
            self._busy[name] -= 1

    def acquire(self, cluster: str, prefix: Mapping[str, int]) -> tuple[Node, int, str]:
        """Pick and start a node of ``cluster`` atomically: the longest ``prefix[holder]`` among nodes
        with spare capacity, ties to the least loaded (in-flight / capacity), then the name; with all
        full, the least loaded. Returns (node, its prefix, reason). Raises :class:`ConfigError` for a
        cluster without nodes and :class:`ResourceLimit` when even the least loaded is past its bound."""
        candidates = self.nodes(cluster)
        if not candidates:
            raise ConfigError(f"no nodes in cluster {cluster!r}")
        with self._lock:
            busy = self._busy

            def load(n: Node) -> float:
                return busy[n.name] / n.capacity if n.capacity else math.inf

            free = [n for n in candidates if busy[n.name] < n.capacity]
            if free:
                node = min(free, key=lambda n: (-prefix.get(n.holder, 0), load(n), n.name))
                reason = "longest prefix" if prefix.get(node.holder, 0) > 0 else "least loaded"
            else:
                node = min(candidates, key=lambda n: (load(n), busy[n.name], n.name))
                reason = "all busy"
            self._start(node.name)
        return node, prefix.get(node.holder, 0), reason

    def _known(self, node: Node | str) -> str:
        name = node.name if isinstance(node, Node) else node
        if name not in self._nodes or (isinstance(node, Node) and self._nodes[name] != node):
            raise ConfigError(f"unknown node {name!r}")
        return name

    def _start(self, name: str) -> None:  # caller holds the lock
        limit = self._nodes[name].capacity + self.max_overcommit
        if self._busy[name] >= limit:
            raise ResourceLimit(f"node {name}: {limit} requests in flight (capacity + NodeSet.max_overcommit)")
        self._busy[name] += 1


@dataclass(frozen=True)
class Placement:
    """Where one request runs; see :meth:`AffinityRouter.route`."""

    decision: Decision    # cluster, incremental/prefix lengths, cross-cluster transfer if any
    node: Node            # where to run it; counted in flight until AffinityRouter.finished()
    node_prefix: int      # prefix tokens the node's own holder can restore
    reason: str           # "longest prefix", "least loaded" or "all busy"


class AffinityRouter:
    """Cluster by :class:`Router` on the manager's per-cluster prefix, node by holder affinity.

    Raises :class:`ConfigError` when a node or a manager cluster is not one of the router's two
    clusters, or when one of the router's clusters has no node.
    """

    def __init__(self, router: Router, nodes: NodeSet | Iterable[Node], manager: KvManager):
        self.router, self.manager = router, manager
        self.nodes = nodes if isinstance(nodes, NodeSet) else NodeSet(nodes)
        known = {router.local, router.remote}
        unknown = sorted((self.nodes.clusters | set(manager.clusters)) - known)
        if unknown:
            raise ConfigError(f"unknown clusters {unknown} (the router knows {sorted(known)})")
        if known - self.nodes.clusters:
            raise ConfigError(f"clusters {sorted(known - self.nodes.clusters)} have no nodes")
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "prompt_tokens": 0, "prefix_tokens_reused": 0,
                                       "node_prefix_tokens": 0, "transfers": 0, "transfer_tokens": 0,
                                       "index_down": 0, "clusters": {c: 0 for c in sorted(known)},
                                       "reasons": {}}

    def route(self, tokens: Sequence[int], bandwidth_abundant: bool) -> Placement:
        """Place one request and count it in flight on the chosen node (release with
        :meth:`finished`). Raises :class:`ConfigError` for an empty prompt and
        :class:`ResourceLimit` when every node of the chosen cluster is past its overcommit bound."""
        if len(tokens) == 0:
            raise ConfigError("cannot route an empty prompt")
        match = self.manager.query(tokens)
        decision = self.router.route(len(tokens), match.tokens, bandwidth_abundant)
        node, node_prefix, reason = self.nodes.acquire(decision.cluster, match.holders.get(decision.cluster, {}))
        t = decision.transfer
        with self._lock:
            s = self._stats
            for key, n in (("requests", 1), ("prompt_tokens", len(tokens)), ("prefix_tokens_reused", decision.prefix),
                           ("node_prefix_tokens", node_prefix), ("index_down", int(match.error is not None)),
                           ("transfers", int(t is not None)), ("transfer_tokens", t.end - t.start if t else 0)):
                s[key] += n
            s["clusters"][decision.cluster] += 1
            s["reasons"][reason] = s["reasons"].get(reason, 0) + 1
        return Placement(decision, node, node_prefix, reason)

    def finished(self, placement: Placement) -> None:
        """The request ended. Raises :class:`ConfigError` on a double release."""
        self.nodes.finished(placement.node)

    def stats(self) -> dict[str, Any]:
        """Counters since construction, JSON-able: requests and tokens, per cluster and per reason,
        transfers, index outages, bad index hits, and in-flight requests per node."""
        with self._lock:
            out = {k: dict(v) if isinstance(v, dict) else v for k, v in self._stats.items()}
        out["bad_hits"] = self.manager.bad_hits
        out["in_flight"] = self.nodes.snapshot()
        return out
