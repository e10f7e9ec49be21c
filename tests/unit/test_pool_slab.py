"""The slab memory tier: pages in one preallocated buffer, verified reads."""

import os

import pytest
import torch

from kvlink.errors import ChecksumMismatch, ConfigError, LengthError, PoolError
from kvlink.pool.slab import SlabTier


def test_roundtrip_across_pages_and_replace():
    tier = SlabTier(64 << 10, page_bytes=4096)
    data = os.urandom(10_000)  # 3 pages
    assert tier.put(b"a", data)
    assert len(tier.entry(b"a").pages) == 3 and tier.used_bytes == 3 * 4096
    assert bytes(tier.get(b"a").numpy()) == data
    out = bytearray(10_000)
    tier.get(b"a", out=out)
    assert bytes(out) == data
    assert tier.put(b"a", b"short")  # replaces, frees the old pages
    assert bytes(tier.get(b"a").numpy()) == b"short" and tier.used_bytes == 4096
    assert tier.put(b"empty", b"") and tier.get(b"empty").numel() == 0


def test_list_of_buffers_is_stored_back_to_back_and_verifies():
    import xxhash

    tier = SlabTier(64 << 10, page_bytes=4096)
    parts = [os.urandom(100), os.urandom(5000), b"", os.urandom(4096), memoryview(os.urandom(7))]
    whole = b"".join(bytes(p) for p in parts)
    assert tier.put(b"l", parts)  # spans straddle page ends
    assert tier.entry(b"l").nbytes == len(whole) and len(tier.entry(b"l").pages) == 3
    assert tier.entry(b"l").digest == xxhash.xxh3_64_intdigest(whole)
    assert bytes(tier.get(b"l").numpy()) == whole


def test_full_tier_refuses_then_accepts_after_delete():
    tier = SlabTier(16 << 10, page_bytes=4096)
    assert tier.put(b"x", bytes(12_000))
    assert not tier.put(b"y", bytes(8192))  # needs 2 pages, 1 left
    assert tier.stats["put_full"] == 1
    assert tier.delete(b"x") and not tier.delete(b"x")
    assert tier.put(b"y", bytes(8192))


def test_corrupt_entry_is_dropped_never_returned():
    tier = SlabTier(64 << 10, page_bytes=4096)
    tier.put(b"k", os.urandom(5000))
    page = tier.entry(b"k").pages[1]
    tier._page(page)[10] ^= 0xFF  # a bit flip in the stored bytes
    with pytest.raises(ChecksumMismatch):
        tier.get(b"k")
    assert b"k" not in tier and tier.stats["corrupt"] == 1
    with pytest.raises(PoolError):
        tier.get(b"k")


def test_device_tier_takes_tensors_and_checks_sizes():
    tier = SlabTier(1 << 20, page_bytes=64 << 10, device="cpu")  # the GPU tier's code path, on CPU
    kv = torch.randn(300, 128, dtype=torch.bfloat16)
    assert tier.put(b"kv", kv)
    back = tier.get(b"kv").view(torch.bfloat16).view(300, 128)
    assert torch.equal(back, kv)
    with pytest.raises(LengthError):
        tier.get(b"kv", out=bytearray(10))
    with pytest.raises(ConfigError):
        SlabTier(100, page_bytes=4096)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tier_roundtrip():
    tier = SlabTier(8 << 20, page_bytes=1 << 20, device="cuda")
    data = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device="cuda")
    assert tier.put(b"g", data)
    assert torch.equal(tier.get(b"g").cuda(), data)


def test_landing_is_adopted_without_a_copy_or_handed_back():
    tier = SlabTier(64 << 10, page_bytes=4096)
    assert tier.put(b"a", bytes(4096)) and tier.put(b"b", bytes(4096)) and tier.delete(b"a")
    landing = tier.reserve(10_000)  # 3 adjacent pages, while page 0 is free on its own
    pages = landing.pages
    assert pages == tuple(range(pages[0], pages[0] + 3)) and 0 not in pages
    data = os.urandom(10_000)
    landing.view[:] = data
    tier.adopt(b"l", landing)
    landing.release()  # a no-op once adopted
    assert tier.entry(b"l").pages == pages and bytes(tier.get(b"l").numpy()) == data
    assert tier.stats["adopted"] == 1
    with pytest.raises(PoolError):
        tier.adopt(b"again", landing)
    free = tier.capacity - tier.used_bytes
    unused = tier.reserve(5000)
    assert tier.capacity - tier.used_bytes == free - 2 * 4096  # reserved pages are not free
    unused.release()
    unused.release()
    assert tier.capacity - tier.used_bytes == free and b"again" not in tier
    assert tier.reserve(tier.capacity) is None and tier.stats["reserve_missed"] == 1
    with pytest.raises(ConfigError):
        SlabTier(64 << 10, page_bytes=4096).adopt(b"x", tier.reserve(10))


def test_landing_finds_a_run_in_a_fragmented_tier():
    tier = SlabTier(8 * 4096, page_bytes=4096)
    for i in range(8):
        assert tier.put(bytes([i]), bytes(4096))
    for i in (1, 3, 4, 5):
        tier.delete(bytes([i]))
    assert tier.reserve(3 * 4096).pages == (3, 4, 5)  # page 1 is free but not adjacent to a run
    assert tier.reserve(2 * 4096) is None
    assert tier.reserve(4096).pages == (1,)


def test_views_are_one_buffer_for_adjacent_pages_and_in_entry_order_otherwise():
    tier = SlabTier(8 * 4096, page_bytes=4096)
    data = os.urandom(3 * 4096 - 10)
    assert tier.put(b"a", data)  # pages 0, 1, 2
    assert len(tier.views(b"a")) == 1 and bytes(tier.views(b"a")[0]) == data
    for i in range(3, 8):
        tier.put(bytes([i]), bytes(4096))  # pages 3..7
    tier.delete(b"a")
    tier.delete(bytes([4]))
    # Most recently freed first: 4, then 0, 1, 2: a new entry's pages are not in ascending order
    other = os.urandom(4 * 4096)
    assert tier.put(b"b", other) and tier.entry(b"b").pages == (4, 0, 1, 2)
    views = tier.views(b"b")
    assert len(views) == 4 and b"".join(bytes(v) for v in views) == other


def test_landing_never_spans_past_the_tiers_smaller_last_chunk():
    """Regression: a reservation that allocated the tier's last chunk, smaller than the others,
    got that chunk's few pages for a bigger entry, and a view shorter than the entry."""
    tier = SlabTier(5 * 4096, page_bytes=4096, chunk_bytes=4 * 4096)  # chunks of 4 pages, then 1
    first = tier.reserve(4 * 4096)
    assert len(first.pages) == 4 and first.view.nbytes == 4 * 4096
    assert tier.reserve(3 * 4096) is None  # only the 1-page chunk is left
    single = tier.reserve(4096)
    assert single is not None and single.view.nbytes == 4096
