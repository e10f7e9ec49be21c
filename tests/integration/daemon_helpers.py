"""Shared by the pool daemon tests: an in-process daemon on 127.0.0.1 (real sockets, the test's loop)."""

import contextlib
import os
import socket

from kvlink.config import DaemonConfig, PoolConfig, TransportConfig
from kvlink.daemon import PoolClient, PoolDaemon
from kvlink.pool.index import FULL, STATE

MODEL = "kimi-linear-48b-a3b"
SECRETS = {"alpha": "alpha-secret-1", "beta": "beta-secret-22"}
ADMIN = "admin-secret-333"
FAST = TransportConfig(connections=1, connect_timeout=1.0, reconnect_attempts=0)


def config(**overrides) -> DaemonConfig:
    pool = PoolConfig(block_size=16, host_bytes=4 << 20, page_bytes=4096)
    fields = dict(http_port=0, data_port=0, models=(MODEL,), pool=pool, receive_arena=8 << 20,
                  tenant_arena_bytes=4 << 20, host_budget_bytes=64 << 20)
    fields.update(overrides)
    return DaemonConfig(**fields)


@contextlib.asynccontextmanager
async def daemon(secret: bytes | None = None, **overrides):
    d = PoolDaemon(config(**overrides), secret, transport=FAST)
    await d.start()
    try:
        yield d
    finally:
        await d.close()


def client(d: PoolDaemon, tenant: str | None = None, secret: str | None = None, **kwargs) -> PoolClient:
    """A client of ``d`` as ``tenant`` (with its configured secret unless ``secret`` is given)."""
    if tenant is not None and secret is None:
        secret = SECRETS[tenant]
    return PoolClient(MODEL, http_port=d.http_port, data_port=d.data_port,
                      secret=None if secret is None else secret.encode(), tenant=tenant or "default",
                      transport=FAST, timeout=10.0, reply_arena=16 << 20, **kwargs)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def pieces(tokens: list[int], state_after=(), size: int = 1000) -> dict:
    out = {(FULL, b): os.urandom(size + b) for b in range(len(tokens) // 16)}
    out.update({(STATE, b): os.urandom(2 * size) for b in state_after})
    return out


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
