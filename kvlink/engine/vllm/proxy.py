"""``kvlink proxy``: the P/D front door for two (or more) vLLM servers running ``KvlinkConnector``.

Each ``/v1/completions`` (or ``/v1/chat/completions``) request goes first to a prefill server with
``max_tokens=1`` and ``kv_transfer_params`` naming a fresh transfer and the decode server's kvlink
receiver; the prefill server's reply carries the ``kv_transfer_params`` for the decode server, which
then answers the client (streamed when asked). Servers are taken round-robin.

If the prefill server fails or does not answer within ``prefill_timeout``, the request goes to the
decode server without parameters (it computes the prompt itself): a dead prefill server costs
latency, never the request. Each reply says what happened in ``X-Kvlink-Route`` (``pd`` or
``decode-only``). ``GET /health`` answers 200; ``GET /stats`` counts routes.

A client's own ``kv_transfer_params`` are never passed on (only the proxy names transfers), its
``Authorization`` header is (for servers started with ``--api-key``). With ``api_key`` set, every
call but ``/health`` needs ``Authorization: Bearer <api_key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import uuid
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from kvlink.engine.vllm.meta import parse_address
from kvlink.errors import ConfigError

log = logging.getLogger("kvlink.proxy")
MAX_BODY = 64 << 20  # a prompt of a few million tokens' text at most


@dataclass(frozen=True)
class DecodeServer:
    url: str                      # http://host:port of its OpenAI API
    kv: tuple[str, int]           # its kvlink receiver (the connector's ``listen``)


def parse_decode(text: str) -> DecodeServer:
    """``URL=HOST:PORT`` (API URL, then the kvlink receiver); anything else is a :class:`ConfigError`."""
    url, sep, kv = text.rpartition("=")
    if not sep or not url.startswith("http"):
        raise ConfigError(f"--decode: expected URL=HOST:PORT, got {text!r}")
    return DecodeServer(url.rstrip("/"), parse_address(kv, "--decode"))


class Proxy:
    def __init__(self, prefill: list[str], decode: list[DecodeServer], prefill_timeout: float = 600.0,
                 api_key: str | None = None):
        if not prefill or not decode:
            raise ConfigError("the proxy needs at least one prefill and one decode server")
        self.api_key = api_key
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = decode
        self._next_p, self._next_d = itertools.cycle(self.prefill), itertools.cycle(self.decode)
        self.prefill_timeout = prefill_timeout
        self.stats = {"pd": 0, "decode-only": 0}
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return web.json_response({"error": "missing or wrong API key"}, status=401)
        return await handler(request)

    async def _start(self, app) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def _stop(self, app) -> None:
        await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body is not a JSON object"}, status=400)
        decode = next(self._next_d)
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}
        body.pop("kv_transfer_params", None)  # only the proxy names transfers
        params = await self._prefill(request.path, body, decode, headers)
        route = "pd" if params is not None else "decode-only"
        self.stats[route] += 1
        out = dict(body)
        if params is not None:
            out["kv_transfer_params"] = params
        async with self._session.post(decode.url + request.path, json=out, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                "Content-Type": upstream.headers.get("Content-Type", "application/json"), "X-Kvlink-Route": route})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _prefill(self, path: str, body: dict, decode: DecodeServer, headers: dict) -> dict | None:
        """The prefill server's ``kv_transfer_params`` for the decode server, or None if it failed."""
        url = next(self._next_p) + path
        p_body = dict(body, max_tokens=1, stream=False, n=1)
        p_body.pop("max_completion_tokens", None)
        p_body.pop("stream_options", None)
        p_body["kv_transfer_params"] = {"do_remote_decode": True, "kvlink_transfer": uuid.uuid4().hex,
                                        "kvlink_decode": f"{decode.kv[0]}:{decode.kv[1]}"}
        try:
            async with self._session.post(url, json=p_body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=self.prefill_timeout)) as r:
                if r.status != 200:
                    log.warning("prefill %s answered %d; decode computes the prompt", url, r.status)
                    return None
                reply = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            log.warning("prefill %s failed (%s); decode computes the prompt", url, exc)
            return None
        params = reply.get("kv_transfer_params") if isinstance(reply, dict) else None
        return params if isinstance(params, dict) and params.get("do_remote_prefill") else None


def serve(prefill: list[str], decode: list[str], host: str = "127.0.0.1", port: int = 8000,
          prefill_timeout: float = 600.0, api_key: str | None = None) -> None:
    """Run the proxy until interrupted. Raises :class:`ConfigError` for bad server lists."""
    proxy = Proxy(prefill, [parse_decode(d) for d in decode], prefill_timeout, api_key)
    web.run_app(proxy.app(), host=host, port=port, print=None)
