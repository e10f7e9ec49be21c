"""GPU benchmark of the row kernels and of pack/unpack from a CUDA paged cache.

    python benchmarks/gpu.py [--json] [--tokens 32768]

Baselines measured in the same run: a device->pinned-host copy of the same byte count (what a pack
must at least do), a pinned-host->device copy (unpack), and a device-to-device copy (gather only).
Packs and verified unpacks hash on the GPU (kvlink.ops.digest) unless KVLINK_DEVICE_HASH=0;
``pack_host_hash_gbps`` and ``unpack_host_verify_gbps`` are the same calls hashing on the host, and
``xxh3_device_gbps`` the device hash alone over the payload's segments.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from kvlink import ops
from kvlink.config import OpsConfig
from kvlink.ops import digest
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, StagingArena, Unpacker


def cuda_time(fn, repeat=10, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def run(model: str, tokens: int, block_size: int) -> dict:
    spec = get_preset(model)
    need = -(-tokens // block_size)
    nb = need + 256
    torch.manual_seed(0)
    src = PagedCache.allocate(spec, nb, block_size, 4, device="cuda", fill="randn")
    dst = PagedCache.allocate(spec, nb, block_size, 4, device="cuda", fill="zeros")
    rng = random.Random(0)
    sref = CacheRef(rng.sample(range(nb), need), tokens, 1)
    dref = CacheRef(rng.sample(range(nb), need), tokens, 2)
    nbytes = spec.bytes_at(tokens)
    kv_bytes = spec.kv_bytes_per_token * tokens
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2d = torch.empty_like(dev)
    out = {"device": torch.cuda.get_device_name(), "model": model, "tokens": tokens, "bytes": nbytes,
           "torch": torch.__version__, "d2h_gbps": nbytes / cuda_time(lambda: pinned.copy_(dev, non_blocking=True)) / 1e9,
           "h2d_gbps": nbytes / cuda_time(lambda: dev.copy_(pinned, non_blocking=True)) / 1e9,
           "d2d_gbps": 2 * nbytes / cuda_time(lambda: d2d.copy_(dev)) / 1e9, "backends": {}}
    # gather-only throughput of the KV rows (MLA planes), device->device and device->pinned host
    layer = spec.layer_indices("mla", "full")[0]
    rows = src.planes(layer)[0][1]
    ids = torch.tensor(list(sref.block_ids), device="cuda")
    packed_dev = torch.empty(need, rows.shape[1], dtype=rows.dtype, device="cuda")
    packed_host = torch.empty(need, rows.shape[1], dtype=rows.dtype, pin_memory=True)
    row_bytes = packed_dev.numel() * packed_dev.element_size()
    for backend in ops.available_backends("cuda"):
        entry = {
            "gather_d2d_gbps": 2 * row_bytes / cuda_time(lambda: ops.gather_rows(rows, ids, packed_dev, backend)) / 1e9,
            "gather_to_pinned_gbps": row_bytes / cuda_time(lambda: ops.gather_rows(rows, ids, packed_host, backend)) / 1e9,
            "scatter_d2d_gbps": 2 * row_bytes / cuda_time(lambda: ops.scatter_rows(packed_dev, ids, rows, backend)) / 1e9,
        }
        arena = StagingArena(nbytes + (8 << 20), pin=True)
        packer = Packer(src, staging=arena, backend=backend)
        entry["pack_gbps"] = nbytes / cuda_time(lambda: packer.pack(sref).release(), repeat=5) / 1e9
        host_hash = Packer(src, staging=arena, backend=backend, ops=OpsConfig(device_hash=False))
        entry["pack_host_hash_gbps"] = nbytes / cuda_time(lambda: host_hash.pack(sref).release(), repeat=5) / 1e9
        hashed_on_host = host_hash.pack(sref)  # one lease at a time: the arena holds one payload
        host_bytes = hashed_on_host.tobytes()
        hashed_on_host.release()
        payload = packer.pack(sref)
        entry["device_hash_matches_host"] = host_bytes == payload.tobytes()
        # a receiver lands payloads in pinned memory (the transport receives into a pinned arena)
        landed = torch.empty(payload.nbytes, dtype=torch.uint8, pin_memory=True)
        landed.numpy()[:] = memoryview(payload.tobytes())
        wire = Payload.from_buffer(landed.numpy())
        unpacker = Unpacker(dst, backend=backend)
        entry["unpack_gbps"] = nbytes / cuda_time(lambda: unpacker.unpack(wire, dref), repeat=5) / 1e9
        host_verify = Unpacker(dst, backend=backend, ops=OpsConfig(device_hash=False))
        entry["unpack_host_verify_gbps"] = nbytes / cuda_time(lambda: host_verify.unpack(wire, dref), repeat=5) / 1e9
        entry["bit_exact"] = Packer(dst, backend=backend).pack(dref).tobytes() == wire.tobytes()
        entry["verify_gbps"] = nbytes / cuda_time(wire.verify, repeat=5) / 1e9
        payload.release()
        entry["pack_vs_d2h"] = entry["pack_gbps"] / out["d2h_gbps"]
        entry["unpack_vs_h2d"] = entry["unpack_gbps"] / out["h2d_gbps"]
        out["backends"][backend] = entry
    out["kv_bytes"] = kv_bytes
    if digest.available("cuda"):  # the device hash alone, over the payload's segment sizes
        lengths = [s.length for s in payload.segments if s.length >= digest.MIN_LEN]
        offsets, at = [], 0
        for n in lengths:
            offsets.append(at)
            at += -(-n // 256) * 256
        buf = torch.randint(0, 256, (at,), dtype=torch.uint8, device="cuda")
        out["xxh3_device_gbps"] = sum(lengths) / cuda_time(lambda: digest.queue_xxh3(buf, offsets, lengths)) / 1e9
        want = ops.reference.xxh3_segments(buf, offsets, lengths)
        out["xxh3_device_matches_xxhash"] = digest.to_ints(digest.queue_xxh3(buf, offsets, lengths)) == want
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="kimi-linear-48b-a3b")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing to measure", file=sys.stderr)
        return 0
    result = run(args.model, args.tokens, args.block_size)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
