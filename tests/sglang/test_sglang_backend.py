"""KvlinkHiCacheStorage against SGLang 0.5.23's real storage classes: built by SGLang's own
StorageBackendFactory ('dynamic'), pages moved through the real MambaPoolHost and an MHA
layer-first host buffer, over an in-process Pool and a `kvlink pool serve` subprocess."""

import json
import subprocess
import sys

import pytest
import torch
from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo
from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig, PoolHitPolicy, PoolName,
                                                  PoolTransfer)
from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvlink.engine.sglang import KvlinkHiCacheStorage
from kvlink.errors import ConfigError
from kvlink.pool.index import FULL

MODEL = "kimi-linear-48b-a3b"  # full-attention KV and a linear-attention state: kv + mamba pools
LAYERS, HEADS, DIM, PAGE = 3, 2, 8, 4


class MhaHost:
    """SGLang's MHA host pool page API (``MHATokenToKVPoolHost``, layout ``layer_first``: buffer
    ``[2, layers, tokens, heads, dim]``, a page is ``page_size`` tokens of every layer). The real
    class cannot be imported on this CPU (its device-pool imports need a CUDA torchvision); these
    three methods are its own code for that layout."""

    def __init__(self, size: int, dtype=torch.bfloat16):
        self.page_size, self.dtype = PAGE, dtype
        self.kv_buffer = torch.zeros(2, LAYERS, size, HEADS, DIM, dtype=dtype)

    def get_data_page(self, index, flat=True):
        page = self.kv_buffer[:, :, index: index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self):
        return torch.zeros(2, LAYERS, self.page_size, HEADS, DIM, dtype=self.dtype).flatten()

    def set_from_flat_data_page(self, index, data_page):
        self.kv_buffer[:, :, index: index + self.page_size] = data_page.reshape(2, LAYERS, self.page_size, HEADS, DIM)


def mamba_host(slots: int = 8) -> MambaPoolHost:
    info = MambaStateBufferInfo(temporal=torch.zeros(2, slots, 2, 4, 4),
                                conv=(torch.zeros(2, slots, 8, 3, dtype=torch.bfloat16),))
    return MambaPoolHost(info, 2.0, 0, device_capacity=slots, pin_memory=False, device="cpu", layout="page_first")


def fill_random(host, seed):
    g = torch.Generator().manual_seed(seed)
    if isinstance(host, MhaHost):
        host.kv_buffer.copy_(torch.randn(host.kv_buffer.shape, generator=g))
        return
    for i in range(host.size):  # random bytes in every state slot, through the pool's own page API
        page = host.get_dummy_flat_data_page()
        page.copy_(torch.randint(0, 256, page.shape, generator=g, dtype=torch.uint8))
        host.set_from_flat_data_page(i, page)


def backend(extra: dict, mha=None, mamba=None) -> KvlinkHiCacheStorage:
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                  is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                                  model_name="test-model",
                                  extra_config={"backend_name": "kvlink", "module_path": "kvlink.engine.sglang",
                                                "class_name": "KvlinkHiCacheStorage", "model": MODEL, **extra})
    b = StorageBackendFactory.create_backend("dynamic", config, mha)
    b = getattr(b, "_backend", b)  # SGLang may wrap it in its failure injector
    assert isinstance(b, KvlinkHiCacheStorage) and isinstance(b, HiCacheStorage)
    b.register_mem_pool_host(mha)
    b.register_mem_host_pool_v2(mha, PoolName.KV)
    if mamba is not None:
        b.register_mem_host_pool_v2(mamba, PoolName.MAMBA)
    b.on_host_pools_registered()
    return b


def kv(keys, pages):
    return PoolTransfer(name=PoolName.KV, keys=keys, host_indices=torch.tensor(
        [p * PAGE + j for p in pages for j in range(PAGE)], dtype=torch.int64))


def mamba(keys, slots):
    return PoolTransfer(name=PoolName.MAMBA, keys=keys, host_indices=torch.tensor(slots, dtype=torch.int64),
                        hit_policy=PoolHitPolicy.TRAILING_PAGES)


