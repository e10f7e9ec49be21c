"""The pool daemon's HTTP control API (aiohttp): authentication, request parsing, status codes.

Every call but ``/health`` is authenticated (:mod:`kvlink.daemon.auth`); bodies are bounded by
``DaemonConfig.max_request_bytes`` and parsed in a worker thread (a 4M-token lookup must not stall
the event loop); every bad request is a 4xx with ``{"error", "message"}``.

Client-caused protocol errors (malformed or over-long headers, bodies cut short, peers that hang
up) are logged as one short line each, no traceback, at most
``DaemonConfig.client_error_log_per_minute`` a minute (:class:`ClientErrorLog`): a hostile client
must not fill the operator's disk or drown real errors, which keep their tracebacks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from kvlink.daemon import protocol as proto
from kvlink.daemon.auth import ADMIN
from kvlink.daemon.metrics import exposition
from kvlink.errors import AccessDenied, ConfigError, KvlinkError, ResourceLimit

if TYPE_CHECKING:
    from kvlink.daemon.server import PoolDaemon

log = logging.getLogger("kvlink.daemon")
# aiohttp logs every request it fails to parse or finish here, with a traceback (RequestHandler).
AIOHTTP_LOG = logging.getLogger("aiohttp.server")
_CLIENT_ERRORS = (BadHttpMessage, ConnectionError, asyncio.IncompleteReadError)


class ClientErrorLog(logging.Filter):
    """A filter for :data:`AIOHTTP_LOG`: a record whose exception the client caused becomes one
    short WARNING line without traceback, and at most ``per_minute`` of them pass per minute (the
    first line after a full minute says how many were suppressed). Other records pass untouched."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        super().__init__()
        self.per_minute, self._clock = per_minute, clock
        self._lock = threading.Lock()
        self._window = clock()
        self._passed = self.suppressed = 0  # in the current minute

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, _CLIENT_ERRORS):
            return True
        with self._lock:
            now, note = self._clock(), ""
            if now - self._window >= 60.0:
                if self.suppressed:
                    note = f" ({self.suppressed} similar lines suppressed in the last minute)"
                self._window, self._passed, self.suppressed = now, 0, 0
            if self._passed >= self.per_minute:
                self.suppressed += 1
                return False
            self._passed += 1
        detail = " ".join(str(exc).split())[:160]  # one line, bounded (a LineTooLong quotes the line)
        record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {detail}{note}", None
        record.exc_info = record.exc_text = record.stack_info = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _NotFound(ConfigError):
    """An unknown model (404)."""


class _Forbidden(AccessDenied):
    """An authenticated caller asking for what its credential does not allow (403)."""


def _status(exc: KvlinkError) -> int:
    if isinstance(exc, AccessDenied):
        return 403 if isinstance(exc, _Forbidden) else 401
    if isinstance(exc, _NotFound):
        return 404
    if isinstance(exc, ResourceLimit):
        return 429
    return 400


