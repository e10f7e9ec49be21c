"""Clients of ``kvlink pool serve``: :class:`PoolClient` (asyncio) and :class:`SyncPoolClient`.

Control calls go over HTTP; ``put`` and ``get`` move bytes over kvlink transfers. Each client
also listens on an ephemeral port for the daemon's replies, on its own address on the route to the
daemon (loopback for a loopback daemon; ``reply_host`` overrides). With TLS (``ssl`` + ``reply_ssl``)
HTTP, data and reply connections are all encrypted and the peers' certificates verified.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl as _ssl
import threading

import aiohttp

from kvlink.config import TransportConfig
from kvlink.daemon import protocol as proto
from kvlink.daemon.auth import DEFAULT_TENANT
from kvlink.errors import (AccessDenied, AuthenticationError, ConfigError, EntryMissing, HandshakeError,
                           KvlinkError, PeerUnreachable, PoolError, ResourceLimit, TierUnavailable,
                           TransferTimeout)
from kvlink.pool.index import PrefixHit, checkpoint_positions
from kvlink.pool.pool import StoreReport
from kvlink.presets import get_preset
from kvlink.spec import CacheSpec
from kvlink.serde.payload import PayloadScan, is_payload, payload_intact
from kvlink.serde.staging import StagingArena
from kvlink.transport.parts import arena_allocator
from kvlink.transport.loop import new_event_loop, run_sync, stop_loop
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient


_REPLY_ERRORS = {"AccessDenied": AccessDenied, "ResourceLimit": ResourceLimit, "EntryMissing": EntryMissing,
                 "TierUnavailable": TierUnavailable}


def route_address(host: str) -> str:
    """This host's address on the route to ``host`` (no packet is sent); loopback when unknown."""
    try:
        info = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(info[0], socket.SOCK_DGRAM) as probe:
            probe.connect(info[4])
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class PoolClient:
    """One engine's handle on a daemon's pool for ``model``, as ``tenant`` holding ``secret``.

    The tenant is whoever's secret this is: the daemon derives the pool (model, tenant) from the
    credential, never from a name sent. ``tenant`` names the secret to the data connection's
    handshake (its key id); ``secret=None`` talks to a daemon without secrets (tenant
    ``default``). Every failure is a :class:`~kvlink.errors.KvlinkError`:
    :class:`~kvlink.errors.AccessDenied` (wrong or missing credential),
    :class:`~kvlink.errors.PeerUnreachable` (cannot connect), :class:`~kvlink.errors.TransferTimeout`
    (no answer within ``timeout``), :class:`~kvlink.errors.ResourceLimit` (a daemon limit),
    :class:`~kvlink.errors.EntryMissing` (evicted since the lookup), other
    :class:`~kvlink.errors.PoolError` for refused requests, and the transport's errors
    (:class:`~kvlink.errors.TransportError`) for failed transfers;
    :class:`~kvlink.errors.HandshakeError` when TLS fails (e.g. the daemon's certificate is not
    signed by a CA ``ssl`` trusts, or not valid for ``host``).

    ``model`` is a preset the daemon serves, or a layout it loaded from a spec file (``kvlink pool
    serve --spec NAME=FILE``): then pass that ``spec`` too (its fingerprint guards the data path).
    ``lookup_only`` opens HTTP only (lookups, settings; an engine's scheduler), and its data calls
    raise :class:`~kvlink.errors.ConfigError`.

    TLS (a daemon with ``tls_cert``): ``ssl`` is a client context that verifies the daemon
    (``tls.client_context(ca)``), used for HTTP and data connections; ``reply_ssl`` is a server
    context for the reply listener (``tls.server_context(cert, key)``, a certificate valid for
    ``reply_host``, signed by the CA the daemon trusts). Both or neither: :class:`ConfigError`.
    """

    def __init__(self, model: str, host: str = "127.0.0.1", http_port: int = 7480, data_port: int = 7481,
                 secret: bytes | None = None, tenant: str = DEFAULT_TENANT, transport: TransportConfig | None = None,
                 reply_host: str | None = None, timeout: float = 60.0, reply_arena: int = 256 << 20,
                 ssl: _ssl.SSLContext | None = None, reply_ssl: _ssl.SSLContext | None = None,
                 spec: CacheSpec | None = None, lookup_only: bool = False):
        self.model, self.tenant = model, tenant
        if (ssl is None) != (reply_ssl is None):
            raise ConfigError("ssl and reply_ssl go together: a TLS daemon replies over TLS to the reply listener")
        self.ssl, self.reply_ssl = ssl, reply_ssl
        self.host, self.http_port, self.data_port = host, http_port, data_port
        if secret is not None and (not secret.isascii() or not secret.strip() or b" " in secret):
            raise ConfigError("a tenant secret is printable ASCII without spaces (it travels in an HTTP header)")
        self.secret = secret
        self.transport = transport or TransportConfig()
        # The daemon connects back to the address it sees us at: listen there (loopback for a
        # loopback daemon), not on loopback for a daemon on another host.
        self.reply_host = reply_host or route_address(host)
        self.timeout = timeout
        self.reply_arena = reply_arena
        # The layout the daemon serves as ``model``: a preset's, or ``spec`` (a layout the daemon
        # loaded from a spec file). A lookup-only client (an engine's scheduler) opens no data path.
        self.lookup_only = lookup_only
        self.fingerprint = None if lookup_only else (spec or get_preset(model)).fingerprint
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "little") << 16 | 1)
        self._http: aiohttp.ClientSession | None = None
        self._replies: TransferServer | None = None
        self._sender: TransferClient | None = None
        self._pool_settings: dict | None = None  # the daemon's block_size and checkpoint_every (/health)
        self.reply_port = 0

    @property
    def block_size(self) -> int | None:
        """The daemon pool's block size in tokens (read from ``/health`` at :meth:`connect`)."""
        return (self._pool_settings or {}).get("block_size")

    async def connect(self) -> "PoolClient":
        """Open the HTTP session, the reply listener and the data connections. On failure
        everything opened is closed again; raises :class:`~kvlink.errors.AccessDenied`
        (credential refused), :class:`~kvlink.errors.PeerUnreachable` or another
        :class:`~kvlink.errors.TransportError`."""
        headers = {"Authorization": f"Bearer {self.secret.decode()}"} if self.secret else {}
        try:
            scheme = "https" if self.ssl is not None else "http"
            self._http = aiohttp.ClientSession(base_url=f"{scheme}://{self.host}:{self.http_port}", headers=headers,
                                               timeout=aiohttp.ClientTimeout(total=self.timeout),
                                               connector=aiohttp.TCPConnector(ssl=self.ssl or True))
            if self.lookup_only:  # HTTP only: no reply listener, no data connection
                await self._read_pool_settings()
                return self
            # Replies land in a preallocated arena (bounds one get's size), copied out per part.
            # Entries are kvlink payloads: replies are verified against their own checksums on arrival.
            self._replies = TransferServer(self.transport, [self.fingerprint], secret=self.secret,
                                           allocator=_empty_free(arena_allocator(StagingArena(self.reply_arena))),
                                           part_verifier=payload_intact, part_scanner=PayloadScan,
                                           accept_queue=False, ssl=self.reply_ssl)
            _, self.reply_port = await self._replies.start(self.reply_host, 0)
            self._sender = TransferClient(self.host, self.data_port, self.fingerprint, self.transport,
                                          secret=self.secret, key_id=self.tenant if self.secret else None,
                                          ssl=self.ssl)
            await self._sender.connect()
            await self._read_pool_settings()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, AuthenticationError):
                raise AccessDenied(f"the daemon refused tenant {self.tenant!r}'s credential: {exc}") from exc
            if isinstance(exc, OSError):
                raise PeerUnreachable(f"cannot listen for replies on {self.reply_host}: {exc}") from exc
            raise
        return self

    async def _read_pool_settings(self) -> None:
        """Once, at connect: the daemon's pool settings, for :meth:`checkpoint_positions`. Best
        effort: connect does not depend on the HTTP side, so a failure is kept as the reason."""
        try:
            health = await self.health()
            self._pool_settings = {k: health.get(k) for k in ("block_size", "checkpoint_every")}
        except KvlinkError as exc:
            self._pool_settings = {"error": f"GET /health failed at connect: {exc}"}

    async def close(self) -> None:
        """Close everything this client opened (safe to call twice, or after a failed connect)."""
        sender, replies, http = self._sender, self._replies, self._http
        self._sender = self._replies = self._http = None
        try:
            if sender is not None:
                await sender.close()
        finally:
            try:
                if replies is not None:
                    await replies.close()
            finally:
                if http is not None:
                    await http.close()

    async def __aenter__(self) -> "PoolClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- control ----------------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise PoolError("the client is not connected (use connect() or async with)")
        return self._http

    async def _request(self, method: str, path: str, body: dict | None = None, data: bytes | None = None,
                       params: dict | None = None) -> dict:
        """One HTTP call; every failure becomes a typed KvlinkError (see the class docstring)."""
        headers = {"Content-Type": "application/octet-stream"} if data is not None else None
        try:
            async with self._session().request(method, path, json=body, data=data, params=params,
                                               headers=headers) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status == 200 and isinstance(data, dict):
                    return data
                message = data.get("message", data) if isinstance(data, dict) else f"HTTP {resp.status}"
        except asyncio.TimeoutError:
            raise TransferTimeout(f"{path}: no answer from the daemon within {self.timeout} s") from None
        except aiohttp.ClientSSLError as exc:  # an unverifiable certificate: retrying cannot help
            raise HandshakeError(f"{path}: TLS with daemon {self.host}:{self.http_port} failed: {exc}") from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise PeerUnreachable(f"{path}: daemon {self.host}:{self.http_port}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise PoolError(f"{path}: {exc}") from None
        kind = {401: AccessDenied, 403: AccessDenied, 429: ResourceLimit}.get(resp.status, PoolError)
        raise kind(f"{path}: {message}")

    async def lookup(self, tokens: list[int]) -> PrefixHit:
        """The longest prefix of ``tokens`` this tenant's pool can restore."""
        # Binary ids: a long prompt costs the daemon no JSON parsing (and this loop no conversion).
        data = proto.encode_tokens(tokens) if len(tokens) < 1 << 16 else await asyncio.to_thread(
            proto.encode_tokens, tokens)
        return proto.hit_from_json(await self._request("POST", "/lookup", data=data, params={"model": self.model}))

    async def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of this tenant's pool (as far as it holds); returns bytes freed."""
        return (await self._request("POST", "/evict", {"model": self.model, "bytes": nbytes}))["freed"]

    async def stats(self) -> dict:
        """This tenant's pools' summaries (every tenant's with the admin credential)."""
        return await self._request("GET", "/stats")

    async def health(self) -> dict:
        return await self._request("GET", "/health")

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        """Token positions in ``(start, end]`` where the daemon's pool wants a state checkpoint:
        every ``checkpoint_every`` blocks and the last block boundary, from the daemon's pool
        settings (read once at :meth:`connect`), as a local ``Pool.checkpoint_positions``.
        Raises :class:`~kvlink.errors.PoolError` before connect or when the daemon did not
        report valid settings."""
        settings = self._pool_settings
        if settings is None:
            raise PoolError("the client is not connected (use connect() or async with)")
        if "error" in settings:
            raise PoolError(f"the daemon's pool settings are unknown ({settings['error']}); reconnect")
        bs, every = settings["block_size"], settings["checkpoint_every"]
        if type(bs) is not int or bs <= 0 or not (every is None or (type(every) is int and every > 0)):
            raise PoolError(f"the daemon reported no valid pool settings (block_size {bs!r}, "
                            f"checkpoint_every {every!r})")
        return checkpoint_positions(bs, every, end, start)

    # -- data -------------------------------------------------------------------------------------
    async def _call(self, meta: dict, parts: list, verifiable: bool = False):
        """Send a request transfer, wait for the daemon's reply transfer; returns it (release it)."""
        if self.lookup_only:
            raise ConfigError("a lookup-only PoolClient carries no data (give spec= for the model's layout)")
        if self._sender is None or self._replies is None:
            raise PoolError("the client is not connected (use connect() or async with)")
        reply_id = next(self._ids)
        waiter = asyncio.ensure_future(self._replies.transfer(reply_id))
        meta = {**meta, "model": self.model, "reply_port": self.reply_port, "reply_id": reply_id}
        incoming = None
        try:
            await self._sender.send(parts, meta=meta, verifiable=verifiable)
            incoming = await asyncio.wait_for(waiter, self.timeout)
            await asyncio.wait_for(incoming.done(), self.timeout)
        except BaseException as exc:
            if incoming is not None:
                incoming.release()
            if isinstance(exc, asyncio.TimeoutError):
                raise TransferTimeout(f"no reply from the daemon within {self.timeout} s") from None
            if isinstance(exc, (OSError, aiohttp.ClientError)):
                raise PeerUnreachable(f"daemon {self.host}:{self.data_port}: {exc}") from None
            raise
        finally:
            waiter.cancel()
        if "error" in incoming.meta:
            incoming.release()
            kind = _REPLY_ERRORS.get(incoming.meta.get("error"), PoolError)
            raise kind(f"daemon: {incoming.meta.get('message')}")
        return incoming

    async def put(self, tokens: list[int], pieces: dict[tuple[str, int], object]) -> StoreReport:
        """Store ``{(kind, block): bytes}`` of a prompt; returns what the daemon stored (new
        entries held now, how many on SSD, how many failed and why)."""
        names = list(pieces)
        values = list(pieces.values())
        # Pieces that are kvlink payloads (what engines store) are checked by the daemon against
        # their own checksums (and part 0, the request, against its trailer), so they go without
        # per-chunk hashes; other bytes are hashed per chunk.
        reply = await self._call({"op": "put"}, [proto.encode_put(tokens, names), *values],
                                 verifiable=bool(values) and all(is_payload(v) for v in values))
        reply.release()
        return store_report(reply.meta)

    async def get(self, hit: PrefixHit) -> "Fetched":
        """Every entry of ``hit``, ``{(kind, key): memoryview}``, verified by the transport. The
        views point into the client's landing arena: ``release()`` the result (or use it as a
        context manager) once unpacked. Raises :class:`~kvlink.errors.EntryMissing` when some
        entry is gone (evicted since the lookup)."""
        return await self.get_keys(hit.keys())

    async def get_keys(self, keys: list[tuple[str, bytes]], allow_missing: bool = False) -> "Fetched":
        """Entries by ``(kind, key)`` (as :meth:`get`). With ``allow_missing`` the absent ones are
        left out and listed in ``Fetched.missing`` instead of raising
        :class:`~kvlink.errors.EntryMissing`."""
        reply = await self._call({"op": "get"}, [proto.encode_get(keys)])
        buffers = list(reply.buffers())
        # The daemon sends an absent entry as an empty part (entries are never empty).
        buffers += [memoryview(b"")] * max(0, len(keys) - len(buffers))
        missing = [k for k, buf in zip(keys, buffers) if len(buf) == 0]
        if missing and not allow_missing:
            reply.release()
            raise EntryMissing(f"{len(missing)} of {len(keys)} entries are no longer in the pool")
        fetched = Fetched(((k, b) for k, b in zip(keys, buffers) if len(b)), reply.release)
        fetched.missing = missing
        return fetched


def store_report(meta: dict) -> StoreReport:
    """A put reply's meta as a :class:`StoreReport`; raises :class:`~kvlink.errors.PoolError` for a
    malformed one (a reply is the daemon's word, but a bug or another program must not surface as
    a bare ValueError)."""
    try:
        errors = meta.get("errors", [])
        if not isinstance(errors, list):
            raise TypeError("errors is not a list")
        counts = [meta.get(name, 0) for name in ("stored", "on_ssd", "failed")]
        if not all(type(c) is int and c >= 0 for c in counts):
            raise TypeError(f"counts {counts} are not non-negative integers")
        return StoreReport(*counts, [str(e) for e in errors])
    except (AttributeError, TypeError) as exc:
        raise PoolError(f"malformed put reply from the daemon: {exc}") from None


def _empty_free(allocate):
    """``allocate``, except that an empty part (an absent entry) takes no arena space."""

    def allocator(nbytes: int):
        return (memoryview(bytearray(0)), None) if nbytes == 0 else allocate(nbytes)

    return allocator


class Fetched(dict):
    """Entries fetched from the daemon, viewing its reply's landing buffers until released."""

    def __init__(self, items, release):
        super().__init__(items)
        self._release = release
        self.missing: list[tuple[str, bytes]] = []

    def release(self) -> None:
        self.clear()
        self._release()

    def __enter__(self) -> "Fetched":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class SyncPoolClient:
    """:class:`PoolClient` for synchronous code: an event loop runs in a background thread. Methods
    raise what :class:`PoolClient`'s do (typed :class:`~kvlink.errors.KvlinkError` all)."""

    def __init__(self, *args, **kwargs):
        """As :class:`PoolClient`, connected; raises what its ``connect`` raises (and then leaves
        no thread or loop behind)."""
        self._client = PoolClient(*args, **kwargs)
        self._loop = new_event_loop()  # uvloop's when installed, as the engine's sync wrappers
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlink-pool-client", daemon=True)
        self._thread.start()
        try:
            self._run(self._client.connect())
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        stop_loop(self._loop, self._thread, 5)

    def _run(self, coro):
        if self._loop.is_closed():
            coro.close()
            raise PoolError("the client is closed")
        # Every call is bounded by the client's own timeouts (HTTP, the reply, its arrival); this
        # outer bound only keeps a stuck loop from hanging the caller forever (TransferTimeout).
        return run_sync(coro, self._loop, 3 * self._client.timeout + 5)

    def lookup(self, tokens: list[int]) -> PrefixHit:
        return self._run(self._client.lookup(tokens))

    def put(self, tokens: list[int], pieces: dict[tuple[str, int], object]) -> StoreReport:
        return self._run(self._client.put(tokens, pieces))

    def get(self, hit: PrefixHit) -> "Fetched":
        return self._run(self._client.get(hit))

    def evict(self, nbytes: int) -> int:
        return self._run(self._client.evict(nbytes))

    def stats(self) -> dict:
        return self._run(self._client.stats())

    def health(self) -> dict:
        return self._run(self._client.health())

    def checkpoint_positions(self, end: int, start: int = 0) -> list[int]:
        return self._client.checkpoint_positions(end, start)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
