"""``kvlink demo``: the main job, end to end on one machine.

Today (foundation): a Kimi-Linear-shaped request (MLA KV + KDA states) is packed out of a paged
cache with shuffled block ids, encoded, sent as bytes, decoded, unpacked into other blocks and a
different state slot, and verified bit-exact. The transport and pool work grows this into the
full prefill -> decode flow.
"""

from __future__ import annotations

import random
import time

import torch

from kvlink.config import CodecConfig
from kvlink.presets import get_preset
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, StagingArena, Unpacker


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run(model: str = "kimi-linear-48b-a3b", tokens: int = 32768, block_size: int = 16,
        codecs: tuple[str, ...] = ("none", "shuffle-zstd"), out=print) -> bool:
    spec = get_preset(model)
    need = -(-tokens // block_size)
    num_blocks = need + 128
    out(f"kvlink demo: {spec.name}, {tokens} tokens, block size {block_size}")
    out(f"  layout: {spec.num_layers} layers ({len(spec.layer_indices('mla', 'full'))} attention, "
        f"{len(spec.layer_indices('linear'))} linear); {spec.kv_bytes_per_token} B/token KV, "
        f"{_fmt_bytes(spec.fixed_state_bytes)} fixed state, {_fmt_bytes(spec.bytes_at(tokens))} for this request")
    torch.manual_seed(0)
    prefill = PagedCache.allocate(spec, num_blocks, block_size, num_slots=4, fill="randn")
    decode = PagedCache.allocate(spec, num_blocks, block_size, num_slots=4, fill="zeros")
    rng = random.Random(0)
    src = CacheRef(rng.sample(range(num_blocks), need), tokens, state_slot=3)
    dst = CacheRef(rng.sample(range(num_blocks), need), tokens, state_slot=0)
    arena = StagingArena(spec.bytes_at(tokens) + (4 << 20))
    all_ok = True
    for codec in codecs:
        packer = Packer(prefill, CodecConfig(kv_codec=codec, state_codec=codec), staging=arena)
        t0 = time.perf_counter()
        payload = packer.pack(src)
        t1 = time.perf_counter()
        wire = b"".join(payload.buffers())  # what a socket would carry
        payload.release()
        t2 = time.perf_counter()
        written = Unpacker(decode).unpack(Payload.from_buffer(wire), dst)
        t3 = time.perf_counter()
        again = Packer(decode, CodecConfig(kv_codec=codec, state_codec=codec)).pack(dst).tobytes()
        ok = again == wire and len(written) == spec.num_layers
        all_ok &= ok
        raw = spec.bytes_at(tokens)
        out(f"  codec {codec:<13} payload {_fmt_bytes(len(wire)):>10} (ratio {raw / len(wire):.2f}), "
            f"pack {raw / (t1 - t0) / 1e9:5.2f} GB/s, unpack {raw / (t3 - t2) / 1e9:5.2f} GB/s, "
            f"bit-exact: {'yes' if ok else 'NO'}")
    out("  result: " + ("every layer and state restored bit-exact into other blocks" if all_ok else "MISMATCH"))
    return all_ok
