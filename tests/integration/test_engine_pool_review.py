"""Review findings on the engine API and the pool (issue 15 review: 7, 8, 9 HostBudget, 10)."""

import errno
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from kvlink.config import PoolConfig
from kvlink.daemon import PoolClient
from kvlink.engine.decode import DecodeSide, SyncDecodeSide
from kvlink.engine.prefill import SyncPrefillSide
from kvlink.errors import PoolError, ResourceLimit, TransportError
from kvlink.pool.budget import HostBudget
from kvlink.pool.index import FULL
from kvlink.pool.pool import Pool
from kvlink.pool.ssd import SsdTier
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, PagedCache
from tests.integration.daemon_helpers import FAST, MODEL, SECRETS, daemon, free_port
from tests.integration.daemon_helpers import client as tenant_client
from tests.integration.daemon_helpers import pieces as tenant_pieces
from tests.integration.test_transfer_lifecycle import TINY, paged


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("kvlink-decode", "kvlink-prefill")]


# -- finding 7: a sync wrapper whose construction fails leaves no thread behind -------------------
def test_failed_sync_starts_leave_no_loop_thread():
    before = _loop_threads()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for _ in range(5):
            with pytest.raises(TransportError, match="cannot listen"):
                SyncDecodeSide(paged(TINY, 4, 0), port=port)
    for _ in range(5):
        with pytest.raises(TypeError):
            SyncPrefillSide(paged(TINY, 4, 0), no_such_option=1)
    assert _loop_threads() == before
    # and a working one still starts and closes cleanly
    side = SyncDecodeSide(paged(TINY, 4, 0))
    side.close()
    assert _loop_threads() == before


# -- finding 10: a full disk is told by errno, not by matching words -------------------------------
def test_disk_full_is_told_by_errno_not_words(tmp_path):
    with SsdTier(tmp_path, 1 << 20) as tier:
        # EOVERFLOW's text says "too large" but the disk is not full: an error, not a refusal.
        with pytest.raises(PoolError, match="write failed"):
            tier._write_failed(OSError(errno.EOVERFLOW, os.strerror(errno.EOVERFLOW)))
        with pytest.raises(PoolError):
            tier._write_failed(Exception("Invalid argument: value too large"))  # rocksdict, not a full disk
        assert tier.stats["disk_full"] == 0
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            assert tier._write_failed(OSError(code, os.strerror(code))) is False
        try:  # an OSError down the cause chain counts by its errno
            raise Exception("flush failed") from OSError(errno.ENOSPC, "x")
        except Exception as exc:
            assert tier._write_failed(exc) is False
        # rocksdict's bare Exception carries only RocksDB's text, which embeds strerror(ENOSPC)
        assert tier._write_failed(Exception(f"IO error: {os.strerror(errno.ENOSPC)}: While appending")) is False
        assert tier.stats["disk_full"] == 5


_FSIZE_CHILD = """
import resource, signal, sys
from kvlink.pool.ssd import SsdTier
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
tier = SsdTier(sys.argv[1], 1 << 30)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
big = tier.put(b"k" * 16, bytes(2 << 20))
small = tier.put(b"s" * 16, bytes(4096))
print(big, small, tier.stats["disk_full"], tier.last_refusal.split(" (")[0])
tier.close()
"""


def test_a_file_size_limit_refuses_the_put_and_the_tier_keeps_working(tmp_path):
    out = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "1", "disk", "full"]


# -- finding 9: a pool's host quota is guaranteed, or refused at creation --------------------------
def _cfg(**kw) -> PoolConfig:
    return PoolConfig(**{**dict(block_size=16, host_bytes=128 << 10, page_bytes=4096, chunk_bytes=16 << 10,
                                policy="lru"), **kw})


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 50000 for i in range(n)]


def test_late_tenant_gets_its_full_quota_or_a_typed_refusal_never_starvation():
    spec = get_preset("kimi-linear-48b-a3b")
    budget = HostBudget(512 << 10)
    early = [Pool(spec, _cfg(namespace=f"early-{i}"), budget=budget) for i in range(4)]  # 4 x 128 KiB
    try:
        for i, pool in enumerate(early):  # the first tenants fill their quotas (the whole budget)
            tokens = _prompt(32 * 16, i)
            pool.store(tokens, {(FULL, b): os.urandom(4000) for b in range(32)})
        assert budget.used_bytes == budget.total_bytes
        with pytest.raises(ResourceLimit, match="host_budget_bytes"):  # not a pool that can never store
            Pool(spec, _cfg(namespace="late"), budget=budget)
        assert budget.reserved_bytes == budget.total_bytes  # the refusal reserved nothing
        early.pop().close()  # a tenant leaves: its quota (and memory) go back
        late = Pool(spec, _cfg(namespace="late"), budget=budget)
        early.append(late)
        tokens = _prompt(32 * 16, 99)
        report = late.store(tokens, {(FULL, b): os.urandom(4000) for b in range(32)})
        assert report.stored == 32 and not report.failed and len(late.levels[-1][1]) == 32  # its whole quota
    finally:
        for pool in early:
            pool.close()
    assert budget.reserved_bytes == 0 and budget.used_bytes == 0


