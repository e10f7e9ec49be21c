"""The pool daemon's API against a real daemon on 127.0.0.1: long prompts, bad requests, a
responsive loop, escaped metrics, and PoolClient's typed failures and clean-up (issue 15 items
2, 12, 13, 14, 15)."""

import asyncio
import gc
import json
import threading
import time
import warnings

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvlink.config import PoolConfig
from kvlink.daemon import SyncPoolClient
from kvlink.daemon.metrics import exposition
from kvlink.errors import AccessDenied, EntryMissing, KvlinkError, PeerUnreachable, PoolError, TransferTimeout
from kvlink.pool.index import FULL, STATE, PrefixHit
from kvlink.transport.receiver import TransferServer

from tests.integration.daemon_helpers import FAST, MODEL, SECRETS, client, daemon, free_port, prompt


async def post(d, path, body=None, data=None, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{d.http_port}{path}", json=body, data=data, headers=headers) as r:
            return r.status, await r.text()


async def test_a_128k_token_prompt_puts_looks_up_and_gets():
    # Block 64: 2048 full blocks and their keys, far beyond what transfer meta (60 KiB) could carry.
    pool = PoolConfig(block_size=64, host_bytes=32 << 20, page_bytes=4096, checkpoint_every=None)
    tokens = prompt(128 * 1024, seed=3)
    nblocks = len(tokens) // 64
    pieces = {(FULL, b): b.to_bytes(4, "little") * 16 for b in range(nblocks)}
    pieces[(STATE, nblocks - 1)] = b"state" * 100
    async with daemon(pool=pool) as d, client(d) as c:
        assert (await c.put(tokens, pieces)).stored == len(pieces)
        hit = await c.lookup(tokens + [1, 2, 3])
        assert hit.tokens == len(tokens) and len(hit.full) == nblocks
        with await c.get(hit) as got:
            values = [bytes(got[(FULL, k)]) for k in hit.full]
        assert values == [pieces[(FULL, b)] for b in range(nblocks)]


async def test_bad_requests_get_a_4xx_with_a_reason_and_change_nothing():
    tokens = prompt(32)
    async with daemon(max_request_bytes=64 << 10) as d, client(d) as c:
        await c.put(tokens, {(FULL, b): b"x" * 100 for b in range(2)} | {(STATE, 1): b"s" * 100})
        nested = b"[" * 200_000 + b"]" * 200_000
        bad = [
            ("/lookup", None, b"{not json"), ("/lookup", None, b"\xff\xfe"), ("/lookup", None, b"[1, 2]"),
            ("/lookup", None, nested), ("/lookup", None, b'{"model": ' + nested + b"}"),
            ("/lookup", {"model": 5, "tokens": [1]}, None), ("/lookup", {"model": ["x"], "tokens": [1]}, None),
            ("/lookup", {"model": MODEL, "tokens": "abc"}, None), ("/lookup", {"model": MODEL, "tokens": [-1]}, None),
            ("/lookup", {"model": MODEL, "tokens": [2 ** 80]}, None), ("/lookup", {"model": MODEL, "tokens": [1.5]}, None),
            ("/lookup", {"model": MODEL}, None), ("/lookup", {"model": MODEL, "tokens": [True]}, None),
            ("/evict", {"model": MODEL, "bytes": -1}, None), ("/evict", {"model": MODEL, "bytes": "9"}, None),
            ("/evict", {"model": MODEL}, None), ("/lookup", {"model": MODEL, "tokens": list(range(20000))}, None),
        ]
        for path, body, data in bad:
            status, text = await post(d, path, body, data)
            assert 400 <= status < 500, (path, body, data and data[:20], status, text)
            if status != 413:
                assert json.loads(text)["message"]
        assert (await post(d, "/lookup", {"model": "no-such-model", "tokens": [1]}))[0] == 404
        assert (await c.lookup(tokens)).tokens == 32  # the entries are intact


async def test_a_4m_token_lookup_does_not_stall_the_loop():
    tokens = [(i * 31) % 150000 for i in range(1 << 22)]
    async with daemon() as d, client(d) as c:
        stalls = []
        lookup = asyncio.ensure_future(c.lookup(tokens))
        async with aiohttp.ClientSession() as s:
            while not lookup.done():
                t0 = time.perf_counter()
                async with s.get(f"http://127.0.0.1:{d.http_port}/health") as r:
                    assert r.status == 200
                stalls.append(time.perf_counter() - t0)
        assert (await lookup).tokens == 0
        # The daemon runs in this loop too: a lookup parsed or hashed on it (~1.5 s of 4M-token
        # JSON here) would hold a /health answer that long.
        assert max(stalls) < 0.75, max(stalls)


def test_metrics_escape_label_values():
    summary = {"tiers": {"host": {"used": 1, "capacity": 2, "entries": 3}}, "counters": {"hit": 4}}
    evil = 'x"} 1\nfake_metric{a="b'
    text = exposition({(MODEL, evil): summary}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "fake_metric" not in families
    samples = [s for f in families.values() for s in f.samples]
    assert samples and all(s.labels["namespace"] == evil for s in samples)


async def test_pool_client_failures_are_typed():
    # Nothing listening at all: connect fails typed, and leaves no open session behind.
    dead = client_for(free_port(), free_port())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PeerUnreachable):
            await dead.connect()
        del dead
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)]
    async with daemon(tenants=SECRETS) as d:
        # A daemon whose HTTP side is gone, or hangs, or answers garbage: typed errors all.
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        garbage = await asyncio.start_server(_garbage, "127.0.0.1", 0)
        try:
            for port, kind in ((free_port(), PeerUnreachable), (silent.sockets[0].getsockname()[1], TransferTimeout),
                               (garbage.sockets[0].getsockname()[1], PoolError)):
                async with client_for(port, d.data_port, timeout=0.25, tenant="alpha") as c:
                    for call in (c.lookup([1, 2]), c.evict(1), c.stats(), c.health()):
                        with pytest.raises(kind):
                            await call
        finally:
            silent.close()
            garbage.close()
        with pytest.raises(AccessDenied):
            await client(d, "alpha", secret="not-alphas-secret").connect()
    # A data port that takes requests and never answers: the wait for the reply is bounded and typed.
    sink = TransferServer(FAST)
    _, port = await sink.start("127.0.0.1", 0)
    try:
        async with client_for(free_port(), port, timeout=0.25) as c:
            with pytest.raises(TransferTimeout):
                await c.put(prompt(16), {(FULL, 0): b"x" * 100})
    finally:
        await sink.close()
    async with daemon(tenants=SECRETS) as d:
        async with client(d, "alpha") as c:
            gone = PrefixHit(16, (b"k" * 16,), (), None, 16, "")
            with pytest.raises(EntryMissing):
                await c.get(gone)
        with pytest.raises(PoolError):
            await c.lookup([1])  # closed
    for error in (PeerUnreachable, TransferTimeout, PoolError, AccessDenied, EntryMissing):
        assert issubclass(error, KvlinkError)


def test_sync_client_that_cannot_connect_leaves_no_thread():
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(PeerUnreachable):
            SyncPoolClient(MODEL, http_port=free_port(), data_port=free_port(), transport=FAST)
    assert threading.active_count() == before


def client_for(http_port, data_port, timeout=5.0, tenant=None):
    from kvlink.daemon import PoolClient

    secret = SECRETS[tenant].encode() if tenant else None
    return PoolClient(MODEL, http_port=http_port, data_port=data_port, secret=secret, tenant=tenant or "default",
                      transport=FAST, timeout=timeout, reply_arena=1 << 20)


async def _garbage(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!")
    await writer.drain()
    writer.close()
