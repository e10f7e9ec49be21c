"""The decode side's local pool paths copy once and allocate nothing per entry: stores are packed
straight into pool pages (adopted, not copied), loads restore from the pages in place, and an
entry only the SSD holds is read into host pages that become its promoted copy. Every path is
bit-exact, and a corrupt entry raises a typed error that touches only the request's blocks."""

import random

import torch

import pytest

from kvlink.config import PoolConfig
from kvlink.engine import SyncDecodeSide
from kvlink.engine.pieces import pack_pieces, restore_pieces
from kvlink.errors import ChecksumMismatch, ConfigError
from kvlink.pool import Pool
from kvlink.serde import CacheRef, Packer, PagedCache
from tests.integration.test_engine_faults import SPEC

POOL_BLOCK = 64
TOKENS = list(range(1000, 1256))  # four pool blocks; the state checkpoint sits at the end


def cache(seed=None):
    return PagedCache.allocate(SPEC, 24, 16, num_slots=2, fill="zeros" if seed is None else "randn")


def packed(c, ref) -> bytes:
    return Packer(c).pack(ref).tobytes()


def stored_pool(tmp_path=None, **extra):
    cfg = PoolConfig(block_size=POOL_BLOCK, host_bytes=64 << 20, page_bytes=64 << 10, checkpoint_every=None,
                     ssd_dir=str(tmp_path / "ssd") if tmp_path else None, **extra)
    pool = Pool(SPEC, cfg)
    src, ref = cache(seed=1), CacheRef(list(range(16)), 256, 1)
    holder = SyncDecodeSide(src, pool=pool, arena_bytes=0)
    try:
        report = holder.store(TOKENS, ref)
    finally:
        holder.close()
    return pool, src, ref, report


def test_store_is_packed_into_pool_pages_and_load_restores_from_them():
    pool, src, src_ref, report = stored_pool()
    try:
        assert report.stored == 5 and pool.summary()["tiers"]["host"]["landed"] == 5  # adopted, no copy
        side = SyncDecodeSide(cache(), pool=pool)
        try:
            dst_ref = CacheRef(list(range(23, 7, -1)), 256, 0)
            assert side.load_from_pool(side.lookup(TOKENS), dst_ref) == 256
            assert packed(src, src_ref) == packed(side.side.cache, dst_ref)
        finally:
            side.close()
    finally:
        pool.close()


def test_entries_split_over_many_buffers_restore_bit_exact():
    """Entries whose bytes lie in several pieces (pool pages that are not adjacent, a daemon's
    reply) restore without being joined first."""
    src, ref = cache(seed=2), CacheRef(list(range(16)), 256, 1)
    pieces = pack_pieces(src, ref, POOL_BLOCK)
    pool = Pool(SPEC, PoolConfig(block_size=POOL_BLOCK, host_bytes=64 << 20, checkpoint_every=None))
    try:
        pool.store(TOKENS, pieces)
        hit = pool.lookup(TOKENS)
        whole = pool.fetch(hit)
        rng = random.Random(0)
        split = {}
        for key, view in whole.items():
            cuts = sorted({0, len(view), *(rng.randrange(1, len(view)) for _ in range(6))})
            split[key] = [bytes(view[a:b]) for a, b in zip(cuts, cuts[1:])]
        dst = cache()
        dst_ref = CacheRef(list(range(8, 24)), 256, 0)
        assert restore_pieces(dst, hit, split, dst_ref, POOL_BLOCK) == 256
        assert packed(src, ref) == packed(dst, dst_ref)
    finally:
        pool.close()


def test_ssd_only_entries_land_in_host_pages_as_their_promotion(tmp_path):
    pool, src, src_ref, report = stored_pool(tmp_path, write_mode="through")
    try:
        assert report.on_ssd == 5
        pool.evict(1 << 40)
        pool.drain()
        hit = pool.lookup(TOKENS)
        assert hit.tokens == 256 and all(pool.where("full", k) == ["ssd"] for k in hit.full)
        side = SyncDecodeSide(cache(), pool=pool)
        try:
            dst_ref = CacheRef(list(range(16, 24)) + list(range(8)), 256, 0)
            assert side.load_from_pool(hit, dst_ref) == 256
            assert packed(src, src_ref) == packed(side.side.cache, dst_ref)
        finally:
            side.close()
        assert pool.stats["promoted_in_place"] == 5
        assert all(pool.where("full", k) == ["host", "ssd"] for k in hit.full)
    finally:
        pool.close()


def test_a_corrupt_host_entry_raises_and_touches_only_the_requests_blocks():
    pool, _, _, _ = stored_pool()
    try:
        hit = pool.lookup(TOKENS)
        views, release = pool.pin_views([("full", hit.full[1])])
        views[0][-1][-5] ^= 0xFF  # a bit flip in memory, inside the last segment's bytes
        release()
        dst = cache()
        before = packed(dst, CacheRef(list(range(16, 24)), 128, 1))  # blocks and slot the load does not own
        side = SyncDecodeSide(dst, pool=pool)
        try:
            with pytest.raises(ChecksumMismatch, match="full entry"):
                side.load_from_pool(hit, CacheRef(list(range(16)), 256, 0))
            assert packed(dst, CacheRef(list(range(16, 24)), 128, 1)) == before
        finally:
            side.close()
    finally:
        pool.close()


