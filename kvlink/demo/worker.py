"""The demo's worker processes: a prefill engine and a decode engine around one tiny hybrid model.

``python -m kvlink.demo.worker prefill --dest HOST:PORT`` / ``... decode --host ADDR``. Each reads
JSON requests on stdin and answers JSON lines on stdout (events, then one reply per request).
Both keep a prefix pool, so a request that shares a prefix computes and moves only the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time

import torch

from kvlink.config import PoolConfig, TransportConfig, parse_rate
from kvlink.engine import DecodeSide, PrefillSide
from kvlink.engine.hf import HFCacheAdapter, spec_from_config
from kvlink.engine.hf.layers import decoder_layers
from kvlink.engine.pieces import pack_pieces, restore_pieces
from kvlink.engine.tiny import tiny_model
from kvlink.pool import Pool
from kvlink.serde import CacheRef, PagedCache

BLOCK, POOL_BLOCK, NUM_BLOCKS, SLOTS = 16, 64, 1024, 4

# A small but not toy-sized Kimi-Linear-shaped model: 3 KDA layers per MLA layer.
DEMO_MODELS = {
    "kimi_linear": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, linear_num_heads=4,
                        linear_head_dim=64, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64,
                        v_head_dim=64, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
                        mlp_layer_types=["dense"] * 8),
    "qwen3_next": dict(hidden_size=256, num_hidden_layers=8, linear_key_head_dim=64, linear_value_head_dim=64,
                       head_dim=64, full_attention_interval=4),
    "llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, head_dim=64),
}


def build(family: str):
    """``(model, config, spec, adapter)``; every process builds the same weights from one seed."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, config = tiny_model(family, **DEMO_MODELS[family])
    spec = spec_from_config(config)
    return model, config, spec, HFCacheAdapter(spec, config)


