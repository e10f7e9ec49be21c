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
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient


class PoolClient:
    """One engine's handle on a daemon's pool for ``model`` (and ``namespace``).

    Methods raise :class:`~kvlink.errors.PoolError` for refused requests and the transport's
    errors (:class:`~kvlink.errors.PeerUnreachable`, ...) when the daemon cannot be reached.
    """

    def __init__(self, model: str, namespace: str = "", host: str = "127.0.0.1", http_port: int = 7480,
                 data_port: int = 7481, secret: bytes | None = None, transport: TransportConfig | None = None,
                 reply_host: str = "127.0.0.1", timeout: float = 60.0):
        self.model, self.namespace = model, namespace
        self.host, self.http_port, self.data_port = host, http_port, data_port
        self.secret = secret
        self.transport = transport or TransportConfig()
        self.reply_host = reply_host
        self.timeout = timeout
        self.fingerprint = get_preset(model).fingerprint
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "little") << 16 | 1)
        self._http: aiohttp.ClientSession | None = None
        self._replies: TransferServer | None = None
        self._sender: TransferClient | None = None
        self.reply_port = 0

    async def connect(self) -> "PoolClient":
        self._http = aiohttp.ClientSession(base_url=f"http://{self.host}:{self.http_port}",
                                           timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._replies = TransferServer(self.transport, [self.fingerprint], secret=self.secret)
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
    async def _call(self, meta: dict, parts: list) -> tuple[dict, list[memoryview]]:
        reply_id = next(self._ids)
        waiter = asyncio.ensure_future(self._replies.transfer(reply_id))
        meta = {**meta, "model": self.model, "namespace": self.namespace, "reply_port": self.reply_port,
                "reply_id": reply_id}
        try:
            await self._sender.send(parts or [b""], meta=meta)
            incoming = await asyncio.wait_for(waiter, self.timeout)
            got = [bytes(p) for p in await asyncio.wait_for(incoming.done(), self.timeout)]
            incoming.release()
        finally:
            waiter.cancel()
        if "error" in incoming.meta:
            raise PoolError(f"daemon: {incoming.meta['message']}")
        return incoming.meta, got

    async def put(self, tokens: list[int], pieces: dict[tuple[str, int], object]) -> int:
        """Store ``{(kind, block): bytes}`` of a prompt; returns how many entries were new."""
        names = [[kind, block] for kind, block in pieces]
        meta, _ = await self._call({"op": "put", "tokens": list(tokens), "pieces": names}, list(pieces.values()))
        return meta["stored"]

    async def get(self, hit: PrefixHit) -> dict[tuple[str, bytes], bytes]:
        """Bytes of every entry of ``hit`` (verified by the daemon's tiers and by the transport).
        Raises :class:`PoolError` when some entry is gone (look up again)."""
        keys = proto.hit_keys(hit)
        meta, parts = await self._call({"op": "get", "keys": [[k, key.hex()] for k, key in keys]}, [])
        if meta["missing"]:
            raise PoolError(f"{len(meta['missing'])} of {len(keys)} entries are no longer in the pool")
        return dict(zip(keys, parts))


class SyncPoolClient:
    """:class:`PoolClient` for synchronous code: an event loop runs in a background thread."""

    def __init__(self, *args, **kwargs):
        self._loop = asyncio.new_event_loop()
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
