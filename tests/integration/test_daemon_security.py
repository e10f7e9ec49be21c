"""The pool daemon's authentication, tenant isolation, name/path safety and per-tenant arena share,
against a real daemon on 127.0.0.1 (issue 15 items 6, 8, 9)."""

import asyncio
from pathlib import Path

import aiohttp
import pytest

from kvlink.config import DaemonConfig
from kvlink.daemon import PoolDaemon
from kvlink.daemon.auth import Tenants
from kvlink.errors import AccessDenied, ConfigError, KvlinkError, TransferRejected
from kvlink.pool.index import FULL
from kvlink.presets import get_preset
from kvlink.transport.sender import TransferClient

from tests.integration.daemon_helpers import (ADMIN, FAST, MODEL, SECRETS, client, daemon, pieces, prompt)


async def http(d, method, path, token=None, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"http://127.0.0.1:{d.http_port}{path}", headers=headers, **kwargs) as r:
            return r.status, await r.text()


async def test_every_http_call_but_health_needs_a_tenant_credential():
    async with daemon(tenants=SECRETS, admin_secret=ADMIN) as d:
        assert (await http(d, "GET", "/health"))[0] == 200
        body = {"model": MODEL, "tokens": [1, 2, 3]}
        for token in (None, "wrong-secret", SECRETS["alpha"] + "x", ""):
            assert (await http(d, "GET", "/stats", token))[0] == 401
            assert (await http(d, "GET", "/metrics", token))[0] == 401
            assert (await http(d, "POST", "/lookup", token, json=body))[0] == 401
            assert (await http(d, "POST", "/evict", token, json={"model": MODEL, "bytes": 1}))[0] == 401
        assert (await http(d, "POST", "/lookup", SECRETS["alpha"], json=body))[0] == 200
        # The admin reads stats, but is no tenant: it cannot look up or evict.
        assert (await http(d, "GET", "/stats", ADMIN))[0] == 200
        assert (await http(d, "POST", "/lookup", ADMIN, json=body))[0] == 403


async def test_tenants_are_isolated_by_credential_not_by_name():
    tokens = prompt(64)
    async with daemon(tenants=SECRETS, admin_secret=ADMIN) as d:
        async with client(d, "alpha") as a, client(d, "beta") as b:
            mine = pieces(tokens, [3])
            assert (await a.put(tokens, mine)).stored == len(mine)
            # Beta, naming alpha's namespace, is refused; its own view of the prompt is empty.
            status, _ = await http(d, "POST", "/lookup", SECRETS["beta"],
                                   json={"model": MODEL, "namespace": "alpha", "tokens": tokens})
            assert status == 403
            assert (await b.lookup(tokens)).tokens == 0
            # Beta pre-stores "poison" under the same prompt and evicts all it can: alpha unaffected.
            poison = {k: b"poison" * 100 for k in mine}
            assert (await b.put(tokens, poison)).stored == len(poison)
            await b.evict(1 << 40)
            hit = await a.lookup(tokens)
            assert hit.tokens == 64
            with await a.get(hit) as got:
                assert sorted(bytes(v) for v in got.values()) == sorted(mine.values())
            # /stats and /metrics show only the caller's pools; the admin sees all of them.
            assert list((await b.stats())["pools"]) == [f"{MODEL}/beta"]
            _, text = await http(d, "GET", "/metrics", SECRETS["beta"])
            assert 'namespace="beta"' in text and "alpha" not in text
            _, text = await http(d, "GET", "/stats", ADMIN)
            assert "alpha" in text and "beta" in text
        # A data connection needs the tenant's own secret: another's, or none, is refused.
        for bad in (client(d, "alpha", secret=SECRETS["beta"]), client(d, None)):
            with pytest.raises(AccessDenied):
                await bad.connect()


async def test_a_raw_sender_must_prove_a_tenant_key():
    async with daemon(tenants=SECRETS) as d:
        fp = get_preset(MODEL).fingerprint
        for kwargs in ({}, {"secret": b"guess-guess", "key_id": "alpha"}, {"secret": b"beta-secret-22",
                                                                             "key_id": "alpha"}):
            with pytest.raises(KvlinkError):
                async with TransferClient("127.0.0.1", d.data_port, fp, FAST, **kwargs):
                    pass
        async with TransferClient("127.0.0.1", d.data_port, fp, FAST, secret=b"beta-secret-22", key_id="beta"):
            pass