def logits_digest(logits: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in logits:
        h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def greedy(model, cache, token: int, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    tokens, logits, tok = [], [], torch.tensor([[token]])
    with torch.no_grad():
        for _ in range(steps):
            out = model(tok, cache=cache, use_cache=True).logits
            logits.append(out)
            tok = out[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
    return tokens, logits


class Engine:
    """One worker's model, paged cache, block/slot allocator and prefix pool."""

    def __init__(self, family: str):
        self.model, self.config, self.spec, self.adapter = build(family)
        self.paged = PagedCache.allocate(self.spec, NUM_BLOCKS, BLOCK, num_slots=SLOTS, fill="zeros")
        self.pool = Pool(self.spec, PoolConfig(block_size=POOL_BLOCK, host_bytes=512 << 20, checkpoint_every=None))
        self.free_blocks = list(range(NUM_BLOCKS - 1, -1, -1))  # handed out from the top: not identity
        self.free_slots = list(range(SLOTS))

    def alloc(self, tokens: int) -> tuple[list[int], int]:
        n = -(-tokens // BLOCK)
        blocks = [self.free_blocks.pop() for _ in range(n)]
        return blocks, self.free_slots.pop()

    def free(self, blocks: list[int], slot: int) -> None:
        self.free_blocks.extend(blocks)
        self.free_slots.append(slot)


def emit(**msg) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def lines():
    while line := await asyncio.to_thread(sys.stdin.readline):
        yield json.loads(line)


async def prefill_main(args) -> None:
    eng = Engine(args.family)
    host, port = args.dest.rsplit(":", 1)
    side = PrefillSide(eng.paged, transport=TransportConfig(rate_cap=parse_rate(args.rate), connections=2))
    await side.client((host, int(port)))
    emit(event="ready")
    async for msg in lines():
        rid, prompt, send_from = msg["request"], msg["prompt"], msg["send_from"]
        n = len(prompt)
        blocks, slot = eng.alloc(n)
        hit = eng.pool.lookup(prompt)
        own = hit.tokens
        if own:  # restore our own prefix: compute only the rest
            restore_pieces(eng.paged, hit, eng.pool.fetch(hit), CacheRef(blocks, own, slot), POOL_BLOCK)
            cache = eng.adapter.build_cache(eng.paged, CacheRef(blocks, own, slot))
        else:
            from transformers import DynamicCache
            cache = DynamicCache(config=eng.config)
        ref = CacheRef(blocks, n, slot, token_start=send_from)
        await side.begin(rid, ref, (host, int(port)))
        loop = asyncio.get_running_loop()

        def hook(i):
            def done(module, inputs, output):
                eng.adapter.export_layer(cache, i, eng.paged, ref)
                side.save_layer(rid, i)
                loop.call_soon_threadsafe(lambda: emit(event="layer", layer=i))
            return done

        handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(eng.model))]
        t0 = time.monotonic()
        with torch.no_grad():
            logits = await asyncio.to_thread(
                lambda: eng.model(torch.tensor([prompt[own:]]), cache=cache, use_cache=True).logits)
        t1 = time.monotonic()
        for h in handles:
            h.remove()
        report = await side.finish(rid, timeout=300)
        eng.pool.store(prompt, pack_pieces(eng.paged, CacheRef(blocks, n, slot), POOL_BLOCK, own // POOL_BLOCK))
        eng.free(blocks, slot)
        emit(request=rid, reused=own, computed=n - own, prefill_start=t0, prefill_end=t1, bytes=report.bytes,
             layer_saved={str(k): v for k, v in report.layer_saved.items()}, sent=report.finished,
             first_token=int(logits[0, -1].argmax()),
             link=(await side.client((host, int(port)))).snapshot().to_dict())
    await side.close()


async def decode_main(args) -> None:
    eng = Engine(args.family)
    side = DecodeSide(eng.paged, pool=eng.pool)
    host, port = await side.start(args.host, 0)
    emit(event="listening", port=port)
    held: dict[str, tuple] = {}
    async for msg in lines():
        rid, prompt = msg["request"], msg["prompt"]
        if msg["op"] == "expect":
            hit = await side.lookup(prompt)
            blocks, slot = eng.alloc(len(prompt))
            t0 = time.monotonic()
            await side.load_from_pool(hit, CacheRef(blocks, len(prompt), slot))
            ref = CacheRef(blocks, len(prompt), slot, token_start=hit.tokens)
            side.start_load(rid, ref)
            held[rid] = (ref, hit.tokens)
            emit(request=rid, matched=hit.tokens, pool_restore_s=time.monotonic() - t0)
        else:  # "decode": wait for the load, rebuild the model's cache, continue generating
            ref, matched = held.pop(rid)
            report = await side.wait_all(rid)
            landed = time.monotonic()
            full = CacheRef(ref.block_ids, ref.num_tokens, ref.state_slot)
            cache = eng.adapter.build_cache(eng.paged, full)
            restored = time.monotonic()
            tokens, logits = await asyncio.to_thread(greedy, eng.model, cache, msg["first_token"], msg["steps"])
            await side.store(prompt, full, matched // POOL_BLOCK)
            side.release(rid)
            eng.free(list(ref.block_ids), ref.state_slot)
            emit(request=rid, bytes=report.bytes, transfer_started=report.transfer_started,
                 layer_done={str(k): v for k, v in report.layer_done.items()},
                 layer_bytes={str(k): v for k, v in report.layer_bytes.items()}, landed=landed, restored=restored,
                 tokens=tokens, digest=logits_digest(logits))
    await side.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kvlink.demo.worker")
    parser.add_argument("role", choices=["prefill", "decode"])
    parser.add_argument("--family", default="kimi_linear", choices=sorted(DEMO_MODELS))
    parser.add_argument("--dest", help="decode worker HOST:PORT (prefill)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (decode)")
    parser.add_argument("--rate", default="1gbit", help="pacing cap of the prefill side's sends")
    args = parser.parse_args()
    from kvlink.transport.loop import run

    run(prefill_main(args) if args.role == "prefill" else decode_main(args))


if __name__ == "__main__":
    main()
