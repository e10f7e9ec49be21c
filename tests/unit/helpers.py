"""Small layouts and request builders shared by the serde tests."""

import random

import torch

from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow

HYBRID = CacheSpec("tiny-hybrid", (
    LinearAttention((2, 4, 4), "float32", (12, 3), "bfloat16", variant="kda"),
    MLA(12, 4),
    SlidingWindow(2, 8, window=6),
    FullAttention(2, 8),
    LinearAttention((3, 4, 4), "bfloat16", None, variant="lightning"),
    FullAttention(1, 6, v_head_dim=4, dtype="float32"),
))


def filled(spec, num_blocks, block_size, num_slots=3, layout="blocks_first", seed=0):
    torch.manual_seed(seed)
    return PagedCache.allocate(spec, num_blocks, block_size, num_slots, layout=layout, fill="randn")


def snapshot(cache: PagedCache) -> list[torch.Tensor]:
    """Copies of every tensor of a cache, to assert that nothing was written."""
    out = []
    for layer in range(cache.spec.num_layers):
        out.extend(t.clone() for _, t in (*cache.planes(layer), *cache.states(layer)))
    return out


def outside_ref(cache: PagedCache, ref: CacheRef) -> list[torch.Tensor]:
    """Copies of every block and state slot that ``ref`` does not address."""
    ids = set(ref.block_ids[: -(-ref.num_tokens // cache.block_size)])
    keep = [b for b in range(cache.num_blocks) if b not in ids]
    out = []
    for layer in range(cache.spec.num_layers):
        out.extend(t[keep].clone() for _, t in cache.planes(layer))
        out.extend(torch.cat([t[:ref.state_slot], t[ref.state_slot + 1:]]).clone() for _, t in cache.states(layer))
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def random_ref(num_blocks, block_size, tokens, slot=0, token_start=0, seed=0) -> CacheRef:
    need = -(-tokens // block_size)
    ids = random.Random(seed).sample(range(num_blocks), need)
    return CacheRef(ids, tokens, slot, token_start)


def tokens_of(cache: PagedCache, ref: CacheRef, layer: int, t0: int, t1: int) -> list[torch.Tensor]:
    """The per-token rows of tokens [t0, t1) of a layer, read with plain indexing (test oracle)."""
    bs = cache.block_size
    ids = list(ref.block_ids)
    out = []
    for _, rows in cache.planes(layer):
        elems = rows.shape[1] // bs
        per = [rows[ids[t // bs], (t % bs) * elems:(t % bs + 1) * elems] for t in range(t0, t1)]
        out.append(torch.stack(per) if per else torch.empty(0))
    return out


def moved(cache: PagedCache, device: str) -> PagedCache:
    """A copy of ``cache`` on ``device``."""
    move = lambda t: tuple(x.to(device) for x in t) if isinstance(t, tuple) else t.to(device)  # noqa: E731
    return PagedCache(cache.spec, cache.block_size, {k: move(v) for k, v in cache.kv.items()},
                      {k: move(v) for k, v in cache.conv.items()}, {k: move(v) for k, v in cache.recurrent.items()},
                      cache.layout)
