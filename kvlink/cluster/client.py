"""A pool spanning every daemon of a cluster: look up in the global index, fetch from the holders.

:class:`ClusterPoolClient` has the calls :class:`~kvlink.engine.decode.DecodeSide` makes on a pool
(``lookup``, ``get``, ``put``, ``checkpoint_positions``), so an engine uses the cluster-wide pool
the way it uses its own daemon. Lookups go to the index; a hit's entries are fetched from the
daemons holding them, several in parallel, over kvlink's transport (each entry verified against
its checksum on arrival, and against the layout when unpacked). Stores go to this host's daemon,
which publishes them. A prefix fetched ``replicate_after`` times from another daemon is copied
into this host's daemon (hot prefixes spread to where they are used).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Sequence

from kvlink.config import ClusterConfig, TransportConfig
from kvlink.daemon.auth import DEFAULT_TENANT
from kvlink.daemon.client import Fetched, PoolClient
from kvlink.errors import ConfigError, EntryMissing, KvlinkError, TierUnavailable
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit, PrefixIndex, checkpoint_positions
from kvlink.presets import get_preset
from kvlink.spec import CacheSpec

from kvlink.cluster.index import ClusterHit, GlobalIndex, Holder

log = logging.getLogger("kvlink.cluster")
_CLIENTS = 32  # connections to other daemons kept open (LRU)
_HOT = 4096    # prefixes whose fetch counts are kept


class ClusterPoolClient:
    """``model``'s pool across the daemons of ``config.cluster``, as ``tenant`` with ``secret``.

    ``local``: this host's daemon (stores go there, hot prefixes are copied there; it also answers
    lookups when the index is unreachable). ``block_size`` / ``checkpoint_every``: the daemons'
    pool settings (read from ``local`` when given). ``reply_arena``: landing space of each connection
    to another daemon (bounds one fetch from it). Raises what :class:`PoolClient` raises, plus
    :class:`~kvlink.errors.EntryMissing` when a holder no longer has an entry the index offered
    (its record is deleted; look up again)."""

    def __init__(self, model: str, config: ClusterConfig, *, local: PoolClient | None = None,
                 spec: CacheSpec | None = None, block_size: int | None = None, checkpoint_every: int | None = None,
                 secret: bytes | None = None, tenant: str = DEFAULT_TENANT, transport: TransportConfig | None = None,
                 timeout: float = 60.0, reply_arena: int = 256 << 20, index: GlobalIndex | None = None):
        if not config.enabled and index is None:
            raise ConfigError("a cluster pool needs ClusterConfig.index_nodes")
        self.model, self.config, self.local = model, config, local
        self.spec = spec or get_preset(model)
        self.secret, self.tenant = secret, tenant
        self.transport, self.timeout, self.reply_arena = transport, timeout, reply_arena
        self._block_size, self._every = block_size, checkpoint_every
        self.index = index
        self.layout: PrefixIndex | None = None
        self._clients: collections.OrderedDict[tuple[int, int], PoolClient] = collections.OrderedDict()
        self._fetches: collections.OrderedDict[tuple[int, bytes], int] = collections.OrderedDict()
        self._prompts: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.stats = collections.Counter()

    async def connect(self) -> "ClusterPoolClient":
        if self.local is not None:
            await self.local.connect()
            settings = self.local._pool_settings or {}
            self._block_size = self._block_size or settings.get("block_size")
            if self._every is None:
                self._every = settings.get("checkpoint_every")
        if not self._block_size:
            raise ConfigError("the cluster pool's block size is unknown: pass block_size or a local daemon")
        # Daemons name a pool's namespace after its tenant: the same chained hashes here.
        self.layout = PrefixIndex(self.spec, self._block_size, self.tenant, self._every)
        if self.index is None:
            try:
                self.index = await asyncio.to_thread(GlobalIndex, self.config)
            except TierUnavailable as exc:  # lookups answer from the local daemon meanwhile
                log.warning("index unreachable, connecting to it at the next lookup: %s", exc)
        return self

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        if self.local is not None:
            await self.local.close()
        if self.index is not None:
            self.index.close()

    async def __aenter__(self) -> "ClusterPoolClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def block_size(self) -> int | None:
        return self._block_size

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        if not self.layout.needs_state:
            return []
        return checkpoint_positions(self._block_size, self._every, end, start)

    # -- lookups ------------------------------------------------------------------------------------
    async def lookup_clusters(self, tokens: Sequence[int]) -> dict[str, ClusterHit]:
        """Per cluster, the longest prefix restorable there and who holds it. Raises
        :class:`~kvlink.errors.TierUnavailable` when the index cannot be reached."""
        if self.index is None:  # unreachable at connect()
            self.index = await asyncio.to_thread(GlobalIndex, self.config)
        hits = await asyncio.to_thread(self.index.lookup, self.layout, tokens)
        for hit in hits.values():
            if hit.tokens:
                self._remember(hit, tokens)
        return hits

    async def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest prefix restorable in this client's cluster. With the index unreachable,
        the local daemon's own lookup (or a miss): a lookup never fails because of the index."""
        try:
            hits = await self.lookup_clusters(tokens)
        except TierUnavailable as exc:
            self.stats["index_errors"] += 1
            log.warning("index unreachable, looking up in the local daemon only: %s", exc)
            if self.local is not None:
                return await self.local.lookup(list(tokens))
            return PrefixHit(0, (), (), None, 0, f"index unreachable: {exc}")
        hit = hits.get(self.config.cluster)
        return hit if hit is not None else PrefixHit(0, (), (), None, 0, "no live daemon in this cluster")

    def _remember(self, hit: ClusterHit, tokens: Sequence[int]) -> None:
        key = hit.state or hit.full[-1]
        self._prompts[key] = list(tokens[: hit.tokens])
        self._prompts.move_to_end(key)
        while len(self._prompts) > 256:
            self._prompts.popitem(last=False)

    # -- fetching -----------------------------------------------------------------------------------
    async def get(self, hit: PrefixHit) -> Fetched:
        """Every entry of ``hit``, fetched from its holders in parallel (release the result)."""
        if not isinstance(hit, ClusterHit):
            if self.local is None:
                raise ConfigError("a plain PrefixHit needs a local daemon to fetch from")
            return await self.local.get(hit)
        jobs = [(hit.holders[h], list(entries)) for h, entries in hit.plan.items()]
        results = await asyncio.gather(*(self._get_from(holder, entries) for holder, entries in jobs),
                                       return_exceptions=True)
        parts = [r for r in results if isinstance(r, Fetched)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        missing = [(holder, f.missing) for (holder, _), f in zip(jobs, results) if isinstance(f, Fetched) and f.missing]
        if failure is not None or missing:
            for part in parts:
                part.release()
            for holder, keys in missing:
                self.stats["stale_records"] += len(keys)
                try:
                    await asyncio.to_thread(self.index.forget, holder, keys)
                except TierUnavailable:
                    pass
            if failure is not None:
                raise failure
            raise EntryMissing(f"{sum(len(k) for _, k in missing)} entries offered by the index are gone; "
                               "look up again")
        merged = Fetched((), lambda: [p.release() for p in parts])
        for part in parts:
            merged.update(part)
        self.stats["fetched_entries"] += len(merged)
        self.stats["fetch_holders"] += len(parts)
        self._maybe_replicate(hit, merged)
        return merged

    async def _get_from(self, holder: Holder, entries: list[tuple[str, bytes]]) -> Fetched:
        client = await self._client(holder)
        try:
            return await client.get_keys(entries, allow_missing=True)
        except KvlinkError:
            self._drop_client(holder)
            raise

    async def _client(self, holder: Holder) -> PoolClient:
        local = self.local
        if local is not None and (local.host, local.data_port) == (holder.host, holder.data_port):
            return local
        key = (holder.id, holder.epoch)
        client = self._clients.get(key)
        if client is None:
            client = PoolClient(self.model, holder.host, holder.http_port, holder.data_port, secret=self.secret,
                                tenant=self.tenant, transport=self.transport, timeout=self.timeout, spec=self.spec,
                                reply_arena=self.reply_arena)
            await client.connect()
            self._clients[key] = client
            while len(self._clients) > _CLIENTS:
                _, old = self._clients.popitem(last=False)
                self._spawn(old.close())
        self._clients.move_to_end(key)
        return client

    def _drop_client(self, holder: Holder) -> None:
        client = self._clients.pop((holder.id, holder.epoch), None)
        if client is not None:
            self._spawn(client.close())

    # -- stores and replication ---------------------------------------------------------------------
    async def put(self, tokens: list[int], pieces: dict[tuple[str, int], object]):
        """Store in this host's daemon (which publishes to the index). Raises :class:`ConfigError`
        without a local daemon."""
        if self.local is None:
            raise ConfigError("storing into the cluster pool needs a local daemon")
        return await self.local.put(tokens, pieces)

    def _maybe_replicate(self, hit: ClusterHit, fetched: Fetched) -> None:
        if not self.config.replicate_after or self.local is None or not hit.tokens:
            return  # a miss has no boundary (and nothing to copy)
        lhost = (self.local.host, self.local.data_port)
        boundary = hit.state or hit.full[-1]
        for holder in hit.holders.values():
            if (holder.host, holder.data_port) == lhost:
                continue
            count = self._fetches.get((holder.id, boundary), 0) + 1
            self._fetches[(holder.id, boundary)] = count
            self._fetches.move_to_end((holder.id, boundary))
            while len(self._fetches) > _HOT:
                self._fetches.popitem(last=False)
            tokens = self._prompts.get(boundary)
            if count == self.config.replicate_after and tokens is not None:
                pieces = hit_pieces(hit, fetched, self._block_size, copy=True)  # the views go away on release
                self.stats["replications"] += 1
                self._spawn(self._replicate(tokens, pieces))
                return

    async def _replicate(self, tokens: list[int], pieces: dict) -> None:
        try:
            report = await self.local.put(tokens, pieces)
            self.stats["replicated_entries"] += report.stored
        except KvlinkError as exc:
            log.warning("copying a hot prefix into the local daemon failed: %s", exc)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def hit_pieces(hit: PrefixHit, fetched: Fetched, block_size: int, copy: bool = False) -> dict[tuple[str, int], object]:
    """The hit's entries as ``{(kind, block): buffer}`` for a put of its prompt: views into
    ``fetched`` (put them before releasing it), or copies with ``copy``."""
    own = bytes if copy else (lambda view: view)
    blocks = hit.tokens // block_size
    out = {(FULL, b): own(fetched[(FULL, k)]) for b, k in enumerate(hit.full)}
    out.update({(SLIDING, b): own(fetched[(SLIDING, k)])
                for b, k in enumerate(hit.sliding, start=blocks - len(hit.sliding))})
    if hit.state is not None:
        out[(STATE, blocks - 1)] = own(fetched[(STATE, hit.state)])
    return out
