"""``kvlink pool serve``: pools as a process, shared by several engines.

HTTP control API on aiohttp, data over kvlink's transport (see :mod:`kvlink.daemon.protocol`).
Pool work (copies, SSD I/O) runs in a thread so the event loop keeps serving. A bad request
gets a 400 (HTTP) or a failed reply transfer, and leaves every pool untouched.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from pathlib import Path

from aiohttp import web

from kvlink.config import DaemonConfig, TransportConfig
from kvlink.daemon import protocol as proto
from kvlink.errors import KvlinkError
from kvlink.pool.pool import Pool
from kvlink.pool.slab import Landing
from kvlink.presets import get_preset
from kvlink.serde.payload import PayloadScan, is_payload, payload_intact
from kvlink.serde.staging import StagingArena
from kvlink.transport.incoming import arena_allocator
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient

log = logging.getLogger("kvlink.daemon")


class PoolDaemon:
    def __init__(self, config: DaemonConfig, secret: bytes | None = None,
                 transport: TransportConfig | None = None):
        self.config = config
        self.secret = secret
        self.transport = transport or TransportConfig()
        self.specs = {name: get_preset(name) for name in config.models}
        self._pools: dict[str, Pool] = {}
        self._repliers: collections.OrderedDict[tuple, TransferClient] = collections.OrderedDict()
        # Puts land in a preallocated, pre-faulted arena: fresh memory would cost a page fault
        # per 4 KiB on the hot path.
        self._arena = StagingArena(config.receive_arena)
        self._server = TransferServer(self.transport, [s.fingerprint for s in self.specs.values()], secret=secret,
                                      allocator=arena_allocator(self._arena), allocator_for=self._put_allocator,
                                      part_verifier=payload_intact, part_scanner=PayloadScan)
        self._landings: dict[int, dict[int, Landing]] = {}  # put transfer id -> {id(view): landing}
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._acceptor: asyncio.Task | None = None
        self.http_port = self.data_port = 0

    # -- pools ------------------------------------------------------------------------------------
    def pool(self, model: str, namespace: str = "") -> Pool:
        if model not in self.specs:
            raise KvlinkError(f"model {model!r} is not served here (serving {sorted(self.specs)})")
        name = proto.pool_name(model, namespace)
        pool = self._pools.get(name)
        if pool is None:
            if len(self._pools) >= self.config.max_pools:
                raise KvlinkError(f"at most {self.config.max_pools} pools per daemon")
            cfg = self.config.pool
            if self.config.root is not None:
                ssd = Path(self.config.root) / model / (namespace or "_")
                cfg = type(cfg)(**{**cfg.__dict__, "ssd_dir": str(ssd), "namespace": namespace})
            else:
                cfg = type(cfg)(**{**cfg.__dict__, "namespace": namespace})
            pool = self._pools[name] = Pool(self.specs[model], cfg)
        return pool

    def _put_allocator(self, incoming):
        """A put's parts land straight in free pages of its pool's memory tier, so storing them
        is bookkeeping, not a copy; the arena takes what does not fit (and every other transfer)."""
        meta = incoming.meta
        if not isinstance(meta, dict) or meta.get("op") != "put":
            return None
        try:
            pool = self.pool(proto.field(meta, "model", str), proto.field(meta, "namespace", str, ""))
        except KvlinkError:
            return None  # reported when the put is served
        arena = self._server.allocator
        landings = self._landings[incoming.transfer_id] = {}

        def allocate(nbytes: int):
            landing = pool.landing(nbytes) if nbytes else None
            if landing is None:
                return arena(nbytes)
            landings[id(landing.view)] = landing
            return landing.view, landing.release

        return allocate

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> tuple[int, int]:
        app = web.Application(client_max_size=64 << 20)
        app.add_routes([web.get("/health", self._health), web.get("/stats", self._stats),
                        web.get("/metrics", self._metrics), web.post("/lookup", self._lookup),
                        web.post("/evict", self._evict)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        _, self.data_port = await self._server.start(self.config.host, self.config.data_port)
        self._acceptor = asyncio.create_task(self._accept())
        return self.http_port, self.data_port

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._repliers.values():
            await client.close()
        await self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for pool in self._pools.values():
            await asyncio.to_thread(pool.close)

    # -- HTTP -------------------------------------------------------------------------------------
    @staticmethod
    def _bad(exc: Exception) -> web.Response:
        return web.json_response({"error": type(exc).__name__, "message": str(exc)}, status=400)

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise KvlinkError("body is not JSON") from None
        if not isinstance(body, dict):
            raise KvlinkError("body must be a JSON object")
        return body

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "pools": len(self._pools), "models": sorted(self.specs)})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"pools": {n: p.summary() for n, p in self._pools.items()}})

    async def _metrics(self, request: web.Request) -> web.Response:
        text = proto.prometheus({n: p.summary() for n, p in self._pools.items()})
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _lookup(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            pool = self.pool(proto.field(body, "model", str), proto.field(body, "namespace", str, ""))
            hit = pool.lookup(proto.tokens_of(body))
        except KvlinkError as exc:
            return self._bad(exc)
        return web.json_response(proto.hit_to_json(hit))

    async def _evict(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            pool = self.pool(proto.field(body, "model", str), proto.field(body, "namespace", str, ""))
            freed = await asyncio.to_thread(pool.evict, proto.field(body, "bytes", int))
        except KvlinkError as exc:
            return self._bad(exc)
        return web.json_response({"freed": freed})

    # -- data path --------------------------------------------------------------------------------
    async def _accept(self) -> None:
        while True:
            incoming = await self._server.accept()
            task = asyncio.create_task(self._serve(incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, incoming) -> None:
        meta = incoming.meta
        reply_port, reply_id = meta.get("reply_port"), meta.get("reply_id")
        release = None
        landings = self._landings.pop(incoming.transfer_id, {})
        try:
            parts = await incoming.done()
            model = proto.field(meta, "model", str)
            pool = self.pool(model, proto.field(meta, "namespace", str, ""))
            op = meta.get("op")
            if op == "put":
                tokens = proto.tokens_of(meta)
                names = proto.field(meta, "pieces", list)
                if len(names) != len(parts) or not all(
                        isinstance(n, list) and len(n) == 2 and n[0] in proto.KINDS and isinstance(n[1], int)
                        for n in names):
                    raise KvlinkError("pieces must be [kind, block] pairs, one per part")
                pieces = {(kind, block): _landed(landings, part) for (kind, block), part in zip(names, parts)}
                stored = await asyncio.to_thread(pool.store, tokens, pieces)
                reply, out = {"stored": stored}, [b""]
            elif op == "get":
                keys = proto.keys_of(meta)
                # Sent straight from the tier's pages, pinned until the reply is delivered.
                found, release = await asyncio.to_thread(pool.pin_views, keys)
                reply = {"missing": [i for i, v in enumerate(found) if v is None]}
                out = [b"" if v is None else v for v in found] or [b""]
            else:
                raise KvlinkError(f"unknown op {op!r}")
        except KvlinkError as exc:
            reply, out = {"error": type(exc).__name__, "message": str(exc)}, [b""]
            model = meta.get("model") if meta.get("model") in self.specs else next(iter(self.specs))
        finally:
            incoming.release()
        try:
            if isinstance(reply_port, int) and isinstance(reply_id, int) and incoming.peer:
                await self._reply(incoming.peer[0], reply_port, reply_id, self.specs[model].fingerprint, reply, out)
        finally:
            if release is not None:
                release()

    async def _reply(self, host: str, port: int, tid: int, fingerprint: bytes, meta: dict, parts: list) -> None:
        key = (host, port, fingerprint)
        client = self._repliers.get(key)
        try:
            if client is None:
                client = TransferClient(host, port, fingerprint, self.transport, secret=self.secret)
                await client.connect()
                self._repliers[key] = client
                while len(self._repliers) > 64:
                    await self._repliers.popitem(last=False)[1].close()
            verifiable = all(p == b"" or is_payload(p) for p in parts)  # b"": an absent entry
            await client.send(parts, meta=meta, transfer_id=tid, verifiable=verifiable)
        except KvlinkError as exc:
            log.warning("reply to %s:%s failed: %s", host, port, exc)
            self._repliers.pop(key, None)


def _landed(landings: dict[int, Landing], part: memoryview):
    landing = landings.get(id(part))
    return landing if landing is not None and landing.view is part else part


async def serve_forever(config: DaemonConfig, secret: bytes | None) -> None:
    daemon = PoolDaemon(config, secret)
    http_port, data_port = await daemon.start()
    print(json.dumps({"event": "listening", "host": config.host, "http_port": http_port, "data_port": data_port}),
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await daemon.close()
