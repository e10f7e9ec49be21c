"""``kvlink bench serde``: pack/unpack speed against memcpy, and the codec table.

Baseline: one ``torch.Tensor.copy_`` of the same byte count into a preallocated buffer, measured
in the same run. Reported ratios are speeds relative to it (1.0 = as fast as memcpy).
"""

from __future__ import annotations

import random

import torch

from kvlink.codec import Codec, checksum, decode, encode
from kvlink.config import CodecConfig
from kvlink.ops import select_backend
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, StagingArena, Unpacker, payload_segments
from kvlink.serde.tokens import copy_tokens
from kvlink.bench.timing import best_of, gbps


def realistic_kv(rows: int, channels: int, seed: int = 0) -> torch.Tensor:
    """bf16 KV-like values: unit normals with a few outlier channels of much larger magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g)
    outliers = torch.randperm(channels, generator=g)[: max(1, channels // 64)]
    x[:, outliers] *= 20.0
    return x.to(torch.bfloat16)


def realistic_state(numel: int, seed: int = 1) -> torch.Tensor:
    """fp32 recurrent-state-like values: small normals, decayed magnitudes."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g) * torch.rand(numel, generator=g) * 0.1).float()


def copy_request(cache: PagedCache, ref: CacheRef, buf: torch.Tensor, to_packed: bool) -> None:
    """Only the data movement of a pack (or unpack): every segment between the cache and ``buf``."""
    ids, ids_host = ref.block_ids_checked(cache)
    off = 0
    for seg in payload_segments(cache.spec, range(cache.spec.num_layers), ref.token_start, ref.num_tokens):
        part = buf[off : off + seg.nbytes].view(seg.torch_dtype)
        off += seg.nbytes
        if seg.is_state:
            pool = cache.tensor(seg.layer, seg.component)[ref.state_slot]
            (part.view(seg.shape).copy_(pool) if to_packed else pool.copy_(part.view(seg.shape)))
        else:
            rows = cache.tensor(seg.layer, seg.component)
            t0 = seg.token_start
            copy_tokens(rows, ids, ids_host, t0, t0 + seg.shape[0], cache.block_size, part, to_packed)


def realistic_cache(spec, num_blocks: int, block_size: int, num_slots: int) -> PagedCache:
    """A CPU cache for ``spec`` filled with KV-like values and state-like state (benchmarks, demos)."""
    cache = PagedCache.allocate(spec, num_blocks, block_size, num_slots, fill="empty")
    for layer in range(spec.num_layers):
        for _, rows in cache.planes(layer):
            rows.copy_(realistic_kv(rows.shape[0], rows.shape[1], seed=layer).to(rows.dtype))
        for _, pool in cache.states(layer):
            pool.copy_(realistic_state(pool.numel(), seed=layer).view(pool.shape).to(pool.dtype))
    return cache


