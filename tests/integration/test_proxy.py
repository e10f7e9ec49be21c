"""``kvlink proxy`` over real sockets, in front of two small aiohttp servers that answer the way
vLLM's OpenAI API does (the proxy is under test; the real-server path is test_vllm_pd.py)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from kvlink.engine.vllm.proxy import DecodeServer, Proxy, parse_decode
from kvlink.errors import ConfigError


class Upstream:
    """A prefill or decode server: records each body and header; behaviour set per test."""

    def __init__(self, role: str):
        self.role, self.bodies, self.auth = role, [], []
        self.status, self.delay, self.params = 200, 0.0, {"do_remote_prefill": True, "kvlink_transfer": "t"}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization"))
        await asyncio.sleep(self.delay)  # a slow server, as the test sets it
        if self.status != 200:
            return web.json_response({"error": "boom"}, status=self.status)
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": self.params})
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response({"choices": [{"text": "answer"}], "got": body.get("kv_transfer_params")})


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.fixture
async def setup():
    prefill, decode = Upstream("prefill"), Upstream("decode")
    runners, ports = [], []
    for up in (prefill, decode):
        app = web.Application()
        app.router.add_post("/v1/completions", up.handle)
        runner, port = await _serve(app)
        runners.append(runner)
        ports.append(port)

    async def start(**kwargs):
        proxy = Proxy([f"http://127.0.0.1:{ports[0]}"], [DecodeServer(f"http://127.0.0.1:{ports[1]}", ("127.0.0.1", 7999))],
                      **kwargs)
        runner, port = await _serve(proxy.app())
        runners.append(runner)
        return proxy, f"http://127.0.0.1:{port}"

    yield prefill, decode, start
    for runner in runners:
        await runner.cleanup()


async def _post(url: str, body, headers=None) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with s.post(url + "/v1/completions", data=data, headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.text()


async def test_pd_route_names_a_fresh_transfer(setup):
    prefill, decode, start = setup
    proxy, url = await start()
    status, headers, text = await _post(url, {"prompt": "hi", "max_tokens": 5, "kv_transfer_params": {"evil": 1}})
    assert status == 200 and headers["X-Kvlink-Route"] == "pd"
    p_body = prefill.bodies[0]
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False
    assert p_body["kv_transfer_params"]["do_remote_decode"] and p_body["kv_transfer_params"]["kvlink_decode"] == "127.0.0.1:7999"
    assert "evil" not in p_body["kv_transfer_params"]  # a client never names transfers
    assert decode.bodies[0]["max_tokens"] == 5 and json.loads(text)["got"] == prefill.params
    assert proxy.stats == {"pd": 1, "decode-only": 0}


@pytest.mark.parametrize("failure", ["status", "timeout", "no params"])
async def test_prefill_failure_goes_decode_only(setup, failure):
    prefill, decode, start = setup
    if failure == "status":
        prefill.status = 500
    elif failure == "timeout":
        prefill.delay = 5
    else:
        prefill.params = None
    proxy, url = await start(prefill_timeout=0.5)
    status, headers, text = await _post(url, {"prompt": "hi", "max_tokens": 5, "kv_transfer_params": {"x": 1}})
    assert status == 200 and headers["X-Kvlink-Route"] == "decode-only"
    assert json.loads(text)["got"] is None  # the decode server computes the prompt itself
    assert proxy.stats["decode-only"] == 1


async def test_streams_pass_through(setup):
    _, _, start = setup
    _, url = await start()
    status, headers, text = await _post(url, {"prompt": "hi", "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert text.count("data: ") == 4 and text.endswith("data: [DONE]\n\n")


async def test_api_key_and_bad_bodies(setup):
    prefill, decode, start = setup
    _, url = await start(api_key="s3cret-key")
    assert (await _post(url, {"prompt": "hi"}))[0] == 401
    assert (await _post(url, {"prompt": "hi"}, {"Authorization": "Bearer wrong"}))[0] == 401
    ok = {"Authorization": "Bearer s3cret-key"}
    assert (await _post(url, {"prompt": "hi"}, ok))[0] == 200
    assert prefill.auth[-1] == decode.auth[-1] == "Bearer s3cret-key"  # for servers run with --api-key
    assert (await _post(url, b"{not json", ok))[0] == 400
    assert (await _post(url, b"[1, 2]", ok))[0] == 400
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/health") as r:
            assert r.status == 200


@pytest.mark.parametrize("text", ["http://d:1", "d:1=h:2", "http://d:1=h", "http://d:1=h:x", "=h:1"])
def test_bad_decode_servers(text):
    with pytest.raises(ConfigError):
        parse_decode(text)
    with pytest.raises(ConfigError):
        Proxy([], [DecodeServer("http://d", ("h", 1))])