def round_trip(extra):
    src_kv, src_m = MhaHost(8 * PAGE), mamba_host()
    fill_random(src_kv, 1)
    fill_random(src_m, 2)
    keys = [f"page-{i:02d}" for i in range(4)]
    w = backend(extra, src_kv, src_m)
    try:
        # KV of all 4 pages; the state only at page 1 (a checkpoint), not at the end
        assert w.batch_set_v2([kv(keys, [0, 1, 2, 3])]) == {"kv": [True] * 4}
        assert w.batch_set_v2([mamba([keys[1]], [5])]) == {"mamba": [True]}
        probe = mamba([keys[3]], [0])
        hit = w.batch_exists_v2(keys, [probe])
        assert (hit.kv_hit_pages, hit.restorable_prefix_pages) == (2, [2])  # stops at the checkpoint
        assert hit.extra_pool_hit_pages == {"kv": 4, "mamba": 2}
        assert w.batch_set_v2([mamba([keys[3]], [6])]) == {"mamba": [True]}
        assert w.batch_exists_v2(keys, [probe]).kv_hit_pages == 4
        assert w.batch_exists_v2(keys + ["page-unknown"], [probe]).kv_hit_pages == 4
        assert w.batch_exists(["nothing-" + k for k in keys]) == 0

        # another engine's host pools, other slots: bit-exact
        dst_kv, dst_m = MhaHost(8 * PAGE), mamba_host()
        r = w if "pool_url" not in extra else backend(extra, dst_kv, dst_m)
        if r is w:
            w.registered_pools.update({"kv": dst_kv, "mamba": dst_m})
        got = r.batch_get_v2([kv(keys, [7, 6, 5, 4]), mamba([keys[3]], [1])])
        assert got == {"kv": [True] * 4, "mamba": [True]}
        for s, d in zip([0, 1, 2, 3], [7, 6, 5, 4]):
            assert torch.equal(dst_kv.get_data_page(d * PAGE), src_kv.get_data_page(s * PAGE))
        assert torch.equal(dst_m.get_data_page(1), src_m.get_data_page(6))
        assert r.batch_get_v2([kv(["page-unknown"], [0])]) == {"kv": [False]}
        if r is not w:
            r.close()
        return w
    except BaseException:
        w.close()
        raise


def test_in_process_pool_round_trip_and_trailing_pages(tmp_path):
    round_trip({"pool_dir": str(tmp_path / "ssd"), "block_size": 16}).close()


def test_corrupted_entry_is_a_miss():
    src = MhaHost(4 * PAGE)
    fill_random(src, 3)
    b = backend({"block_size": 16}, src)
    try:
        assert b.batch_set_v2([kv(["a", "b"], [0, 1])]) == {"kv": [True, True]}
        views, release = b.store.pool.pin_views([(FULL, b._pool_key(b._tokens("b")))])
        try:
            views[0][-1][-1] ^= 0xFF  # flip the stored page's last byte where the tier keeps it
        finally:
            release()
        dst = MhaHost(4 * PAGE)
        b.registered_pools["kv"] = dst
        assert b.batch_get_v2([kv(["a", "b"], [2, 3])]) == {"kv": [True, False]}
        assert torch.equal(dst.get_data_page(2 * PAGE), src.get_data_page(0))
        assert not dst.get_data_page(3 * PAGE).any()  # the corrupt page wrote nothing
    finally:
        b.close()


def test_v1_calls_round_trip():
    src = MhaHost(4 * PAGE)
    fill_random(src, 4)
    b = backend({"block_size": 16}, src)
    try:
        idx = torch.arange(2 * PAGE)
        assert b.batch_set_v1(["x", "y"], idx) == [True, True]
        assert b.batch_exists(["x", "y", "z"]) == 2 and b.exists("y") and not b.exists("z")
        out = b.get("y", torch.zeros(2 * LAYERS * PAGE * HEADS * DIM, dtype=torch.bfloat16))
        assert torch.equal(out, src.get_data_page(PAGE))
        assert b.get("z", torch.zeros(4)) is None
    finally:
        b.close()


def test_config_errors_are_typed():
    with pytest.raises(ConfigError):
        backend({"model": 7})
    with pytest.raises(ConfigError):
        backend({"block_size": 2})
    b = backend({"block_size": 16, "model": "llama-3-70b"}, MhaHost(PAGE))
    try:
        with pytest.raises(ConfigError, match="state"):
            b.register_mem_host_pool_v2(mamba_host(), PoolName.MAMBA)  # a preset without state layers
    finally:
        b.close()


@pytest.fixture
def daemon(tmp_path):
    config = tmp_path / "pool.toml"
    config.write_text(f'[daemon]\nmodels = ["{MODEL}"]\n[pool]\nblock_size = 16\n'
                      f'host_bytes = {64 << 20}\npage_bytes = {64 << 10}\n')
    proc = subprocess.Popen([sys.executable, "-m", "kvlink.cli", "pool", "serve", "--config", str(config),
                             "--http-port", "0", "--data-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        yield json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_daemon_round_trip_and_trailing_pages(daemon):
    extra = {"pool_url": f"http://127.0.0.1:{daemon['http_port']}", "data_port": daemon["data_port"],
             "timeout": 10.0}
    round_trip(extra).close()
