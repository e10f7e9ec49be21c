"""Clients of ``kvlink pool serve``: :class:`PoolClient` (asyncio) and :class:`SyncPoolClient`.

Control calls go over HTTP; ``put`` and ``get`` move bytes over kvlink transfers. Each client
also listens on an ephemeral loopback port for the daemon's replies (bind ``reply_host`` to a
routable address when the daemon is on another machine).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading

import aiohttp

from kvlink.config import TransportConfig
from kvlink.daemon import protocol as proto
from kvlink.errors import PoolError
from kvlink.pool.index import PrefixHit
from kvlink.presets import get_preset
from kvlink.serde.payload import PayloadScan, is_payload, payload_intact
from kvlink.serde.staging import StagingArena
from kvlink.transport.incoming import arena_allocator
from kvlink.transport.loop import new_event_loop
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient


class PoolClient:
    """One engine's handle on a daemon's pool for ``model`` (and ``namespace``).

    Methods raise :class:`~kvlink.errors.PoolError` for refused requests and the transport's
    errors (:class:`~kvlink.errors.PeerUnreachable`, ...) when the daemon cannot be reached.
    """

    def __init__(self, model: str, namespace: str = "", host: str = "127.0.0.1", http_port: int = 7480,
                 data_port: int = 7481, secret: bytes | None = None, transport: TransportConfig | None = None,
                 reply_host: str = "127.0.0.1", timeout: float = 60.0, reply_arena: int = 256 << 20):
        self.model, self.namespace = model, namespace
        self.host, self.http_port, self.data_port = host, http_port, data_port
        self.secret = secret
        self.transport = transport or TransportConfig()
        self.reply_host = reply_host
        self.timeout = timeout
        self.reply_arena = reply_arena
        self.fingerprint = get_preset(model).fingerprint
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "little") << 16 | 1)
        self._http: aiohttp.ClientSession | None = None
        self._replies: TransferServer | None = None
        self._sender: TransferClient | None = None
        self.reply_port = 0

    async def connect(self) -> "PoolClient":
        self._http = aiohttp.ClientSession(base_url=f"http://{self.host}:{self.http_port}",
                                           timeout=aiohttp.ClientTimeout(total=self.timeout))
        # Replies land in a preallocated arena (bounds one get's size), copied out per part.
        # Entries are kvlink payloads: replies are verified against their own checksums on arrival.
        self._replies = TransferServer(self.transport, [self.fingerprint], secret=self.secret,
                                       allocator=arena_allocator(StagingArena(self.reply_arena)),
                                       part_verifier=payload_intact, part_scanner=PayloadScan)
        _, self.reply_port = await self._replies.start(self.reply_host, 0)
        self._sender = TransferClient(self.host, self.data_port, self.fingerprint, self.transport, secret=self.secret)
        await self._sender.connect()
        return self

    async def close(self) -> None:
        if self._sender is not None:
            await self._sender.close()
        if self._replies is not None:
            await self._replies.close()
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> "PoolClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- control ----------------------------------------------------------------------------------
    async def _post(self, path: str, body: dict) -> dict:
        async with self._http.post(path, json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise PoolError(f"{path}: {data.get('message', data)}")
            return data

    async def lookup(self, tokens: list[int]) -> PrefixHit:
        data = await self._post("/lookup", {"model": self.model, "namespace": self.namespace, "tokens": list(tokens)})
        return proto.hit_from_json(data)

    async def evict(self, nbytes: int) -> int:
        data = await self._post("/evict", {"model": self.model, "namespace": self.namespace, "bytes": nbytes})
        return data["freed"]

    async def stats(self) -> dict:
        async with self._http.get("/stats") as resp:
            return await resp.json()

    async def health(self) -> dict:
        async with self._http.get("/health") as resp:
            return await resp.json()

    # -- data -------------------------------------------------------------------------------------
    async def _call(self, meta: dict, parts: list, verifiable: bool = False):
        """Send a request transfer, wait for the daemon's reply transfer; returns it (release it)."""
        reply_id = next(self._ids)
        waiter = asyncio.ensure_future(self._replies.transfer(reply_id))
        meta = {**meta, "model": self.model, "namespace": self.namespace, "reply_port": self.reply_port,
                "reply_id": reply_id}
        try:
            await self._sender.send(parts or [b""], meta=meta, verifiable=verifiable)
            incoming = await asyncio.wait_for(waiter, self.timeout)
            await asyncio.wait_for(incoming.done(), self.timeout)
        finally:
            waiter.cancel()
        if "error" in incoming.meta:
            incoming.release()
            raise PoolError(f"daemon: {incoming.meta['message']}")
        return incoming

    async def put(self, tokens: list[int], pieces: dict[tuple[str, int], object]) -> int:
        """Store ``{(kind, block): bytes}`` of a prompt; returns how many entries were new."""
        names = [[kind, block] for kind, block in pieces]
        # Pieces that are kvlink payloads (what engines store) are checked by the daemon against
        # their own checksums, so they go without per-chunk hashes; other bytes are hashed per chunk.
        values = list(pieces.values())
        reply = await self._call({"op": "put", "tokens": list(tokens), "pieces": names}, values,
                                 verifiable=all(is_payload(v) for v in values))
        reply.release()
        return reply.meta["stored"]

    async def get(self, hit: PrefixHit) -> "Fetched":
        """Every entry of ``hit``, ``{(kind, key): memoryview}``, verified by the transport. The
        views point into the client's landing arena: ``release()`` the result (or use it as a
        context manager) once unpacked. Raises :class:`PoolError` when some entry is gone."""
        keys = proto.hit_keys(hit)
        reply = await self._call({"op": "get", "keys": [[k, key.hex()] for k, key in keys]}, [])
        if reply.meta["missing"]:
            reply.release()
            raise PoolError(f"{len(reply.meta['missing'])} of {len(keys)} entries are no longer in the pool")
        return Fetched(zip(keys, reply.buffers()), reply.release)


class Fetched(dict):
    """Entries fetched from the daemon, viewing its reply's landing buffers until released."""

    def __init__(self, items, release):
        super().__init__(items)
        self._release = release

    def release(self) -> None:
        self.clear()
        self._release()

    def __enter__(self) -> "Fetched":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SyncPoolClient:
    """:class:`PoolClient` for synchronous code: an event loop runs in a background thread."""

    def __init__(self, *args, **kwargs):
        self._loop = new_event_loop()  # uvloop's when installed, as the engine's sync wrappers
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlink-pool-client", daemon=True)
        self._thread.start()
        self._client = PoolClient(*args, **kwargs)
        self._run(self._client.connect())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def lookup(self, tokens):
        return self._run(self._client.lookup(tokens))

    def put(self, tokens, pieces):
        return self._run(self._client.put(tokens, pieces))

    def get(self, hit):
        return self._run(self._client.get(hit))

    def evict(self, nbytes):
        return self._run(self._client.evict(nbytes))

    def stats(self):
        return self._run(self._client.stats())

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
