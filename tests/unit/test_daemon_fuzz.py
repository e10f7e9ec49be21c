"""Fuzz the pool daemon's HTTP API (a real daemon on 127.0.0.1, in a thread of this process):
Hypothesis-made JSON bodies, nesting, wrong types, huge numbers, odd namespaces, random paths and
methods. Every request gets an answer, never a 5xx; the daemon stays healthy; stored entries stay."""

import asyncio
import http.client
import json
import threading
import urllib.parse

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvlink.daemon import PoolDaemon  # noqa: E402
from tests.integration.daemon_helpers import MODEL, SECRETS, client, config, pieces, prompt  # noqa: E402

TOKENS = prompt(64)


@pytest.fixture(scope="module")
def served():
    """A daemon with tenants, on its own loop in a thread, holding one tenant's prompt."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    daemon = PoolDaemon(config(tenants=SECRETS, max_request_bytes=256 << 10))
    run(daemon.start())

    async def store():
        async with client(daemon, "alpha") as c:
            assert (await c.put(TOKENS, pieces(TOKENS, [3]))).stored == 5

    run(store())
    yield daemon, run
    run(daemon.close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def request(port: int, method: str, path: str, body: bytes | None, token: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
names = st.sampled_from([MODEL, "", ".", "..", "../../x", "/etc", "a" * 65, 'x"\n}', "alpha", "beta", "\0"]) \
    | st.text(max_size=70)
api_bodies = st.fixed_dictionaries({}, optional={
    "model": names | json_values, "namespace": names | json_values,
    "tokens": st.lists(st.integers(min_value=-5, max_value=2 ** 33), max_size=300) | json_values,
    "bytes": st.integers(min_value=-(2 ** 70), max_value=2 ** 70) | json_values})
raw_bodies = (api_bodies.map(lambda b: json.dumps(b).encode()) | json_values.map(lambda v: json.dumps(v).encode())
              | st.binary(max_size=200) | st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n)
              | st.integers(1, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n) | st.none())
paths = st.sampled_from(["/lookup", "/evict", "/stats", "/metrics", "/health"]) \
    | st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t)) \
    | st.tuples(st.sampled_from(["/lookup", "/metrics"]), st.text(max_size=20)).map(
        lambda p: p[0] + "?model=" + urllib.parse.quote(p[1]))
tokens = st.sampled_from([None, SECRETS["alpha"], SECRETS["beta"], "", "wrong", "\u00e9t\u00e9"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]), path=paths, body=raw_bodies,
       token=tokens)
def test_http_api_answers_every_request_with_2xx_or_4xx(served, method, path, body, token):
    daemon, _ = served
    status, reply = request(daemon.http_port, method, path, body, token)
    assert 200 <= status < 500, (status, reply[:200])


def test_after_the_fuzz_the_daemon_is_healthy_and_entries_intact(served):
    daemon, run = served
    status, reply = request(daemon.http_port, "GET", "/health", None, None)
    assert status == 200 and json.loads(reply)["ok"]

    async def check():
        async with client(daemon, "alpha") as c:
            hit = await c.lookup(TOKENS)
            assert hit.tokens == 64
            with await c.get(hit) as got:
                assert len(got) == 5

    run(check())
