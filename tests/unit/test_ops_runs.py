"""Fused copy-and-hash runs (csrc/cpu/runs.c) against the pure-Python reference and plain copies."""

import random

import numpy as np
import pytest
import torch
import xxhash

from kvlink.config import CodecConfig
from kvlink.errors import ConfigError
from kvlink.ops import runs as runs_mod
from kvlink.ops.runs import Runs, buffer_pieces, reference_plane, slice_pieces
from kvlink.serde import CacheRef, Packer, PagedCache, Unpacker

from .helpers import HYBRID, filled, random_ref, same, snapshot

pytestmark = pytest.mark.skipif(not runs_mod.native_available(), reason="no C compiler for the native runs")


def _cuts(buf: torch.Tensor, rng: random.Random, order=None):
    """Pieces over ``buf`` cut at random places (optionally listed in another order)."""
    n = buf.numel()
    points = sorted({0, n, *(rng.randrange(n) for _ in range(rng.randrange(1, 12)))})
    spans = list(zip(points, points[1:]))
    addr = np.array([buf.data_ptr() + a for a, _ in spans], np.int64)
    lens = np.array([b - a for a, b in spans], np.int64)
    return addr, lens, spans


@pytest.mark.parametrize("seed", range(8))
def test_generic_runs_copy_and_hash_like_the_reference(seed, monkeypatch):
    rng = random.Random(seed)
    jobs = []
    runs, ref = Runs(), Runs()
    for _ in range(rng.randrange(1, 5)):
        n = rng.randrange(1, 600_000)
        src = torch.randint(0, 256, (n,), dtype=torch.uint8)
        dsts = [torch.zeros(n, dtype=torch.uint8) for _ in range(2)]
        s_addr, s_lens, _ = _cuts(src, rng)
        for r, dst in zip((runs, ref), dsts):
            d_addr, d_lens, _ = _cuts(dst, rng)
            r.add((s_addr, s_lens), (d_addr, d_lens))
        jobs.append((src, dsts))
    got = runs.run()

    def unavailable():
        raise runs_mod.BackendUnavailable("the reference path, as without a compiler")

    monkeypatch.setattr(runs_mod.native, "cpu_lib", unavailable)
    want = ref.run()  # the same jobs through the Python reference
    assert got == want == [xxhash.xxh3_64_intdigest(src.numpy().tobytes()) for src, _ in jobs]
    for src, dsts in jobs:
        assert all(torch.equal(src, dst) for dst in dsts)


def test_hash_only_and_copy_only():
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    runs = Runs()
    runs.add(buffer_pieces(src))
    assert runs.run(copy=False) == [xxhash.xxh3_64_intdigest(src.numpy().tobytes())]
    runs = Runs()
    runs.add(buffer_pieces(src), buffer_pieces(dst))
    assert runs.run(hash=False) == [0] and torch.equal(src, dst)


def test_mismatched_lengths_are_refused():
    a, b = torch.zeros(10, dtype=torch.uint8), torch.zeros(11, dtype=torch.uint8)
    with pytest.raises(ConfigError):
        Runs().add(buffer_pieces(a), buffer_pieces(b))


@pytest.mark.parametrize("scatter", [False, True])
def test_plane_jobs_match_the_reference_and_plain_indexing(scatter):
    rng = random.Random(int(scatter))
    num_blocks, bs, tok = 12, 4, 24  # bytes per token
    plane = torch.randint(0, 256, (num_blocks, bs * tok + 8), dtype=torch.uint8)[:, :bs * tok]  # strided rows
    ids = np.array(rng.sample(range(num_blocks), 6), np.int64)
    t0, t1 = 3, 21  # a partial first and last block
    flat = torch.randint(0, 256, ((t1 - t0) * tok,), dtype=torch.uint8)
    expect_rows = plane.clone()
    tokens = [(int(ids[t // bs]), t % bs) for t in range(t0, t1)]
    if scatter:
        for i, (b, o) in enumerate(tokens):
            expect_rows[b, o * tok:(o + 1) * tok] = flat[i * tok:(i + 1) * tok]
        packed = flat.clone()
    else:
        packed = torch.cat([plane[b, o * tok:(o + 1) * tok] for b, o in tokens])
        flat.zero_()
    runs = Runs()
    at = runs.block_ids(ids)
    job = (flat.data_ptr(), plane.data_ptr(), plane.stride(0), bs * tok, (t0 % bs) * tok, (t1 - t0) * tok,
           at + t0 // bs, scatter)
    runs.add_plane(*job)
    ids_all = np.concatenate([np.zeros(1, np.int64), ids])
    digest = runs.run()[0]
    assert digest == xxhash.xxh3_64_intdigest(packed.numpy().tobytes())
    if scatter:
        assert torch.equal(plane, expect_rows)
    else:
        assert torch.equal(flat, packed)
    assert reference_plane(job, ids_all, 1) == digest  # hash only: the reference agrees


def test_slice_pieces():
    addr, lens = np.array([100, 500, 900], np.int64), np.array([10, 20, 30], np.int64)
    assert [a.tolist() for a in slice_pieces((addr, lens), 5, 30)] == [[105, 500, 900], [5, 20, 5]]
    assert [a.tolist() for a in slice_pieces((addr, lens), 10, 20)] == [[500], [20]]
    assert [a.tolist() for a in slice_pieces((addr[:1], lens[:1]), 2, 3)] == [[102], [3]]
    with pytest.raises(ConfigError):
        slice_pieces((addr, lens), 50, 20)


@pytest.mark.parametrize("layout", ["blocks_first", "kv_first", "split"])
def test_fused_pack_and_unpack_are_bit_exact_with_the_classic_path(layout):
    src = PagedCache.allocate(HYBRID, 16, 4, 3, layout=layout, fill="randn")
    ref = random_ref(16, 4, 22, slot=1, seed=3)
    part = CacheRef(ref.block_ids, 22, 1, token_start=8)
    for r in (ref, part):
        fused = Packer(src).pack(r).tobytes()
        assert fused == Packer(src, backend="reference").pack(r).tobytes()
        a = PagedCache.allocate(HYBRID, 16, 4, 3, layout=layout, fill="zeros")
        b = PagedCache.allocate(HYBRID, 16, 4, 3, layout=layout, fill="zeros")
        Unpacker(a).unpack(fused, r)
        Unpacker(b, backend="reference").unpack(fused, r)
        assert same(snapshot(a), snapshot(b))


def test_pack_into_writes_the_whole_payload_in_place():
    src = filled(HYBRID, 16, 4)
    ref = random_ref(16, 4, 20, slot=2, seed=5)
    packer = Packer(src)
    want = packer.pack(ref, group="full").tobytes()
    buf = bytearray(packer.wire_nbytes(ref, group="full"))
    payload = packer.pack(ref, group="full", into=buf)
    assert bytes(buf) == want == payload.tobytes()
    with pytest.raises(ConfigError):
        packer.pack(ref, group="full", into=bytearray(len(buf) + 1))
    with pytest.raises(ConfigError):  # compressed segments cannot be written in place
        Packer(src, CodecConfig(kv_codec="lz4")).pack(ref, group="full", into=bytearray(len(buf)))