def test_a_corrupt_ssd_entry_is_counted_and_the_load_told_to_look_up_again(tmp_path):
    """Regression: an SSD entry failing its checksum while the engine's load landed it was
    dropped by the SSD tier, read again, found missing, and never counted in the pool's
    ``corrupt`` (operators saw entries vanish, not corruption). Now it is counted and forgotten
    once; the load raises EntryMissing (a new lookup stops before the lost block)."""
    from kvlink.errors import EntryMissing

    pool, _, _, _ = stored_pool(tmp_path, write_mode="through")
    try:
        pool.evict(1 << 40)
        pool.drain()
        hit = pool.lookup(TOKENS)
        path, offset, _ = pool.ssd.locate(b"F" + hit.full[1])
        with open(path, "r+b") as f:
            f.seek(offset + 100)
            byte = f.read(1)[0]
            f.seek(offset + 100)
            f.write(bytes([byte ^ 0x10]))
        side = SyncDecodeSide(cache(), pool=pool)
        try:
            with pytest.raises(EntryMissing):
                side.load_from_pool(hit, CacheRef(list(range(16)), 256, 0))
        finally:
            side.close()
        assert pool.stats["corrupt"] == 1
        assert pool.lookup(TOKENS).kv_tokens == POOL_BLOCK
        assert all(e.pins == 0 for e in pool.index.entries())
    finally:
        pool.close()


def test_fetch_into_one_reused_buffer(tmp_path):
    """Pool.fetch(hit, out=...) reads every entry (host or SSD) into the caller's buffer, back to
    back, and SSD entries are promoted (copied into memory) before the buffer is reused."""
    pool, _, _, _ = stored_pool(tmp_path, write_mode="through")
    try:
        hit = pool.lookup(TOKENS)
        want = {k: bytes(v) for k, v in pool.fetch(hit).items()}
        buf = bytearray(pool.hit_nbytes(hit))
        got = pool.fetch(hit, out=buf)
        assert {k: bytes(v) for k, v in got.items()} == want
        assert all(memoryview(v).obj is buf or v.obj is buf for v in got.values())
        pool.evict(1 << 40)
        pool.drain()
        buf[:] = bytes(len(buf))
        assert {k: bytes(v) for k, v in pool.fetch(hit, out=buf).items()} == want  # from SSD
        assert all(pool.where("full", k)[0] == "host" for k in hit.full)  # promoted
        with pytest.raises(ConfigError):
            pool.fetch(hit, out=bytearray(len(buf) - 1))
    finally:
        pool.close()


def test_head_major_blocks_take_the_classic_path():
    """Regression: a cache whose blocks are head-major ([heads, block, dim] per block, as vLLM's
    CPU attention keeps them: a token's values are not adjacent) made every pool restore fail
    with "layout cannot be written by runs"; such planes now take the classic copy."""
    from kvlink.spec import CacheSpec, Layer, TokenTensor

    heads, dim, bs, nb = 2, 8, 16, 24
    spec = CacheSpec("head-major", tuple(Layer(tokens=(TokenTensor("k", (heads, dim), "float32"),
                                                       TokenTensor("v", (heads, dim), "float32"))) for _ in range(2)))

    def head_major(fill):
        tensors = {}
        for layer in range(2):
            for name in ("k", "v"):
                base = torch.randn(nb, heads, bs, dim) if fill else torch.zeros(nb, heads, bs, dim)
                tensors[(layer, name)] = base.permute(0, 2, 1, 3)  # [blocks, block, heads, dim], strided
        return PagedCache(spec, bs, tensors=tensors)

    src, dst = head_major(True), head_major(False)
    tokens = list(range(128))
    pool = Pool(spec, PoolConfig(block_size=POOL_BLOCK, host_bytes=16 << 20))
    try:
        ref = CacheRef(list(range(8)), 128, 0)
        holder, side = SyncDecodeSide(src, pool=pool), SyncDecodeSide(dst, pool=pool)
        try:
            assert holder.store(tokens, ref).stored == 2
            dst_ref = CacheRef(list(range(16, 24)), 128, 0)
            assert side.load_from_pool(side.lookup(tokens), dst_ref) == 128
            assert packed(src, ref) == packed(dst, dst_ref)
        finally:
            holder.close()
            side.close()
    finally:
        pool.close()


def test_a_failed_read_leaves_nothing_pinned(tmp_path, monkeypatch):
    """Regression: an error other than PoolError while an SSD entry was read left every entry of
    the call pinned for good (never evictable), as the caller never got release()."""
    pool, _, _, _ = stored_pool(tmp_path, write_mode="through")
    try:
        pool.evict(1 << 40)
        pool.drain()
        hit = pool.lookup(TOKENS)

        def broken(tkey, strict=False):
            raise RuntimeError("disk controller on fire")

        monkeypatch.setattr(pool, "_land_from_ssd", broken)
        with pytest.raises(RuntimeError):
            pool.pin_hit(hit)
        assert all(e.pins == 0 for e in pool.index.entries())
    finally:
        pool.close()
