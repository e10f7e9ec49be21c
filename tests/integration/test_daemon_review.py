"""The pool daemon's fixes from the issue-15 review (findings 2, 3, 4, 6, 9, 10), against real daemons,
sockets and files on 127.0.0.1."""

import asyncio
import os
import threading

import aiohttp
import pytest

from kvlink.config import DaemonConfig, PoolConfig, is_loopback
from kvlink.daemon import server as server_module
from kvlink.daemon.arena import FreeListArena
from kvlink.daemon.auth import Tenants
from kvlink.daemon.client import store_report
from kvlink.errors import ConfigError, EntryMissing, PoolError, StagingExhausted
from kvlink.pool.index import FULL, PrefixHit, PrefixIndex
from kvlink.presets import get_preset
from kvlink.transport.receiver import TransferServer

from tests.integration.daemon_helpers import (ADMIN, FAST, MODEL, SECRETS, client, config, daemon, pieces,
                                              prompt)


# -- finding 2: no SSD directory shared between pools -----------------------------------------
def test_daemon_refuses_a_shared_pool_ssd_dir(tmp_path):
    with pytest.raises(ConfigError, match="pool.ssd_dir"):
        config(tenants=SECRETS, pool=PoolConfig(block_size=16, host_bytes=4 << 20, page_bytes=4096,
                                                ssd_dir=str(tmp_path)))
    toml = tmp_path / "pool.toml"
    toml.write_text(f'[pool]\nssd_dir = "{tmp_path}"\n[tenants]\nalpha = "alpha-secret-1"\n')
    with pytest.raises(ConfigError, match="pool.ssd_dir"):
        DaemonConfig.from_toml(toml)


async def test_after_a_restart_a_tenant_cannot_read_another_tenants_ssd_entries(tmp_path):
    pool = PoolConfig(block_size=16, host_bytes=4 << 20, page_bytes=4096, write_mode="through")
    tokens = prompt(64, 7)
    alphas = pieces(tokens, [3])
    async with daemon(tenants=SECRETS, pool=pool, root=str(tmp_path)) as d:
        async with client(d, "alpha") as a:
            assert (await a.put(tokens, alphas)).on_ssd == len(alphas)
    async with daemon(tenants=SECRETS, pool=pool, root=str(tmp_path)) as d:  # beta comes first
        async with client(d, "beta") as b:
            assert (await b.lookup(tokens)).tokens == 0
            keys = PrefixIndex(get_preset(MODEL), 16, "alpha").hashes(tokens)  # computable from tokens
            with pytest.raises(EntryMissing):
                await b.get(PrefixHit(64, tuple(keys[:4]), (), None, 64, "forged"))
        async with client(d, "alpha") as a:  # alpha's own entries survived, in its own directory
            hit = await a.lookup(tokens)
            assert hit.tokens == 64
            with await a.get(hit) as got:
                assert sorted(bytes(v) for v in got.values()) == sorted(alphas.values())


# -- finding 3: only tenant secrets close the daemon; KVLINK_SECRET rules ---------------------
def test_admin_secret_alone_is_refused_even_on_loopback():
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ConfigError, match="admin_secret"):
            Tenants.from_config(DaemonConfig(host=host, admin_secret=ADMIN))
    assert Tenants.from_config(DaemonConfig(host="0.0.0.0", admin_secret=ADMIN, tenants=SECRETS)).admin


def test_daemon_secret_must_be_long_and_distinct():
    with pytest.raises(ConfigError, match="8 characters"):
        Tenants.from_config(DaemonConfig(), secret=b"x")
    with pytest.raises(ConfigError, match="admin"):
        Tenants.from_config(DaemonConfig(admin_secret=ADMIN), secret=ADMIN.encode())
    with pytest.raises(ConfigError):
        Tenants.from_config(DaemonConfig(tenants=SECRETS), secret=SECRETS["beta"].encode())
    tenants = Tenants.from_config(DaemonConfig(host="0.0.0.0", admin_secret=ADMIN), secret=b"default-secret")
    assert not tenants.open and tenants.identify("Bearer default-secret") == "default"


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


# -- finding 4: a lease one tenant holds does not block the arena for others -----------------
async def test_one_tenants_held_lease_does_not_block_the_others():
    async with daemon(tenants=SECRETS) as d:  # receive_arena 8 MiB, tenant_arena_bytes 4 MiB
        beta, alpha = d._tenant_arena("beta"), d._tenant_arena("alpha")
        _, give_back_beta = beta(4096)  # a stalled transfer's reservation, held throughout
        for _ in range(100):  # the ring failed at the 8th
            _, release = alpha(1 << 20)
            release()
        assert d._arena_used["alpha"] == 0 and d._arena_used["beta"] == 4096
        give_back_beta()


def test_free_list_arena_reuses_and_merges_released_ranges():
    arena = FreeListArena(4096, pin=False)
    a, b, c = arena.lease(1024), arena.lease(1024), arena.lease(2048)
    with pytest.raises(StagingExhausted):
        arena.lease(1)
    b.release()
    b.release()  # twice is harmless
    d = arena.lease(1024)  # b's range, though a (older) is still held
    assert d.tensor.data_ptr() == arena.buffer.data_ptr() + 1024
    a.release()
    d.release()  # a + d merge into one 2048-byte range
    e = arena.lease(2048)
    assert e.tensor.data_ptr() == arena.buffer.data_ptr() and arena.in_use == 4096
    c.release()
    e.release()
    assert arena.in_use == 0 and arena.lease(4096).tensor.numel() == 4096