# -- finding 8: checkpoint_every holds through the daemon -----------------------------------------
def _state_bytes(cache, slot: int) -> bytes:
    return b"".join(bytes(t[slot].contiguous().view(torch.uint8).reshape(-1).numpy())
                    for pools in (cache.conv, cache.recurrent) for t in pools.values())


async def test_through_a_daemon_an_edited_turn_hits_the_checkpoint_taken_mid_request():
    spec = get_preset(MODEL)  # a real hybrid layout: 43 MB of linear-attention state per checkpoint
    pool = PoolConfig(block_size=16, host_bytes=192 << 20, page_bytes=1 << 20, chunk_bytes=32 << 20,
                      checkpoint_every=2)
    async with daemon(pool=pool, receive_arena=96 << 20, tenant_arena_bytes=64 << 20,
                      host_budget_bytes=256 << 20) as d:
        async with PoolClient(MODEL, http_port=d.http_port, data_port=d.data_port, transport=FAST, timeout=20.0,
                              reply_arena=64 << 20) as pool_client:
            torch.manual_seed(5)
            src = PagedCache.allocate(spec, 8, 16, num_slots=2)
            dst = PagedCache.allocate(spec, 8, 16, num_slots=1)
            engine = DecodeSide(src, pool=pool_client, pool_block_size=16)
            other = DecodeSide(dst, pool=pool_client, pool_block_size=16)
            turn = list(range(1000, 1100))  # prompt and generated tokens of one request
            blocks, slot = list(range(7)), 1
            positions = engine.checkpoint_positions(len(turn))
            assert positions == [32, 64, 96]  # the daemon's checkpoint_every, not only the last boundary
            assert engine.checkpoint_positions(len(turn), start=40) == [64, 96]
            snapshots = {}
            for pos in positions:  # the engine stands at each position in turn, its state moved on
                for pools in (src.conv, src.recurrent):
                    for t in pools.values():
                        t[slot].normal_()
                report = await engine.store_state(turn, CacheRef(blocks, pos, slot))
                assert (report.stored, report.failed) == (1, 0)
                snapshots[pos] = _state_bytes(src, slot)
            assert (await engine.store(turn, CacheRef(blocks, len(turn), slot))).stored == 6  # KV of 6 blocks

            edited = turn[:80] + list(range(9000, 9040))  # the user edits the turn after token 80
            hit = await other.lookup(edited)
            assert hit.tokens == 64  # with only the last boundary (96) checkpointed: 0
            dst_ref = CacheRef(list(range(4)), 64, 0)
            assert await other.load_from_pool(hit, dst_ref) == 64
            assert _state_bytes(dst, 0) == snapshots[64]
            await engine.close()
            await other.close()


async def test_a_daemon_refuses_a_tenant_whose_quota_it_cannot_guarantee():
    async with daemon(tenants=SECRETS, host_budget_bytes=4 << 20) as d:  # room for one 4 MiB quota
        tokens = _prompt(64, 1)
        async with tenant_client(d, "alpha") as alpha, tenant_client(d, "beta") as beta:
            assert (await alpha.put(tokens, tenant_pieces(tokens, state_after=[3]))).stored == 5
            with pytest.raises(ResourceLimit, match="host budget"):
                await beta.lookup(tokens)
            with pytest.raises(ResourceLimit, match="host budget"):
                await beta.put(tokens, tenant_pieces(tokens, state_after=[3]))
            assert (await alpha.lookup(tokens)).tokens == 64  # the first tenant keeps its whole quota


async def test_checkpoint_positions_without_the_daemons_settings_fail_typed():
    async with daemon() as d:
        lost = PoolClient(MODEL, http_port=free_port(), data_port=d.data_port, transport=FAST, timeout=2.0)
        with pytest.raises(PoolError, match="not connected"):
            lost.checkpoint_positions(100)
        async with lost:  # the data side connects; the HTTP side (and so /health) is gone
            with pytest.raises(PoolError, match="settings are unknown"):
                lost.checkpoint_positions(100)