async def test_namespaces_and_names_never_become_paths_outside_the_root(tmp_path):
    root = tmp_path / "root"
    async with daemon(root=str(root)) as d:
        for namespace in ("../../escape", "/tmp/escape-abs", "..", "a/../../escape2"):
            status, _ = await http(d, "POST", "/lookup", json={"model": MODEL, "namespace": namespace, "tokens": [1]})
            assert status == 403
        for model in ("../../escape3", "..", "/etc"):
            status, _ = await http(d, "POST", "/lookup", json={"model": model, "tokens": [1]})
            assert status in (400, 404)
        assert (await http(d, "POST", "/lookup", json={"model": MODEL, "tokens": [1]}))[0] == 200
        assert (root / MODEL / "default").is_dir()  # the one pool, where it belongs
        with pytest.raises(ConfigError):
            d.tier_dir(MODEL, "..")
        with pytest.raises(ConfigError):
            d.tier_dir("../x", "default")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "escape2").exists()
    assert not (tmp_path / "escape3").exists() and not Path("/tmp/escape-abs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    for bad in ({"../x": "0123456789"}, {".": "0123456789"}, {"a" * 65: "0123456789"}, {"ok": "short"}):
        with pytest.raises(ConfigError):
            DaemonConfig(tenants=bad)


def test_tenants_from_toml_and_an_open_public_daemon_is_refused(tmp_path):
    toml = tmp_path / "pool.toml"
    toml.write_text('[daemon]\nadmin_secret = "admin-secret-333"\n[tenants]\nalpha = "alpha-secret-1"\n')
    cfg = DaemonConfig.from_toml(toml)
    assert cfg.tenants == {"alpha": "alpha-secret-1"} and cfg.admin_secret == ADMIN
    toml.write_text('[tenants]\n"../up" = "alpha-secret-1"\n')
    with pytest.raises(ConfigError):
        DaemonConfig.from_toml(toml)
    with pytest.raises(ConfigError, match="allow_insecure"):
        PoolDaemon(DaemonConfig(host="0.0.0.0", http_port=0, data_port=0, receive_arena=1 << 20,
                                tenant_arena_bytes=1 << 20))


def test_no_secret_refuses_non_loopback_unless_allowed():
    with pytest.raises(ConfigError):
        Tenants.from_config(DaemonConfig(host="0.0.0.0"))
    assert Tenants.from_config(DaemonConfig(host="0.0.0.0", allow_insecure=True)).open
    assert not Tenants.from_config(DaemonConfig(host="0.0.0.0"), secret=b"one-secret").open
    assert Tenants.from_config(DaemonConfig(host="127.0.0.1")).open


async def test_one_tenant_holding_arena_reservations_does_not_starve_another():
    # Arena 8 MiB, 4 MiB per tenant; pools of 2 MiB: pieces beyond a pool's free pages land in the arena.
    from tests.integration.daemon_helpers import config

    pool = config().pool
    async with daemon(tenants=SECRETS, pool=type(pool)(**{**pool.__dict__, "host_bytes": 2 << 20})) as d:
        fp = get_preset(MODEL).fingerprint
        async with TransferClient("127.0.0.1", d.data_port, fp, FAST, secret=SECRETS["alpha"].encode(),
                                  key_id="alpha") as hog, client(d, "alpha") as a, client(d, "beta") as b:
            # Alpha begins a put and never finishes it: its part holds 3 MiB of the arena.
            held = hog.open(2, meta={"op": "put", "model": MODEL})
            held.add_part(1, b"\0" * (3 << 20))
            await asyncio.wait_for(_until(lambda: d._arena_used["alpha"] >= 3 << 20), 10)
            with pytest.raises(TransferRejected, match="tenant_arena_bytes"):
                # over alpha's share, though the arena has room
                await a.put(prompt(32), {(FULL, 0): b"\1" * (5 << 19)})
            # Beta proceeds: its pool's pages are taken, so its big piece lands in the arena.
            assert (await b.put(prompt(32, 1), {(FULL, 0): b"\2" * (1 << 20)})).stored == 1
            assert (await b.put(prompt(32, 2), {(FULL, 0): b"\3" * (3 << 19)})).stored == 1
            assert d._arena_used["beta"] == 0  # and its landing was given back


async def _until(predicate) -> None:
    """Wait (bounded by the caller's wait_for) until ``predicate()`` holds, yielding to the loop."""
    while not predicate():
        await asyncio.sleep(0.01)