# -- finding 6: missing entries are empty parts, not a list in meta ---------------------------
async def test_a_get_of_many_absent_keys_answers_entry_missing_quickly():
    async with daemon(tenants=SECRETS) as d:
        async with client(d, "alpha") as a:
            a.timeout = 15.0  # the old meta list made this a TransferTimeout (20k empty parts take ~3 s here)
            tokens = prompt(64)
            await a.put(tokens, pieces(tokens, [3]))
            hit = await a.lookup(tokens)
            absent = PrefixHit(20000 * 16, hit.full + tuple(os.urandom(16) for _ in range(19996)), (), None,
                               20000 * 16, "x")
            with pytest.raises(EntryMissing, match="19996 of 20000"):
                await a.get(absent)
            with await a.get(hit) as got:  # present entries still arrive whole
                assert len(got) == 5
            empty = {**pieces(prompt(32, 2)), (FULL, 1): b""}  # would read back as "missing"
            with pytest.raises(PoolError, match="must not be empty"):
                await a.put(prompt(32, 2), empty)


# -- finding 9: pool creation runs off the event loop ------------------------------------------
async def test_a_new_tenants_first_put_creates_its_pool_off_the_event_loop():
    async with daemon(tenants=SECRETS) as d:
        loop_thread = threading.current_thread()
        created_on = []
        pool = d.pool

        def recording_pool(model, tenant):
            created_on.append(threading.current_thread())
            return pool(model, tenant)

        d.pool = recording_pool
        async with client(d, "alpha") as a:
            tokens = prompt(64)
            assert (await a.put(tokens, pieces(tokens, [3]))).stored == 5
            assert (await a.put(prompt(64, 1), pieces(prompt(64, 1), [3]))).stored == 5  # lands in the pool now
            assert (await a.lookup(tokens)).tokens == 64
        assert created_on and loop_thread not in created_on


# -- finding 10: replies, malformed replies, public error names --------------------------------
async def test_concurrent_replies_to_one_client_share_one_connection():
    fp = get_preset(MODEL).fingerprint
    listener = TransferServer(FAST, [fp], secret=SECRETS["alpha"].encode())
    host, port = await listener.start("127.0.0.1", 0)
    try:
        async with daemon(tenants=SECRETS) as d:
            await asyncio.gather(*(d._reply(host, port, 100 + i, "alpha", fp, {"n": i}, [b"x" * 100])
                                   for i in range(5)))
            for i in range(5):
                incoming = await asyncio.wait_for(listener.transfer(100 + i), 5)
                assert incoming.meta == {"n": i}
                incoming.release()
            assert len(d._repliers) == 1
            assert len(listener._conns) == FAST.connections  # one client, not one per reply
    finally:
        await listener.close()


async def test_a_reply_client_in_use_is_not_closed_by_eviction(monkeypatch):
    # One reply client kept: the second client's connect used to close the first under its send.
    monkeypatch.setattr(server_module, "_REPLIERS", 1)
    fp = get_preset(MODEL).fingerprint
    listeners = [TransferServer(FAST, [fp], secret=SECRETS["alpha"].encode()) for _ in range(2)]
    ports = [(await listener.start("127.0.0.1", 0))[1] for listener in listeners]
    big = [os.urandom(4 << 20) for _ in range(4)]
    try:
        async with daemon(tenants=SECRETS) as d:
            await asyncio.gather(*(d._reply("127.0.0.1", port, 7, "alpha", fp, {"to": port}, big) for port in ports))
            for listener, port in zip(listeners, ports):
                incoming = await asyncio.wait_for(listener.transfer(7), 5)
                assert incoming.meta == {"to": port}
                assert [bytes(p) for p in await asyncio.wait_for(incoming.done(), 5)] == big
                incoming.release()
            assert len(d._repliers) == 1  # the limit holds once the replies are done
    finally:
        for listener in listeners:
            await listener.close()


def test_a_malformed_put_reply_is_a_pool_error():
    assert store_report({"stored": 3, "on_ssd": 1, "failed": 0, "errors": []}).stored == 3
    for meta in ({"stored": "x"}, {"stored": -1}, {"stored": 1.5}, {"errors": 7}, {"stored": True}):
        with pytest.raises(PoolError, match="malformed put reply"):
            store_report(meta)


async def test_http_errors_name_public_error_classes():
    async with daemon(tenants=SECRETS, admin_secret=ADMIN) as d:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{d.http_port}/lookup"
            async with s.post(url, json={"model": MODEL, "tokens": [1]},
                              headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 403 and (await r.json())["error"] == "AccessDenied"
            async with s.post(url, json={"model": "no-such-model", "tokens": [1]},
                              headers={"Authorization": f"Bearer {SECRETS['alpha']}"}) as r:
                assert r.status == 404 and (await r.json())["error"] == "ConfigError"


def test_a_budget_smaller_than_one_quota_is_refused_at_config():
    # Pools reserve their whole quota at creation: a daemon whose budget cannot hold one would
    # start and then refuse every tenant's first call.
    from kvlink.config import DaemonConfig, PoolConfig
    from kvlink.errors import ConfigError

    DaemonConfig(host_budget_bytes=64 << 20, pool=PoolConfig(host_bytes=64 << 20))
    with pytest.raises(ConfigError, match="pool.host_bytes"):
        DaemonConfig(host_budget_bytes=32 << 20, pool=PoolConfig(host_bytes=64 << 20))
