"""``kvlink pool serve``: pools as a process, shared by several engines of several tenants.

Data over kvlink's transport (see :mod:`kvlink.daemon.protocol`); the HTTP control API is in
:mod:`kvlink.daemon.http`. Every caller is a tenant (:mod:`kvlink.daemon.auth`) and sees only its
own pools: a pool is (model, authenticated tenant), never a name the client sends. Pool work
(copies, SSD I/O, long token lists) runs in threads so the event loop keeps serving. A bad
request gets a 4xx (HTTP) or a failed reply transfer, and leaves every pool untouched.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl as _ssl
import threading
from pathlib import Path

from kvlink.config import DaemonConfig, TransportConfig, check_name, is_loopback
from kvlink.daemon import protocol as proto
from kvlink.daemon.arena import FreeListArena
from kvlink.daemon.auth import DEFAULT_TENANT, Tenants
from kvlink.daemon.http import HttpApi
from kvlink.errors import (ConfigError, HandshakeError, KvlinkError, PeerUnreachable, ResourceLimit,
                           TransferRejected, TransportError)
from kvlink.pool.budget import HostBudget
from kvlink.pool.pool import Pool
from kvlink.pool.slab import Landing
from kvlink.presets import get_preset
from kvlink.serde.payload import is_payload
from kvlink.spec import CacheSpec
from kvlink.transport.parts import arena_allocator
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient
from kvlink.transport.tls import client_context, server_context

log = logging.getLogger("kvlink.daemon")
_REPLIERS = 64  # reply connections kept open (LRU)


class PoolDaemon:
    """The daemon. ``secret`` (e.g. ``KVLINK_SECRET``) is tenant ``default``'s secret; more tenants
    come from ``config.tenants``. Raises :class:`ConfigError` for an unsafe configuration (see
    :meth:`Tenants.from_config`), an unknown model or TLS files that cannot be loaded.

    TLS: ``ssl`` (a server context, e.g. ``tls.server_context(cert, key)``) serves HTTP and data
    connections over TLS; ``reply_ssl`` (a client context, e.g. ``tls.client_context(ca)``) is
    then required: replies go over connections the daemon opens to each client's reply listener,
    whose certificate it verifies. Both default to contexts built from ``config.tls_*``."""

    def __init__(self, config: DaemonConfig, secret: bytes | None = None,
                 transport: TransportConfig | None = None, ssl: _ssl.SSLContext | None = None,
                 reply_ssl: _ssl.SSLContext | None = None):
        self.config = config
        if ssl is None and config.tls_cert is not None:
            ssl = server_context(config.tls_cert, config.tls_key)
            reply_ssl = reply_ssl or client_context(config.tls_ca)
        if (ssl is None) != (reply_ssl is None):
            raise ConfigError("ssl and reply_ssl go together: a TLS daemon sends its replies over TLS too")
        self.ssl, self.reply_ssl = ssl, reply_ssl
        self.tenants = Tenants.from_config(config, secret)
        self.transport = transport or TransportConfig()
        self.specs = {name: get_preset(name) for name in config.models}
        self.specs.update({name: load_spec_file(path) for name, path in config.spec_files.items()})
        self.budget = HostBudget(config.host_budget)
        self._pools: dict[tuple[str, str], Pool] = {}
        self._pools_lock = threading.Lock()
        self._repliers: collections.OrderedDict[tuple, _Replier] = collections.OrderedDict()
        # Puts land in a preallocated, pre-faulted arena (fresh memory would cost a page fault per
        # 4 KiB on the hot path); each tenant may hold at most tenant_arena_bytes of it. Leases are
        # freed in any order (not a ring): a lease one tenant holds never blocks the others.
        self._arena = arena_allocator(FreeListArena(config.receive_arena))
        self._arena_used: collections.Counter[str] = collections.Counter()
        self._arena_lock = threading.Lock()
        self._server = TransferServer(self.transport, [s.fingerprint for s in self.specs.values()],
                                      secret=self.tenants.secrets.get(DEFAULT_TENANT), secrets=self.tenants.secrets,
                                      allocator=self._arena, allocator_for=self._allocator_for,
                                      part_verifier=proto.part_intact, part_scanner=proto.PartScan, ssl=ssl)
        self._landings: dict[int, dict[int, Landing]] = {}  # put transfer id -> {id(view): landing}
        self.publisher = None  # the global index's publisher (config.cluster), from start()
        self._http: HttpApi | None = None
        self._tasks: set[asyncio.Task] = set()
        self._acceptor: asyncio.Task | None = None
        self.http_port = self.data_port = 0

    # -- pools ------------------------------------------------------------------------------------
    def pool(self, model: str, tenant: str) -> Pool:
        """The pool of ``model`` for ``tenant`` (an authenticated name), created on first use.
        Raises :class:`ConfigError` for a model not served here and :class:`ResourceLimit` beyond
        ``DaemonConfig.max_pools``."""
        if model not in self.specs:
            raise ConfigError(f"model {model!r} is not served here (serving {sorted(self.specs)})")
        with self._pools_lock:
            pool = self._pools.get((model, tenant))
            if pool is not None:
                return pool
            if len(self._pools) >= self.config.max_pools:
                raise ResourceLimit(f"at most {self.config.max_pools} pools per daemon (DaemonConfig.max_pools)")
            fields = {**self.config.pool.__dict__, "namespace": tenant}
            if self.config.root is not None:
                fields["ssd_dir"] = str(self.tier_dir(model, tenant))
            pool = self._pools[(model, tenant)] = Pool(self.specs[model], type(self.config.pool)(**fields),
                                                       budget=self.budget)
            if self.publisher is not None:
                self.publisher.attach(pool)
            return pool

    def _open_stored_pools(self) -> None:
        """Open the pools whose SSD tiers survive under ``root`` (a restart): with a global index
        their entries must be offered again now, not when a client first touches the pool."""
        if self.config.root is None or not Path(self.config.root).is_dir():
            return
        tenants = set(self.tenants.secrets) | {DEFAULT_TENANT}
        for model in self.specs:
            for tenant in sorted(tenants):
                if (Path(self.config.root) / model / tenant).is_dir():
                    try:
                        self.pool(model, tenant)
                    except KvlinkError as exc:
                        log.warning("cannot reopen the pool of %s/%s: %s", model, tenant, exc)

    def tier_dir(self, model: str, tenant: str) -> Path:
        """``root/<model>/<tenant>``, checked to be a directory inside ``root`` (names are
        validated and the resolved path must stay under the resolved root)."""
        root = Path(self.config.root).resolve()
        path = (root / check_name("model", model) / check_name("tenant", tenant)).resolve()
        if not path.is_relative_to(root) or path == root:
            raise ConfigError(f"{model}/{tenant} resolves outside the daemon's root")
        return path

    def pools_of(self, tenant: str | None) -> dict[tuple[str, str], Pool]:
        """Every pool (``tenant=None``, for the admin) or one tenant's."""
        with self._pools_lock:
            return {k: p for k, p in self._pools.items() if tenant is None or k[1] == tenant}

    def tenant_of(self, incoming) -> str:
        """The tenant whose secret the transfer's peer proved (or the single/anonymous one)."""
        return incoming.key_id if incoming.key_id is not None else DEFAULT_TENANT

    # -- landing ----------------------------------------------------------------------------------
    def _tenant_arena(self, tenant: str):
        """The arena allocator, charged to ``tenant``: beyond its share it refuses, so one tenant
        holding reservations cannot starve the others."""
        share = self.config.tenant_arena_bytes

        def allocate(nbytes: int):
            if nbytes == 0:  # an empty part (e.g. an absent entry) holds nothing
                return memoryview(bytearray(0)), None
            with self._arena_lock:
                if self._arena_used[tenant] + nbytes > share:
                    raise TransferRejected(f"tenant {tenant!r} would hold over its {share} bytes of the landing "
                                           f"arena (DaemonConfig.tenant_arena_bytes); retry later")
                self._arena_used[tenant] += nbytes
            try:
                view, release = self._arena(nbytes)
            except BaseException:
                self._uncharge(tenant, nbytes)
                raise

            def give_back() -> None:
                release()
                self._uncharge(tenant, nbytes)

            return view, give_back

        return allocate

    def _uncharge(self, tenant: str, nbytes: int) -> None:
        with self._arena_lock:
            self._arena_used[tenant] -= nbytes

    def _allocator_for(self, incoming):
        """Every transfer lands in its tenant's share of the arena; a put's pieces land straight
        in free pages of its pool's memory tier where they fit, so storing them is bookkeeping,
        not a copy."""
        tenant = self.tenant_of(incoming)
        arena = self._tenant_arena(tenant)
        meta = incoming.meta
        if not isinstance(meta, dict) or meta.get("op") != "put":
            return arena
        try:
            model = proto.model_of(meta)
        except KvlinkError:
            return arena  # reported when the put is served
        with self._pools_lock:
            pool = self._pools.get((model, tenant))
        if pool is None:
            # Creating a pool opens RocksDB and scans its SSD index: never on the event loop.
            # The first put lands in the arena; _serve creates the pool in a thread.
            return arena
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
        """Listen; returns (http port, data port)."""
        self._http = HttpApi(self)
        self.http_port = await self._http.start(self.config.host, self.config.http_port)
        if self.ssl is None and not is_loopback(self.config.host):
            log.warning("pool daemon serves HTTP on %s:%d without TLS: tenants' bearer secrets cross the network "
                        "in clear (set tls_cert/tls_key)", self.config.host, self.http_port)
        _, self.data_port = await self._server.start(self.config.host, self.config.data_port)
        self._acceptor = asyncio.create_task(self._accept())
        if self.config.cluster.enabled:
            from kvlink.cluster.publisher import IndexPublisher

            self.publisher = IndexPublisher(self.config.cluster, self.config.host, self.http_port, self.data_port)
            self._open_stored_pools()
            with self._pools_lock:
                for pool in self._pools.values():
                    self.publisher.attach(pool)
            self.publisher.start()
        return self.http_port, self.data_port

    async def close(self) -> None:
        if self.publisher is not None:  # stop offering our entries before they go away
            await asyncio.to_thread(self.publisher.close)
            self.publisher = None
        if self._acceptor is not None:
            self._acceptor.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self._repliers.values():
            await entry.close()
        self._repliers.clear()
        await self._server.close()
        if self._http is not None:
            await self._http.close()
        for pool in self.pools_of(None).values():
            await asyncio.to_thread(pool.close)

    # -- data path --------------------------------------------------------------------------------
    async def _accept(self) -> None:
        while True:
            incoming = await self._server.accept()
            task = asyncio.create_task(self._serve(incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, incoming) -> None:
        meta = incoming.meta if isinstance(incoming.meta, dict) else {}
        tenant = self.tenant_of(incoming)
        reply_port, reply_id = meta.get("reply_port"), meta.get("reply_id")
        model = meta.get("model") if meta.get("model") in self.specs else next(iter(self.specs))
        release = None
        landings = self._landings.pop(incoming.transfer_id, {})
        try:
            try:
                parts = await incoming.done()
            except TransportError:
                return  # the request never arrived whole: its sender has the transport's error
            pool = await asyncio.to_thread(self.pool, proto.model_of(meta), tenant)
            op = meta.get("op")
            if op == "put":
                tokens, names = await asyncio.to_thread(proto.decode_put, parts[0], len(parts) - 1)
                if any(len(part) == 0 for part in parts[1:]):
                    raise ConfigError("a piece must not be empty (an empty part means an absent entry in a get)")
                pieces = {name: _landed(landings, part) for name, part in zip(names, parts[1:])}
                reply, out = _report(await asyncio.to_thread(pool.store, tokens, pieces)), [b""]
            elif op == "get":
                keys = await asyncio.to_thread(proto.decode_get, parts[0])
                # Sent straight from the tier's pages, pinned until the reply is delivered.
                found, release = await asyncio.to_thread(pool.pin_views, keys)
                # An absent entry is an empty part: its length says so, however many are missing
                # (a list of them in meta would outgrow the meta limit and the reply never arrive).
                reply, out = {}, [b"" if v is None else v for v in found] or [b""]
            else:
                raise ConfigError(f"unknown op {op!r}")
        except KvlinkError as exc:
            reply, out = {"error": proto.error_name(exc), "message": str(exc)}, [b""]
        except Exception as exc:  # a bug must still answer the client, not leave it waiting
            log.exception("serving a %s transfer failed", meta.get("op"))
            reply, out = {"error": "InternalError", "message": type(exc).__name__}, [b""]
        finally:
            incoming.release()
        try:
            if type(reply_port) is int and 0 < reply_port < 65536 and type(reply_id) is int and incoming.peer:
                await self._reply(incoming.peer[0], reply_port, reply_id, tenant, self.specs[model].fingerprint,
                                  reply, out)
        finally:
            if release is not None:
                release()

    async def _reply(self, host: str, port: int, tid: int, tenant: str, fingerprint: bytes, meta: dict,
                     parts: list) -> None:
        # Replies are authenticated with the tenant's own secret: only its client accepts them.
        key = (host, port, tenant, fingerprint)
        entry = self._repliers.get(key)
        if entry is None:
            # One connect per key: concurrent replies to the same client wait on the same task.
            entry = self._repliers[key] = _Replier(asyncio.ensure_future(self._connect(host, port, tenant,
                                                                                      fingerprint)))
        self._repliers.move_to_end(key)
        entry.users += 1
        try:
            # shield: one waiter being cancelled must not cancel the connect the others wait on.
            client = await asyncio.shield(entry.connected)
            verifiable = all(p == b"" or is_payload(p) for p in parts)  # b"": an absent entry
            await client.send(parts, meta=meta, transfer_id=tid, verifiable=verifiable)
        except KvlinkError as exc:
            log.warning("reply to %s:%s failed: %s", host, port, exc)
            # A connection that is gone (or never came) is dropped; a refused transfer leaves it.
            task = entry.connected
            failed = task.done() and not task.cancelled() and task.exception() is not None
            if (failed or isinstance(exc, (PeerUnreachable, HandshakeError))) and self._repliers.get(key) is entry:
                del self._repliers[key]
                entry.dropped = True
        finally:
            entry.users -= 1
            # Over the limit, the least recently used idle clients go; one in use is never closed
            # under its sender (busy ones are bounded by the replies in flight).
            idle = [k for k, e in self._repliers.items() if e.users == 0]
            closing = [self._repliers.pop(k) for k in idle[:max(0, len(self._repliers) - _REPLIERS)]]
            if entry.dropped and entry.users == 0 and entry not in closing:
                closing.append(entry)  # dropped after a failure, and its last user is done
            for idle_entry in closing:
                await idle_entry.close()

    async def _connect(self, host: str, port: int, tenant: str, fingerprint: bytes) -> TransferClient:
        # With TLS the client's reply listener must show a certificate valid for its address.
        client = TransferClient(host, port, fingerprint, self.transport, secret=self.tenants.secrets.get(tenant),
                                ssl=self.reply_ssl)
        try:
            await client.connect()
        except BaseException:
            await client.close()
            raise
        return client


class _Replier:
    """A reply connection being opened or open, and how many replies are using it now."""

    def __init__(self, connected: asyncio.Future):
        self.connected, self.users, self.dropped = connected, 0, False

    async def close(self) -> None:
        self.connected.cancel()  # no-op once connected
        await asyncio.gather(self.connected, return_exceptions=True)
        if not self.connected.cancelled() and self.connected.exception() is None:
            await self.connected.result().close()


def load_spec_file(path: str) -> CacheSpec:
    """A :class:`CacheSpec` from a JSON file (:meth:`CacheSpec.to_dict`); :class:`ConfigError` when
    it cannot be read or is not a spec (at most 16 MiB: a spec, not a payload)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(16 << 20)
        return CacheSpec.from_dict(json.loads(raw))
    except (OSError, ValueError, KvlinkError) as exc:
        raise ConfigError(f"spec file {path}: {exc}") from None


def _report(report) -> dict:
    """A put's reply meta from ``Pool.store``'s report (an int from pools that only count)."""
    if isinstance(report, int):
        return {"stored": report, "on_ssd": 0, "failed": 0, "errors": []}
    return {"stored": report.stored, "on_ssd": report.on_ssd, "failed": report.failed,
            "errors": [str(e)[:200] for e in report.errors[:16]]}


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