def bench_pack(model: str, tokens: int, block_size: int, repeat: int) -> dict:
    spec = get_preset(model)
    need = -(-tokens // block_size)
    num_blocks = need + 64
    src = realistic_cache(spec, num_blocks, block_size, 2)
    dst = PagedCache.allocate(spec, num_blocks, block_size, 2, fill="zeros")
    rng = random.Random(0)
    src_ref = CacheRef(rng.sample(range(num_blocks), need), tokens, 0)
    dst_ref = CacheRef(rng.sample(range(num_blocks), need), tokens, 1)

    nbytes = spec.bytes_at(tokens)
    base_src = torch.empty(nbytes, dtype=torch.uint8).random_()
    base_dst = torch.empty(nbytes, dtype=torch.uint8)
    memcpy_s = best_of(lambda: base_dst.copy_(base_src), repeat)

    arena = StagingArena(int(nbytes * 1.05) + (1 << 20), pin=False)
    packer, unpacker = Packer(src, staging=arena), Unpacker(dst)

    def pack_release():
        packer.pack(src_ref).release()

    pack_s = best_of(pack_release, repeat)
    payload = packer.pack(src_ref)
    wire = Payload.from_buffer(payload.tobytes())
    unpack_s = best_of(lambda: unpacker.unpack(wire, dst_ref), repeat)
    ok = Packer(dst).pack(dst_ref).tobytes() == wire.tobytes()  # before the scatter-only timing overwrites dst
    verify_s = best_of(wire.verify, repeat)
    gather_s = best_of(lambda: copy_request(src, src_ref, base_dst, True), repeat)
    scatter_s = best_of(lambda: copy_request(dst, dst_ref, base_src, False), repeat)
    payload.release()
    return {
        "model": model, "tokens": tokens, "block_size": block_size, "bytes": nbytes, "payload_bytes": wire.nbytes,
        "backend": select_backend("cpu"), "threads": torch.get_num_threads(),
        "memcpy_gbps": gbps(nbytes, memcpy_s),
        "pack_gbps": gbps(nbytes, pack_s), "pack_ratio": memcpy_s / pack_s,
        "unpack_gbps": gbps(nbytes, unpack_s), "unpack_ratio": memcpy_s / unpack_s,
        "gather_only_ratio": memcpy_s / gather_s, "scatter_only_ratio": memcpy_s / scatter_s,
        "checksum_gbps": gbps(wire.nbytes, verify_s), "bit_exact": ok,
    }


def bench_codecs(rows: int = 32768, channels: int = 576, state_numel: int = 32 * 128 * 128, repeat: int = 3) -> list[dict]:
    kv = realistic_kv(rows, channels)
    state = realistic_state(state_numel)
    out = []
    for name, tensor, codecs in (("bf16 kv", kv, list(Codec)), ("fp32 state", state, [c for c in Codec if not c.lossy])):
        raw_bytes = tensor.numel() * tensor.element_size()
        for codec in codecs:
            enc = encode(codec, tensor)
            enc_s = best_of(lambda: encode(codec, tensor), repeat)
            dec_s = best_of(lambda: decode(codec, enc, tensor.dtype, tensor.numel()), repeat)
            back = decode(codec, enc, tensor.dtype, tensor.numel())
            row = {"data": name, "codec": codec.label, "ratio": raw_bytes / memoryview(enc).nbytes,
                   "encode_gbps": gbps(raw_bytes, enc_s), "decode_gbps": gbps(raw_bytes, dec_s),
                   "lossless": torch.equal(back.view(torch.uint8), tensor.reshape(-1).view(torch.uint8))}
            if codec.lossy:
                ref, got = tensor.float().reshape(-1), back.float()
                row["max_rel_err_above_1pct_amax"] = float(((ref - got).abs() / ref.abs())[ref.abs() > 0.01 * ref.abs().max()].max())
            out.append(row)
    raw = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
    out.append({"data": "bf16 kv", "codec": "xxh3 checksum", "encode_gbps": gbps(len(raw), best_of(lambda: checksum(raw), repeat))})
    return out


def run(model: str = "kimi-linear-48b-a3b", tokens: int = 32768, block_size: int = 16, repeat: int = 5) -> dict:
    return {"pack": bench_pack(model, tokens, block_size, repeat), "codecs": bench_codecs(),
            "codec_config_default": CodecConfig().kv_codec}


def render(result: dict) -> str:
    p = result["pack"]
    lines = [
        f"pack/unpack {p['model']} {p['tokens']} tokens, block {p['block_size']}, {p['bytes'] / 2**20:.1f} MiB, "
        f"backend {p['backend']}, {p['threads']} threads",
        f"  memcpy baseline   {p['memcpy_gbps']:6.2f} GB/s",
        f"  pack (+checksum)  {p['pack_gbps']:6.2f} GB/s  {p['pack_ratio']:.2f}x memcpy  (gather alone {p['gather_only_ratio']:.2f}x)",
        f"  unpack (+verify)  {p['unpack_gbps']:6.2f} GB/s  {p['unpack_ratio']:.2f}x memcpy  (scatter alone {p['scatter_only_ratio']:.2f}x)",
        f"  checksum xxh3     {p['checksum_gbps']:6.2f} GB/s   bit-exact: {p['bit_exact']}",
        "",
        f"{'data':<11} {'codec':<14} {'ratio':>6} {'enc GB/s':>9} {'dec GB/s':>9}  lossless",
    ]
    for row in result["codecs"]:
        if "ratio" in row:
            lines.append(f"{row['data']:<11} {row['codec']:<14} {row['ratio']:6.3f} {row['encode_gbps']:9.2f} "
                         f"{row['decode_gbps']:9.2f}  {row['lossless']}")
        else:
            lines.append(f"{row['data']:<11} {row['codec']:<14} {'':6} {row['encode_gbps']:9.2f}")
    return "\n".join(lines)