def _parse(raw: bytes) -> dict:
    """A JSON object body; raises :class:`ConfigError` (never RecursionError, UnicodeError...)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ConfigError("body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError("body is not JSON") from None
    if not isinstance(body, dict):
        raise ConfigError("body must be a JSON object")
    return body


class HttpApi:
    """The aiohttp application of one :class:`~kvlink.daemon.server.PoolDaemon`."""

    def __init__(self, daemon: "PoolDaemon"):
        self.daemon = daemon
        self._runner: web.AppRunner | None = None
        self._client_log = ClientErrorLog(daemon.config.client_error_log_per_minute)

    async def start(self, host: str, port: int) -> int:
        # Binary lookups may carry MAX_TOKENS ids; JSON bodies are held to max_request_bytes below.
        limit = max(self.daemon.config.max_request_bytes, 4 * proto.MAX_TOKENS)
        AIOHTTP_LOG.addFilter(self._client_log)  # removed again by close()
        app = web.Application(client_max_size=limit, middlewares=[self._errors])
        app.add_routes([web.get("/health", self._health), web.get("/stats", self._stats),
                        web.get("/metrics", self._metrics), web.post("/lookup", self._lookup),
                        web.post("/evict", self._evict)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.daemon.ssl)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        AIOHTTP_LOG.removeFilter(self._client_log)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except KvlinkError as exc:
            return web.json_response({"error": proto.error_name(exc), "message": str(exc)}, status=_status(exc))
        except web.HTTPException:
            raise  # aiohttp's own 4xx (unknown path 404, method 405, body too large 413)
        except _CLIENT_ERRORS:
            raise  # the client hung up or cut its body short: aiohttp logs it through ClientErrorLog
        except Exception:  # a bug: logged, and the client still gets an answer
            log.exception("HTTP %s %s failed", request.method, request.path)
            return web.json_response({"error": "InternalError", "message": "internal error"}, status=500)

    # -- authentication ---------------------------------------------------------------------------
    def _caller(self, request: web.Request):
        """The tenant name or ADMIN; raises :class:`AccessDenied` (401)."""
        return self.daemon.tenants.identify(request.headers.get("Authorization"))

    def _tenant(self, request: web.Request) -> str:
        caller = self._caller(request)
        if caller is ADMIN:
            raise _Forbidden("the admin credential reads /stats and /metrics; use a tenant's secret")
        return caller

    async def _pool(self, request: web.Request):
        """(pool, body) of a tenant's POST: authenticated first, then the body parsed off the loop
        (a binary body is ``{"model": from the query, "tokens": ids}``)."""
        tenant = self._tenant(request)
        raw = await request.read()
        if request.content_type == "application/octet-stream":
            body = {"model": request.query.get("model"), "tokens": proto.decode_tokens(raw)}
        elif len(raw) > self.daemon.config.max_request_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.daemon.config.max_request_bytes, actual_size=len(raw))
        else:
            body = await asyncio.to_thread(_parse, raw)
        model = proto.model_of(body)
        if model not in self.daemon.specs:
            raise _NotFound(f"model {model!r} is not served here (serving {sorted(self.daemon.specs)})")
        if "namespace" in body and body["namespace"] not in ("", tenant):
            raise _Forbidden(f"namespace is the authenticated tenant's ({tenant!r}); another is not allowed")
        return await asyncio.to_thread(self.daemon.pool, model, tenant), body

    # -- handlers ---------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        # Open to all: says whether the daemon and its tiers work, nothing about tenants' data.
        pools = self.daemon.pools_of(None).values()
        tiers_ok = all(t.get("ok", True) for p in pools for t in _health(p).values())
        # The pool settings engines need to plan state checkpoints (PoolClient.checkpoint_positions).
        pool = self.daemon.config.pool
        return web.json_response({"ok": tiers_ok, "pools": len(pools), "models": sorted(self.daemon.specs),
                                  "block_size": pool.block_size, "checkpoint_every": pool.checkpoint_every})

    async def _stats(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        pools = self.daemon.pools_of(None if caller is ADMIN else caller)
        summaries = await asyncio.to_thread(lambda: {proto.pool_name(*k): {**p.summary(), "health": _health(p)}
                                                     for k, p in pools.items()})
        return web.json_response({"tenant": None if caller is ADMIN else caller, "pools": summaries})

    async def _metrics(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        pools = self.daemon.pools_of(None if caller is ADMIN else caller)
        text = await asyncio.to_thread(lambda: exposition({k: p.summary() for k, p in pools.items()}))
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    async def _lookup(self, request: web.Request) -> web.Response:
        pool, body = await self._pool(request)
        tokens = body.get("tokens")
        tokens = tokens if isinstance(tokens, np.ndarray) else None  # binary ids are checked already

        def work() -> bytes:
            return json.dumps(proto.hit_to_json(pool.lookup(proto.tokens_of(body) if tokens is None else tokens)))

        return web.Response(body=(await asyncio.to_thread(work)).encode(), content_type="application/json")

    async def _evict(self, request: web.Request) -> web.Response:
        pool, body = await self._pool(request)
        nbytes = proto.field(body, "bytes", int)
        if nbytes < 0:
            raise ConfigError("bytes must be >= 0")
        return web.json_response({"freed": await asyncio.to_thread(pool.evict, nbytes)})


def _health(pool) -> dict:
    """``Pool.health()`` where the pool reports it (tier -> {"ok", "error"})."""
    health = getattr(pool, "health", None)
    return health() if health is not None else {}
