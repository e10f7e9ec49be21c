"""Decode side: find what is cached, load the rest as it streams in, layer by layer.

Per request: :meth:`DecodeSide.lookup` (how many prompt tokens the pool can restore),
:meth:`~DecodeSide.load_from_pool` (restore them), :meth:`~DecodeSide.start_load` (receive the
increment into a block table and state slot), :meth:`~DecodeSide.wait_layer` /
:meth:`~DecodeSide.wait_all`, :meth:`~DecodeSide.release`; :meth:`~DecodeSide.store` keeps a
finished prompt's cache in the pool for later requests.

vLLM ``KVConnectorBase_V1``: scheduler side ``get_num_new_matched_tokens`` -> :meth:`lookup`
(``hit.tokens`` minus what the engine holds, and ``True`` for an async load when a transfer is
expected), ``update_state_after_alloc`` -> :meth:`start_load` with the allocated blocks;
worker side ``start_load_kv`` -> :meth:`load_from_pool` + :meth:`start_load`,
``wait_for_layer_load`` -> :meth:`wait_layer`, ``get_finished`` -> :meth:`wait_all`,
``get_block_ids_with_load_errors`` -> :attr:`LoadFailed.invalid_blocks`. SGLang HiCache:
``batch_exists`` -> :meth:`lookup`, ``batch_get`` -> :meth:`load_from_pool`, ``batch_set`` ->
:meth:`store` (KV and the separate state pool together). See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

from kvlink.config import TransportConfig
from kvlink.daemon.arena import FreeListArena
from kvlink.engine.pieces import pack_pieces, release_pieces, restore_pieces
from kvlink.engine.prefill import transfer_id_for
from kvlink.errors import ConfigError, EngineError, KvlinkError, LoadFailed, TransferTimeout, TransportError
from kvlink.pool.index import PrefixHit, checkpoint_positions
from kvlink.pool.pool import StoreReport
from kvlink.serde import CacheRef, PagedCache, Payload, StagingArena, Unpacker
from kvlink.serde.payload import PayloadScan, payload_intact
from kvlink.transport import IncomingTransfer, TransferServer, arena_allocator
from kvlink.transport.loop import new_event_loop, run_sync, stop_loop


@dataclass
class LoadReport:
    """What one load did (times are ``time.monotonic()``)."""

    request_id: str
    bytes: int = 0
    began: float = 0.0
    transfer_started: float | None = None
    layer_done: dict[int, float] = field(default_factory=dict)
    layer_bytes: dict[int, int] = field(default_factory=dict)
    finished: float = 0.0


class _Load:
    def __init__(self, request_id: str, ref: CacheRef, layers: list[int]):
        loop = asyncio.get_running_loop()
        self.request_id = request_id
        self.ref = ref
        self.layers = {layer: loop.create_future() for layer in layers}
        self.report = LoadReport(request_id, began=time.monotonic())
        self.incoming: IncomingTransfer | None = None
        self.task: asyncio.Task | None = None
        self.error: LoadFailed | None = None


DEFAULT_ARENA_BYTES = 64 << 20  # a few layers of a long request in flight; larger ones overflow


class DecodeSide:
    """Receives requests' caches into one :class:`PagedCache`; optional prefix pool (a local
    :class:`~kvlink.pool.Pool` or a daemon :class:`~kvlink.daemon.client.PoolClient`)."""

    def __init__(self, cache: PagedCache, transport: TransportConfig | None = None, secret: bytes | None = None,
                 pool=None, pool_block_size: int | None = None, begin_timeout: float = 30.0,
                 arena_bytes: int = DEFAULT_ARENA_BYTES):
        """``arena_bytes``: a receive arena (pinned when CUDA exists, pre-faulted otherwise) that
        arriving layers land in, reused from request to request, and as much for packing a daemon
        pool's puts (made on the first); what does not fit gets a buffer of its own (0: always).
        Raises :class:`ConfigError` for a pool without a block size or a negative ``arena_bytes``."""
        if arena_bytes < 0:
            raise ConfigError(f"arena_bytes must be >= 0, got {arena_bytes}")
        self.cache = cache
        self.unpacker = Unpacker(cache)
        extra = {"allocator": arena_allocator(FreeListArena(arena_bytes), overflow=True)} if arena_bytes else {}
        # Parts are kvlink payloads with their own checksums: the receiver verifies each layer
        # once (a layer that fails is resent whole) and senders skip per-chunk hashing.
        # Transfers are claimed by id (start_load): nothing is queued for accept(), so nothing is
        # held for a request once it is released.
        self.server = TransferServer(transport, [cache.spec.fingerprint], secret, part_verifier=payload_intact,
                                     part_scanner=PayloadScan, accept_queue=False, **extra)
        self.pool = pool
        self.pool_block_size = pool_block_size or (pool.config.block_size if hasattr(pool, "config") else None)
        if pool is not None and self.pool_block_size is None:
            raise ConfigError("give pool_block_size for a daemon pool (its [pool] block_size)")
        self.begin_timeout = begin_timeout
        self._loads: dict[str, _Load] = {}
        self._arena_bytes = arena_bytes
        self._put_staging: StagingArena | None = None  # a daemon pool's puts are packed here (made on first use)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for prefill peers (loopback unless told otherwise); returns the bound address.
        Raises :class:`~kvlink.errors.TransportError` when the address cannot be bound."""
        try:
            return await self.server.start(host, port)
        except OSError as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {exc}") from None

    # -- pool -----------------------------------------------------------------------------------
    async def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest prefix of ``tokens`` the pool can restore (``hit.tokens``; 0 without a pool)."""
        if self.pool is None:
            return PrefixHit(0, (), (), None, 0, "no pool")
        result = self.pool.lookup(tokens)
        return await result if asyncio.iscoroutine(result) else result

    async def load_from_pool(self, hit: PrefixHit, ref: CacheRef) -> int:
        """Restore ``hit`` into ``ref``'s blocks and slot; returns the tokens restored. Raises
        :class:`~kvlink.errors.EntryMissing` if entries were evicted meanwhile (look up again) and
        the entries' typed errors if one fails verification (see
        :func:`~kvlink.engine.pieces.restore_pieces`: on a CPU cache the hit's blocks and slot
        may then hold garbage, so treat them as not loaded)."""
        if not hit.tokens:
            return 0
        if hasattr(self.pool, "pin_hit"):
            # In place: host pages (SSD entries land in host pages first) straight into the cache.
            return await asyncio.to_thread(self._load_pinned, hit, ref)
        if hasattr(self.pool, "fetch"):
            entries = await asyncio.to_thread(self.pool.fetch, hit)
            return await asyncio.to_thread(restore_pieces, self.cache, hit, entries, ref, self.pool_block_size)
        fetched = await self.pool.get(hit)
        with fetched:
            return await asyncio.to_thread(restore_pieces, self.cache, hit, fetched, ref, self.pool_block_size)

    def _load_pinned(self, hit: PrefixHit, ref: CacheRef) -> int:
        entries, release = self.pool.pin_hit(hit, background=True)  # SSD reads overlap the copies
        try:
            return restore_pieces(self.cache, hit, entries, ref, self.pool_block_size)
        finally:
            release()

    async def store(self, tokens: Sequence[int], ref: CacheRef, first_block: int = 0) -> StoreReport:
        """Keep the cache of ``tokens`` (held at ``ref``) in the pool: its full pool blocks from
        ``first_block`` on, and the state when the prompt ends on a block boundary. Returns the
        pool's :class:`~kvlink.pool.pool.StoreReport` (what was kept, on SSD too, refused)."""
        if self.pool is None:
            return StoreReport()
        return await self._store(tokens, ref, first_block)

    async def _store(self, tokens: Sequence[int], ref: CacheRef, first_block: int) -> StoreReport:
        if hasattr(self.pool, "fetch"):
            # In process: each entry is packed straight into pool pages, which the pool keeps.
            return await asyncio.to_thread(self._store_local, tokens, ref, first_block)
        if self._put_staging is None and self._arena_bytes:
            self._put_staging = StagingArena(self._arena_bytes)
        held: list = []
        try:
            pieces = await asyncio.to_thread(pack_pieces, self.cache, ref, self.pool_block_size, first_block,
                                             None, self._put_staging, held)
            if not pieces:
                return StoreReport()
            return await self.pool.put(list(tokens), pieces)
        finally:
            for payload in held:
                payload.release()

    def _store_local(self, tokens: Sequence[int], ref: CacheRef, first_block: int) -> StoreReport:
        pieces = pack_pieces(self.cache, ref, self.pool_block_size, first_block, getattr(self.pool, "landing", None))
        try:
            return self.pool.store(tokens, pieces) if pieces else StoreReport()
        finally:
            release_pieces(pieces)

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        """Token positions in ``(start, end]`` at which the pool wants the linear-attention state
        (see :meth:`store_state`): every ``checkpoint_every`` pool blocks and the last block
        boundary, as the pool's settings say (a local pool's config; a daemon's, which a
        :class:`~kvlink.daemon.client.PoolClient` learns when it connects). Nothing is taken
        automatically: the engine calls :meth:`store_state` when it stands at each position.
        Empty without a pool or linear layers."""
        if self.pool is None or not self.cache.spec.state_bytes:
            return []
        if hasattr(self.pool, "checkpoint_positions"):
            return self.pool.checkpoint_positions(end, start)
        return checkpoint_positions(self.pool_block_size, None, end, start)  # a pool that says nothing

    async def store_state(self, tokens: Sequence[int], ref: CacheRef) -> StoreReport:
        """Hand the pool a state checkpoint: the state in ``ref.state_slot`` as it is *now*, which
        must be the state after ``ref.num_tokens`` tokens of ``tokens`` (a pool block boundary,
        one of :meth:`checkpoint_positions`). Call it while prefill or decode stands there; the
        blocks' KV is stored by :meth:`store` (now or at the request's end). Returns the
        :class:`~kvlink.pool.pool.StoreReport`. Raises :class:`ConfigError` off a boundary."""
        bs = self.pool_block_size
        if self.pool is None or not self.cache.spec.state_bytes:
            return StoreReport()
        if ref.num_tokens <= 0 or ref.num_tokens % bs or ref.num_tokens > len(tokens):
            raise ConfigError(f"a state checkpoint must lie on a pool block boundary ({bs} tokens) "
                              f"within the tokens, got {ref.num_tokens}")
        at = ref.span(ref.num_tokens)
        # From the boundary's block on, pack_pieces packs only the state: no KV blocks.
        return await self._store(list(tokens[: ref.num_tokens]), at, ref.num_tokens // bs)

    # -- loads ----------------------------------------------------------------------------------
    def start_load(self, request_id: str, ref: CacheRef, layers: list[int] | None = None,
                   timeout: float | None = None) -> None:
        """Receive the request's transfer into ``ref`` (blocks and slot; tokens before
        ``ref.token_start`` are already there). Returns at once; wait with :meth:`wait_layer` /
        :meth:`wait_all`. ``timeout`` bounds the whole load. Raises :class:`EngineError` for a
        request id already loading."""
        if request_id in self._loads:
            raise EngineError(f"request {request_id} is already loading")
        ref.block_ids_checked(self.cache)
        layers = list(range(self.cache.spec.num_layers) if layers is None else layers)
        load = _Load(request_id, ref, layers)
        self._loads[request_id] = load
        load.task = asyncio.create_task(self._run(load, timeout))

    async def wait_layer(self, request_id: str, layer: int) -> None:
        """Return once ``layer`` is written into the cache; raises :class:`LoadFailed` if it
        cannot be (the exception names every invalid layer and block known so far)."""
        load = self._load(request_id)
        try:
            await asyncio.shield(load.layers[layer])
        except KeyError:
            raise EngineError(f"request {request_id} does not load layer {layer}") from None
        except KvlinkError:
            await asyncio.shield(load.task)
            raise load.error from None

    async def wait_all(self, request_id: str) -> LoadReport:
        """Return the report once every layer is written; raises :class:`LoadFailed` naming the
        invalid layers and blocks (the valid ones are written and usable)."""
        load = self._load(request_id)
        await asyncio.shield(load.task)
        if load.error is not None:
            raise load.error
        return load.report

    def release(self, request_id: str) -> None:
        """Forget the request (cancels its transfer if still running)."""
        load = self._loads.pop(request_id, None)
        if load is None:
            return
        if load.task is not None and not load.task.done():
            load.task.cancel()
        if load.incoming is not None:
            if not load.incoming.complete:
                load.incoming.cancel()
            load.incoming.release()

    async def close(self) -> None:
        for request_id in list(self._loads):
            self.release(request_id)
        await self.server.close()

    def _load(self, request_id: str) -> _Load:
        load = self._loads.get(request_id)
        if load is None:
            raise EngineError(f"unknown request {request_id}")
        return load

    async def _run(self, load: _Load, timeout: float | None) -> None:
        causes: dict[int, KvlinkError] = {}
        try:
            await asyncio.wait_for(self._receive(load, causes), timeout)
        except asyncio.TimeoutError:
            causes[-1] = TransferTimeout(f"request {load.request_id}: load not complete within {timeout} s")
        except KvlinkError as exc:
            causes[-1] = exc
        load.report.finished = time.monotonic()
        if load.incoming is not None:
            load.incoming.release()  # every layer is unpacked (or failed): the landing bytes go back
        bad = sorted(layer for layer, fut in load.layers.items() if not fut.done() or fut.exception() is not None)
        if bad:
            ids, _ = load.ref.block_ids_checked(self.cache)
            bs = self.cache.block_size
            blocks = ids.tolist()[load.ref.token_start // bs: -(-load.ref.num_tokens // bs)]
            load.error = LoadFailed(load.request_id, bad, blocks, causes)
            for layer in bad:
                fut = load.layers[layer]
                if not fut.done():
                    fut.set_exception(load.error)
                    fut.exception()  # retrieved: nobody need wait for it

    async def _receive(self, load: _Load, causes: dict) -> None:
        try:
            incoming = await asyncio.wait_for(self.server.transfer(transfer_id_for(load.request_id)),
                                              self.begin_timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"request {load.request_id}: no transfer began within {self.begin_timeout} s") from None
        load.incoming = incoming
        load.report.transfer_started = time.monotonic()
        meta = incoming.meta
        if meta.get("request") != load.request_id or meta.get("layers") != list(load.layers):
            incoming.cancel()
            raise EngineError(f"request {load.request_id}: transfer carries {meta.get('request')!r} "
                              f"layers {meta.get('layers')}, expected layers {list(load.layers)}")
        await asyncio.gather(*(self._land(load, i, layer, causes) for i, layer in enumerate(load.layers)))

    async def _land(self, load: _Load, index: int, layer: int, causes: dict) -> None:
        fut = load.layers[layer]
        try:
            data = await load.incoming.part(index)
            payload = Payload.from_buffer(data)
            got = {s.layer for s in payload.segments}
            # a layer holding nothing (an MLP-only layer) arrives as a payload without segments
            if got != ({layer} if self.cache.spec.layers[layer].components else set()):
                raise EngineError(f"part {index} carries layers {sorted(got)}, expected {layer}")
            if payload.header.token_start != load.ref.token_start:  # else the tokens between stay stale
                raise EngineError(f"part {index} starts at token {payload.header.token_start}, "
                                  f"expected {load.ref.token_start}")
            # A part the transport verified against the payload's own checksums is not hashed again.
            await asyncio.to_thread(self.unpacker.unpack, payload, load.ref,
                                    not load.incoming.verified_whole(index))
        except KvlinkError as exc:
            causes[layer] = exc
            fut.set_exception(exc)
            fut.exception()
            return
        load.report.bytes += len(data)
        load.report.layer_bytes[layer] = len(data)
        load.report.layer_done[layer] = time.monotonic()
        fut.set_result(None)


class SyncDecodeSide:
    """:class:`DecodeSide` for synchronous engines: its event loop runs in a background thread,
    and each method blocks until the asyncio one returns (``start_load`` returns at once)."""

    def __init__(self, *args, host: str = "127.0.0.1", port: int = 0, **kwargs):
        """As :class:`DecodeSide`, listening on ``host:port``; raises what its constructor and
        :meth:`~DecodeSide.start` raise, and then leaves no thread, loop or socket behind."""
        import threading

        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlink-decode", daemon=True)
        self._thread.start()

        async def make() -> tuple[DecodeSide, tuple[str, int]]:
            side = DecodeSide(*args, **kwargs)
            try:
                return side, await side.start(host, port)
            except BaseException:
                await side.close()
                raise

        try:
            self.side, self.address = self._run(make())
        except BaseException:
            stop_loop(self._loop, self._thread)
            raise

    def _run(self, coro, timeout: float | None = None):
        return run_sync(coro, self._loop, timeout)

    def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        return self._run(self.side.lookup(tokens))

    def load_from_pool(self, hit: PrefixHit, ref: CacheRef) -> int:
        return self._run(self.side.load_from_pool(hit, ref))

    def store(self, tokens: Sequence[int], ref: CacheRef, first_block: int = 0) -> StoreReport:
        return self._run(self.side.store(tokens, ref, first_block))

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        return self.side.checkpoint_positions(end, start)

    def store_state(self, tokens: Sequence[int], ref: CacheRef) -> StoreReport:
        return self._run(self.side.store_state(tokens, ref))

    def start_load(self, request_id: str, ref: CacheRef, layers: list[int] | None = None,
                   timeout: float | None = None) -> None:
        async def start() -> None:
            self.side.start_load(request_id, ref, layers, timeout)

        self._run(start())

    def wait_layer(self, request_id: str, layer: int, timeout: float | None = None) -> None:
        """As :meth:`DecodeSide.wait_layer`; :class:`~kvlink.errors.TransferTimeout` when
        ``timeout`` passes first (the load goes on: wait again or release it)."""
        self._run(self.side.wait_layer(request_id, layer), timeout)

    def wait_all(self, request_id: str, timeout: float | None = None) -> LoadReport:
        """As :meth:`DecodeSide.wait_all`; :class:`~kvlink.errors.TransferTimeout` as :meth:`wait_layer`."""
        return self._run(self.side.wait_all(request_id), timeout)

    def release(self, request_id: str) -> None:
        self._loop.call_soon_threadsafe(self.side.release, request_id)

    def close(self) -> None:
        try:
            self._run(self.side.close())
        finally:
            stop_loop(self._loop, self._thread)
