"""xxh3 on the device (Triton, run by the CPU interpreter here) against xxhash, and packs whose
checksums it computes against packs hashed on the host."""

import os
import random
import subprocess
import sys

import pytest
import torch

from kvlink.codec import Codec
from kvlink.config import OpsConfig
from kvlink.errors import BackendUnavailable, ChecksumMismatch, ConfigError
from kvlink.ops import digest, reference
from kvlink.serde import Packer, Payload, StagingArena, Unpacker, device_hash
from kvlink.serde.layout import payload_segments
from tests.unit.helpers import HYBRID, filled, moved, random_ref, same, snapshot

interpreted = pytest.mark.skipif(not digest.available("cpu"), reason="needs triton with TRITON_INTERPRET=1")

# xxh3's block is 1 KiB (16 stripes of 64 bytes); the lengths sit on both sides of every boundary
# its long path has: one stripe, a whole block, a block plus a partial stripe, several blocks.
EDGES = [241, 255, 256, 257, 319, 320, 1023, 1024, 1025, 1087, 1088, 1089, 2047, 2048, 2049, 3000, 16391]


def _buffer(lengths, seed=0):
    rng = random.Random(seed)
    offsets, at = [], 0
    for n in lengths:
        at += 8 * rng.randrange(0, 4)
        offsets.append(at)
        at += -(-n // 8) * 8
    data = torch.randint(0, 256, (at + 24,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return data, offsets


@interpreted
def test_digests_match_xxhash_at_every_boundary():
    data, offsets = _buffer(EDGES)
    got = digest.to_ints(digest.queue_xxh3(data, offsets, EDGES))
    assert got == reference.xxh3_segments(data, offsets, EDGES)


@interpreted
def test_digests_see_a_single_flipped_bit():
    data, offsets = _buffer([5000])
    before = digest.to_ints(digest.queue_xxh3(data, offsets, [5000]))
    data[offsets[0] + 4999] ^= 0x10  # in the last stripe only
    after = digest.to_ints(digest.queue_xxh3(data, offsets, [5000]))
    assert before != after and after == reference.xxh3_segments(data, offsets, [5000])


@interpreted
def test_many_segments_of_random_lengths():
    rng = random.Random(3)
    lengths = [rng.randrange(241, 6000) for _ in range(40)]
    data, offsets = _buffer(lengths, seed=3)
    assert digest.to_ints(digest.queue_xxh3(data, offsets, lengths)) == reference.xxh3_segments(data, offsets, lengths)


@interpreted
@pytest.mark.parametrize("offsets, lengths, match", [
    ([4], [300], "misaligned"),
    ([0], [240], "starts at 241"),
    ([0], [5000], "outside"),
    ([0, 8], [300], "offsets for"),
])
def test_bad_segments_are_refused(offsets, lengths, match):
    data = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ConfigError, match=match):
        digest.queue_xxh3(data, offsets, lengths)


@interpreted
def test_bad_data_is_refused():
    with pytest.raises(ConfigError, match="uint8"):
        digest.queue_xxh3(torch.zeros(64, dtype=torch.int32), [], [])
    with pytest.raises(ConfigError, match="aligned"):
        digest.queue_xxh3(torch.zeros(4096, dtype=torch.uint8)[1:], [], [])


@interpreted
@pytest.mark.parametrize("layout", ["blocks_first", "kv_first", "split"])
@pytest.mark.parametrize("tokens, token_start", [(37, 0), (120, 0), (120, 64)])
def test_pack_hashed_on_the_device_equals_the_host_pack(layout, tokens, token_start):
    cache = filled(HYBRID, 48, 8, layout=layout)
    ref = random_ref(48, 8, tokens, slot=1, token_start=token_start)
    host = Packer(cache).pack(ref)
    device = Packer(cache, backend="triton").pack(ref)
    assert device_hash.usable(cache.device, "triton", OpsConfig())
    assert device.tobytes() == host.tobytes()
    assert any(s.length >= digest.MIN_LEN for s in device.segments)
    assert any(s.length < digest.MIN_LEN for s in device.segments)


@interpreted
def test_scratch_cap_splits_batches_and_leaves_larger_segments_to_the_host():
    cache = filled(HYBRID, 48, 8)
    ref = random_ref(48, 8, 120, slot=1)
    layouts = payload_segments(HYBRID, list(range(HYBRID.num_layers)), 0, 120, None)
    aligned = [-(-seg.nbytes // 256) * 256 for seg in layouts]
    batch = max(aligned) - 1  # a pack's batches take half the bound: the largest segments do not fit
    ops = OpsConfig(device_scratch_bytes=2 * batch)
    offsets = [sum(aligned[:i]) for i in range(len(aligned))]
    out = torch.zeros(sum(aligned), dtype=torch.uint8)
    packer = Packer(cache, backend="triton", ops=ops)
    ids, ids_host = ref.block_ids_checked(cache)
    slots = {s.layer: ref.slot(cache, s.layer) for s in layouts if s.is_state}

    def gather(i, scratch, where):
        packer._gather(layouts[i], scratch, where, ids, ids_host, slots.get(layouts[i].layer, -1))

    codecs = [Codec.NONE] * len(layouts)
    results = device_hash.pack_segments(gather, layouts, offsets, codecs, out, cache.device, ops)
    host = Packer(cache).pack(ref)
    for size, result, want in zip(aligned, results, host.segments):
        assert (result is None) == (size > batch)
        assert result is None or result[1] == want.checksum
    assert 0 < sum(r is None for r in results) < len(results)
    assert sum(aligned) > batch  # so the rest went in more than one batch
    assert Packer(cache, backend="triton", ops=ops).pack(ref).tobytes() == host.tobytes()


@interpreted
def test_device_hash_settings_from_the_environment(monkeypatch):
    assert device_hash.usable(torch.device("cpu"), "triton", OpsConfig.from_env())
    monkeypatch.setenv("KVLINK_DEVICE_HASH", "0")
    monkeypatch.setenv("KVLINK_DEVICE_SCRATCH_BYTES", "4096")
    ops = OpsConfig.from_env()
    assert (ops.device_hash, ops.device_scratch_bytes) == (False, 4096)
    assert not device_hash.usable(torch.device("cpu"), "triton", ops)
    assert not device_hash.usable(torch.device("cpu"), None, OpsConfig())  # the native path hashes as it copies
    monkeypatch.setenv("KVLINK_DEVICE_HASH", "yes")
    with pytest.raises(ConfigError, match="KVLINK_DEVICE_HASH"):
        OpsConfig.from_env()
    monkeypatch.setenv("KVLINK_DEVICE_HASH", "1")
    monkeypatch.setenv("KVLINK_DEVICE_SCRATCH_BYTES", "0")
    with pytest.raises(ConfigError, match="device_scratch_bytes"):
        OpsConfig.from_env()


def _landed(payload) -> bytearray:
    """The payload as a receiver holds it: one writable buffer."""
    return bytearray(payload.tobytes())


@interpreted
@pytest.mark.parametrize("layout", ["blocks_first", "split"])
def test_unpack_verified_on_the_device_writes_what_the_host_path_writes(layout):
    src = filled(HYBRID, 48, 8, layout=layout)
    sref = random_ref(48, 8, 120, slot=1)
    wire = _landed(Packer(src).pack(sref))
    dref = random_ref(48, 8, 120, slot=2, seed=5)
    on_host = filled(HYBRID, 48, 8, layout=layout, seed=9)
    on_device = filled(HYBRID, 48, 8, layout=layout, seed=9)
    Unpacker(on_host, backend="triton", ops=OpsConfig(device_hash=False)).unpack(wire, dref)
    assert Unpacker(on_device, backend="triton").unpack(wire, dref) == list(range(HYBRID.num_layers))
    assert same(snapshot(on_device), snapshot(on_host))
    assert Packer(on_device).pack(dref).tobytes() == bytes(wire)


@interpreted
@pytest.mark.parametrize("where", ["long", "short"])
def test_unpack_verified_on_the_device_refuses_a_flipped_bit_and_writes_nothing(where):
    src = filled(HYBRID, 48, 8)
    sref = random_ref(48, 8, 120, slot=1)
    payload = Packer(src).pack(sref)
    wire = _landed(payload)
    pick = [s for s in payload.segments if (s.length >= digest.MIN_LEN) == (where == "long")][-1]
    wire[payload.header.header_len + pick.offset + pick.length - 1] ^= 0x01
    dst = filled(HYBRID, 48, 8, seed=9)
    before = snapshot(dst)
    with pytest.raises(ChecksumMismatch, match=f"layer {pick.layer}"):
        Unpacker(dst, backend="triton").unpack(wire, random_ref(48, 8, 120, slot=2, seed=5))
    assert same(snapshot(dst), before)


@interpreted
def test_unpack_scratch_cap_leaves_the_rest_to_the_host():
    src = filled(HYBRID, 48, 8)
    wire = _landed(Packer(src).pack(random_ref(48, 8, 120, slot=1)))
    payload = Payload.from_buffer(wire)
    names = [f"s{i}" for i in range(len(payload.segments))]
    long = [i for i, s in enumerate(payload.segments) if s.length >= digest.MIN_LEN]
    cap = -(-payload.segments[long[0]].length // 256) * 256
    landed = device_hash.land_verified(payload, range(len(names)), names, torch.device("cpu"),
                                       OpsConfig(device_scratch_bytes=cap))
    assert list(landed) == [long[0]]
    assert bytes(landed[long[0]].numpy()) == bytes(payload.datas[long[0]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")
@pytest.mark.parametrize("size", [241, 1 << 20, (36 << 20) + 5])
def test_cuda_digests_match_xxhash(size):
    lengths = [*EDGES, size]
    data, offsets = _buffer(lengths)
    data = data.cuda()
    assert digest.to_ints(digest.queue_xxh3(data, offsets, lengths)) == reference.xxh3_segments(data, offsets, lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_pack_and_verified_unpack_hash_on_the_device(backend):
    cpu = filled(HYBRID, 48, 8, layout="kv_first")
    gpu = moved(cpu, "cuda")
    ref = random_ref(48, 8, 120, slot=1)
    staging = StagingArena(1 << 20, pin=True)
    payload = Packer(gpu, staging=staging, backend=backend, ops=OpsConfig(device_scratch_bytes=4096)).pack(ref)
    wire = _landed(payload)
    payload.release()
    assert bytes(wire) == Packer(cpu).pack(ref).tobytes()
    dst = moved(filled(HYBRID, 48, 8, layout="split", seed=9), "cuda")
    dref = random_ref(48, 8, 120, slot=2, seed=5)
    Unpacker(dst, backend=backend).unpack(wire, dref)
    assert Packer(dst, backend=backend).pack(dref).tobytes() == bytes(wire)
    long = [s for s in payload.segments if s.length >= digest.MIN_LEN][0]
    wire[payload.header.header_len + long.offset] ^= 0x80
    before = snapshot(dst)
    with pytest.raises(ChecksumMismatch):
        Unpacker(dst, backend=backend).unpack(wire, dref)
    assert same(snapshot(dst), before)


@interpreted
def test_kernels_that_cannot_run_leave_hashing_to_the_host(monkeypatch):
    """A device whose kernels fail to build (an architecture Triton cannot target) still packs and
    verifies, on the host, from then on."""
    def broken(*args, **kwargs):
        raise RuntimeError("ptxas fatal: unsupported architecture")

    monkeypatch.setattr(device_hash, "_BROKEN", set())
    monkeypatch.setattr(digest.triton_xxh3, "launch", broken)
    cache = filled(HYBRID, 48, 8)
    ref = random_ref(48, 8, 120, slot=1)
    host = Packer(cache).pack(ref)
    with pytest.raises(BackendUnavailable, match="ptxas"):
        digest.queue_xxh3(torch.zeros(512, dtype=torch.uint8), [0], [300])
    assert Packer(cache, backend="triton").pack(ref).tobytes() == host.tobytes()
    assert not device_hash.usable(cache.device, "triton", OpsConfig())
    wire = _landed(host)
    wire[-1] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        Unpacker(filled(HYBRID, 48, 8, seed=9), backend="triton").unpack(wire, random_ref(48, 8, 120, slot=2))


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvlink.ops import triton_xxh3 as k
target = GPUTarget("cuda", 90, 32)
args = {n: "*i64" for n in ("consts", "seg_byte", "seg_len", "seg_row", "sums")}
sums = triton.compile(ASTSource(k._block_sums_kernel, {"words": "*i64", **args, "num_segments": "i32",
                      "num_rows": "i64", "ROWS": "constexpr", "SEARCH": "constexpr"}, {"ROWS": k.ROWS, "SEARCH": k.SEARCH}),
                      target=target)
finish = triton.compile(ASTSource(k._finish_kernel, {"data": "*u8", **args, "out": "*i64", "UNROLL": "constexpr"},
                        {"UNROLL": 32}), target=target, options={"num_warps": 1})
print(len(sums.asm["cubin"]), len(finish.asm["cubin"]))
"""


@interpreted
def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: build both kernels for sm_90 with
    Triton's own ptxas (no GPU needed), as a lent GPU would."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(int(n) > 0 for n in done.stdout.split())
