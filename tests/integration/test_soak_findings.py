"""Findings of the soak benchmark (docs/soak.md): the daemon's log under hostile HTTP, the host
tier's page reuse, and per-layer packing cost on a many-layer model."""

import asyncio
import contextlib
import logging
import os
import time

import aiohttp

from kvlink.daemon.http import AIOHTTP_LOG, ClientErrorLog
from kvlink.pool.slab import SlabTier
from kvlink.presets import get_preset
from kvlink.spec import CacheSpec

from tests.integration.daemon_helpers import daemon


class _Capture(logging.Handler):
    """Every record of WARNING and above, formatted as the daemon's stderr handler would."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.changed: asyncio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))
        if self.changed is not None:
            self.changed.set()


@contextlib.contextmanager
def _captured():
    handler, root = _Capture(), logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


async def _exchange(port: int, data: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(), 5)
    except ConnectionResetError:  # the server answered and closed with our bytes unread: an RST
        return b""
    finally:
        w.close()


async def _cut_body(port: int) -> None:
    """A POST announcing a 100 KB body, a few bytes of it, then a hard close (RST)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{\"model\"")
    await w.drain()
    w.transport.abort()


async def test_hostile_http_logs_short_lines_at_a_bounded_rate_and_the_daemon_still_answers():
    limit = 12
    with _captured() as cap:
        async with daemon(client_error_log_per_minute=limit) as d:
            cap.changed = asyncio.Event()
            for _ in range(6):  # slow bodies cut by the client: the handler sees ConnectionResetError
                await _cut_body(d.http_port)
            # Each cut body is logged once its connection's loss reaches the handler: wait for them.
            async with asyncio.timeout(10):
                while sum("ConnectionResetError" in line for line in cap.lines) < 6:
                    cap.changed.clear()
                    await cap.changed.wait()
            long_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"
            answers = []
            for start in range(0, 200, 20):  # aiohttp logs before it answers or closes: all are logged
                answers += await asyncio.gather(*(_exchange(d.http_port, long_header) for _ in range(20)))
            statuses = [a.split(b" ")[1:2] for a in answers]  # [] when the server closed first
            assert all(s in ([b"400"], []) for s in statuses) and [b"400"] in statuses
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{d.http_port}/health") as resp:
                    assert resp.status == 200 and (await resp.json())["ok"] is True
    text = "\n".join(cap.lines)
    assert "Traceback" not in text and all(r.exc_info is None for r in cap.records)
    assert len(cap.lines) <= limit, text
    assert sum("LineTooLong" in line for line in cap.lines) == limit - 6
    assert all(len(line) < 400 for line in cap.lines)
    assert not any(isinstance(f, ClientErrorLog) for f in AIOHTTP_LOG.filters)  # removed on close


def test_client_error_log_summarises_what_it_suppressed_and_leaves_server_errors_alone():
    now = [0.0]
    noise = ClientErrorLog(2, clock=lambda: now[0])

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException as e:
            info = (type(e), e, e.__traceback__)
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                 ("127.0.0.1",), info)

    passed = [noise.filter(record(ConnectionResetError("Connection lost"))) for _ in range(5)]
    assert passed == [True, True, False, False, False] and noise.suppressed == 3
    bug = record(RuntimeError("a real bug"))
    assert noise.filter(bug) and bug.exc_info is not None and bug.levelno == logging.ERROR  # untouched
    now[0] = 61.0
    line = record(ConnectionResetError("Connection lost"))
    assert noise.filter(line) and line.exc_info is None and line.levelno == logging.WARNING
    assert line.getMessage() == ("Error handling request from 127.0.0.1: ConnectionResetError: Connection lost"
                                 " (3 similar lines suppressed in the last minute)")


def test_a_tier_reuses_freed_pages_instead_of_walking_through_all_of_them():
    tier = SlabTier(1024 * 4096, page_bytes=4096)
    live: list[bytes] = []
    seen: set[int] = set()
    for i in range(3000):
        key = i.to_bytes(4, "little")
        size = 4096 * (1 + i % 3) - 7
        if i % 2:  # half the entries land through a reserved run of adjacent pages
            landing = tier.reserve(size)
            assert landing is not None
            landing.view[:] = os.urandom(size)
            tier.adopt(key, landing)
        else:
            assert tier.put(key, os.urandom(size))
        seen.update(tier.entry(key).pages)
        live.append(key)
        if len(live) > 8:
            assert tier.delete(live.pop(0))
    for key in live:
        assert len(tier.get(key)) == tier.entry(key).nbytes
    # 8 live entries of at most 3 pages: a working set of 24 pages, plus room to land a run.
    assert len(seen) <= 24 + 8, sorted(seen)
    assert tier.used_bytes == sum(len(tier.entry(k).pages) for k in live) * 4096


def test_a_specs_fingerprint_is_computed_once_not_per_packed_layer():
    spec = get_preset("deepseek-v3")  # 61 layers: packing reads the fingerprint once per layer
    fresh = []
    for _ in range(3):
        copy = CacheSpec.from_dict(spec.to_dict())
        t = time.perf_counter()
        copy.fingerprint
        fresh.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(200):
        assert spec.fingerprint == copy.fingerprint
    reads = time.perf_counter() - t
    assert reads < 20 * min(fresh), (reads, fresh)  # recomputing costs ~200x one computation
