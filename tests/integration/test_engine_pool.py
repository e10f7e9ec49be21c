"""The decode side's prefix pool: local (in-process Pool, through the synchronous wrapper) and
remote (the `kvlink pool serve` daemon as a real subprocess). A stored prompt restores bit-exact
into other blocks and another slot; a longer prompt hits only up to the state checkpoint."""

import json
import subprocess
import sys

import torch

from kvlink.config import PoolConfig
from kvlink.daemon import PoolClient
from kvlink.engine import DecodeSide, SyncDecodeSide
from kvlink.pool import Pool
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, Packer, PagedCache
from tests.integration.test_engine_faults import SPEC

POOL_BLOCK = 64


def cache(spec, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return PagedCache.allocate(spec, 24, 16, num_slots=2, fill="zeros" if seed is None else "randn")


def same(a, a_ref, b, b_ref) -> bool:
    return Packer(a).pack(a_ref).tobytes() == Packer(b).pack(b_ref).tobytes()


def test_local_pool_through_the_sync_wrapper():
    tokens = list(range(1000, 1128))  # two pool blocks: the state checkpoint sits at the end
    src, src_ref = cache(SPEC, seed=1), CacheRef(list(range(8)), 128, 1)
    pool = Pool(SPEC, PoolConfig(block_size=POOL_BLOCK, host_bytes=64 << 20, checkpoint_every=None))
    side = SyncDecodeSide(cache(SPEC), pool=pool)
    try:
        # the decode side that loaded the request keeps it...
        holder = SyncDecodeSide(src, pool=pool)
        assert holder.store(tokens, src_ref).stored == 3  # one full-KV entry per pool block, one state
        holder.close()
        # ...and a later request with the same prefix restores it into other blocks and slot
        longer = tokens + list(range(5000, 5100))
        hit = side.lookup(longer)
        assert hit.tokens == 128 and "whole prompt" not in hit.stopped
        dst_ref = CacheRef(list(range(23, 15, -1)), 128, 0)
        assert side.load_from_pool(hit, dst_ref) == 128
        assert same(src, src_ref, side.side.cache, dst_ref)
    finally:
        side.close()


async def test_remote_pool_daemon(tmp_path):
    model = "kimi-linear-48b-a3b"
    spec = get_preset(model)
    config = tmp_path / "pool.toml"
    config.write_text(f'[daemon]\nmodels = ["{model}"]\n[pool]\nblock_size = {POOL_BLOCK}\n'
                      f'host_bytes = {512 << 20}\npage_bytes = {1 << 20}\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(config),
                             "--http-port", "0", "--data-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        tokens = [(i * 37) % 30000 for i in range(128)]
        src, src_ref = cache(spec, seed=2), CacheRef(list(range(8)), 128, 1)
        async with PoolClient(model, http_port=ports["http_port"], data_port=ports["data_port"]) as a, \
                PoolClient(model, http_port=ports["http_port"], data_port=ports["data_port"]) as b:
            writer = DecodeSide(src, pool=a, pool_block_size=POOL_BLOCK)
            assert (await writer.store(tokens, src_ref)).stored > 0
            reader = DecodeSide(cache(spec), pool=b, pool_block_size=POOL_BLOCK)
            hit = await reader.lookup(tokens + [7, 7, 7])
            assert hit.tokens == 128
            dst_ref = CacheRef(list(range(20, 12, -1)), 128, 0)
            assert await reader.load_from_pool(hit, dst_ref) == 128
            assert same(src, src_ref, reader.cache, dst_ref)
            await writer.close()
            await reader.close()
    finally:
        proc.kill()
        proc.wait()
