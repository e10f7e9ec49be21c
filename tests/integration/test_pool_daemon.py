"""`kvlink pool serve` as a real subprocess: HTTP control API, kvlink data path, restart, bad input."""

import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from kvlink.daemon import PoolClient, SyncPoolClient
from kvlink.errors import PoolError
from kvlink.pool.index import FULL, STATE

MODEL = "kimi-linear-48b-a3b"


def start_daemon(tmp_path, *extra):
    config = tmp_path / "pool.toml"
    config.write_text(f'[daemon]\nmodels = ["{MODEL}"]\nroot = "{tmp_path / "ssd"}"\n'
                      '[pool]\nblock_size = 16\nhost_bytes = 1048576\npage_bytes = 4096\n'
                      'write_mode = "through"\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(config),
                             "--http-port", "0", "--data-port", "0", *extra], stdout=subprocess.PIPE, text=True)
    event = json.loads(proc.stdout.readline())
    return proc, event["http_port"], event["data_port"]


def prompt(n, seed=0):
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def pieces(tokens, state_after):
    out = {(FULL, b): os.urandom(2000 + b) for b in range(len(tokens) // 16)}
    out.update({(STATE, b): os.urandom(4000) for b in state_after})
    return out


async def test_put_lookup_get_metrics_and_restart(tmp_path):
    proc, http_port, data_port = start_daemon(tmp_path)
    tokens = prompt(128)
    stored = pieces(tokens, [7])
    try:
        async with PoolClient(MODEL, http_port=http_port, data_port=data_port) as client:
            assert (await client.health())["ok"]
            # The first call creates the pool (in a thread); a put before it would land in the arena.
            assert (await client.lookup(tokens)).tokens == 0
            assert (await client.put(tokens, stored)).stored == len(stored)
            pools = (await client.stats())["pools"]
            # The put's pieces landed straight in the host tier's pages: stored without a copy.
            assert [p["tiers"]["host"]["landed"] for p in pools.values()] == [len(stored)]
            hit = await client.lookup(tokens + [5, 6])
            assert hit.tokens == 128
            got = await client.get(hit)
            keys = [(FULL, k) for k in hit.full] + [(STATE, hit.state)]
            assert set(got) == set(keys)
            hashes = client_hashes(tokens)
            for (kind, block), data in stored.items():
                assert got[(kind, hashes[block])] == data
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                    text = await resp.text()
                assert 'kvlink_pool_tier_entries{model="kimi-linear-48b-a3b",namespace="default",tier="host"}' in text
                # segment bytes, live and dead
                assert any('kind="disk"' in line and 'tier="ssd"' in line for line in text.splitlines())
                async with http.post(f"http://127.0.0.1:{http_port}/lookup", data=b"{not json") as resp:
                    assert resp.status == 400
                async with http.post(f"http://127.0.0.1:{http_port}/lookup",
                                     json={"model": "nope", "tokens": [1]}) as resp:
                    assert resp.status == 404
    finally:
        proc.send_signal(signal.SIGKILL)  # for real: no clean shutdown
        proc.wait()
    proc, http_port, data_port = start_daemon(tmp_path)
    try:
        with SyncPoolClient(MODEL, http_port=http_port, data_port=data_port) as client:
            hit = client.lookup(tokens)
            assert hit.tokens == 128  # rebuilt from the SSD tier written through before the kill
            assert len(client.get(hit)) == 9
    finally:
        proc.kill()
        proc.wait()


def client_hashes(tokens):
    from kvlink.pool.index import PrefixIndex
    from kvlink.presets import get_preset

    return PrefixIndex(get_preset(MODEL), 16, namespace="default").hashes(tokens)  # the anonymous tenant


async def test_bad_put_is_refused_and_pool_untouched(tmp_path):
    proc, http_port, data_port = start_daemon(tmp_path)
    try:
        async with PoolClient(MODEL, http_port=http_port, data_port=data_port) as client:
            with pytest.raises(PoolError):
                await client.put(prompt(32), {(FULL, 9): b"x"})  # block outside the prompt
            assert (await client.lookup(prompt(32))).tokens == 0
            stats = await client.stats()
            assert all(p["index"]["bytes"] == 0 for p in stats["pools"].values())
    finally:
        proc.kill()
        proc.wait()
