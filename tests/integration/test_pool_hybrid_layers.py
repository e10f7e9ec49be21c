"""The prefix pool with general layers: a layer holding K/V and SSM states together, sliding and
chunked windows and an integer-state layer go through a real Pool (pack_pieces -> store -> lookup
-> fetch -> restore_pieces) and come back bit-exact in other blocks and another slot; a hit never
ends where the state checkpoint is missing."""

import pytest
import torch

from kvlink.config import PoolConfig
from kvlink.engine.pieces import pack_pieces, restore_pieces
from kvlink.pool import Pool
from kvlink.pool.index import FULL, SLIDING, STATE
from kvlink.serde import CacheRef, PagedCache
from kvlink.spec import CacheSpec, FullAttention, Layer, SlidingWindow, StateTensor, TokenTensor

SPEC = CacheSpec("pool-hybrid", (
    Layer((TokenTensor("k", (2, 8)), TokenTensor("v", (2, 8))),
          (StateTensor("conv", (12, 3), "bfloat16"), StateTensor("ssm", (2, 4, 4), "float32")), variant="mamba2"),
    SlidingWindow(4, 4, window=6),
    Layer((TokenTensor("k", (1, 4), window="chunked", size=12), TokenTensor("v", (1, 4), window="chunked", size=12))),
    Layer((), (StateTensor("pos", (1,), "int64"), StateTensor("counts", (3,), "int32"))),
    FullAttention(1, 6),
))
BS, POOL_BLOCK, NUM_BLOCKS = 4, 8, 24
PROMPT = list(range(3000, 3032))  # four pool blocks; the request ends on a boundary


def cache(seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return PagedCache.allocate(SPEC, NUM_BLOCKS, BS, num_slots=3, fill="zeros" if seed is None else "randn")


def pool():
    return Pool(SPEC, PoolConfig(block_size=POOL_BLOCK, host_bytes=8 << 20, page_bytes=16 << 10,
                                 chunk_bytes=1 << 20, checkpoint_every=None))


def token_bytes(c: PagedCache, ref: CacheRef, layer: int, comp: int, t0: int, t1: int) -> torch.Tensor:
    plane = c.tensor(layer, comp)
    elems = plane.shape[1] // BS
    ids = list(ref.block_ids)
    return torch.stack([plane[ids[t // BS], (t % BS) * elems:(t % BS + 1) * elems] for t in range(t0, t1)]
                       ).view(torch.uint8)


def assert_restored(src, src_ref, dst, dst_ref, tokens, states=None):
    """Every component of ``dst`` equals ``src`` as the model needs it after ``tokens`` tokens:
    full tensors from token 0, windowed ones over what is live, states (or ``states``) whole."""
    for i, layer in enumerate(SPEC.layers):
        for c, comp in enumerate(layer.components):
            if comp.is_state:
                want = states[(i, c)] if states else src.tensor(i, c)[src_ref.state_slot]
                assert torch.equal(want.view(torch.uint8), dst.tensor(i, c)[dst_ref.state_slot].view(torch.uint8)), \
                    f"layer {i} {comp.name}"
            else:
                t0 = comp.live_start(tokens)
                if t0 < tokens:
                    assert torch.equal(token_bytes(src, src_ref, i, c, t0, tokens),
                                       token_bytes(dst, dst_ref, i, c, t0, tokens)), f"layer {i} {comp.name}"


def test_hybrid_layers_restore_bit_exact_from_the_pool():
    src, src_ref = cache(seed=1), CacheRef(list(range(8)), 32, 2)
    with pool() as p:
        pieces = pack_pieces(src, src_ref, POOL_BLOCK)
        assert sorted(pieces) == sorted([(FULL, b) for b in range(4)] + [(SLIDING, b) for b in range(4)] + [(STATE, 3)])
        assert p.store(PROMPT, pieces).stored == 9
        hit = p.lookup(PROMPT + [1, 2, 3, 4, 5, 6, 7, 8, 9])
        assert hit.tokens == 32 and hit.state is not None
        assert len(hit.sliding) == 2  # ceil((12 - 1) / 8): the chunked window is the widest
        dst, dst_ref = cache(), CacheRef(list(range(23, 15, -1)), 32, 0)
        assert restore_pieces(dst, hit, p.fetch(hit), dst_ref, POOL_BLOCK) == 32
        assert_restored(src, src_ref, dst, dst_ref, 32)


def test_a_hit_never_ends_where_the_state_checkpoint_is_missing():
    src, src_ref = cache(seed=2), CacheRef(list(range(8, 16)), 32, 1)
    divergent = PROMPT[:24] + [9] * 16  # shares three pool blocks, then differs
    with pool() as p:
        p.store(PROMPT, pack_pieces(src, src_ref, POOL_BLOCK))
        hit = p.lookup(divergent)
        # full and windowed entries cover 24 tokens, but the only state is at 32
        assert hit.kv_tokens == 24 and hit.tokens == 0 and hit.state is None
        assert "no state checkpoint" in hit.stopped
        # a checkpoint at token 16 (the state as it stood there: other values than at 32)
        at16 = {}
        for i, c in SPEC.group("state"):
            pool_t = src.tensor(i, c)
            saved = pool_t[src_ref.state_slot].clone()
            fresh = torch.randint_like(saved, 0, 100) if not saved.is_floating_point() else torch.randn_like(saved)
            pool_t[src_ref.state_slot] = fresh
            at16[(i, c)] = fresh.clone()
            assert not torch.equal(fresh.view(torch.uint8), saved.view(torch.uint8))
        state_piece = pack_pieces(src, CacheRef(src_ref.block_ids, 16, src_ref.state_slot), POOL_BLOCK, first_block=2)
        assert list(state_piece) == [(STATE, 1)]
        assert p.store(PROMPT, state_piece).stored == 1
        hit = p.lookup(divergent)
        assert hit.tokens == 16 and len(hit.full) == 2 and len(hit.sliding) == 2
        dst, dst_ref = cache(), CacheRef(list(range(4, 12)), 16, 2)
        restore_pieces(dst, hit, p.fetch(hit), dst_ref, POOL_BLOCK)
        assert_restored(src, src_ref, dst, dst_ref, 16, states=at16)
        # the whole prompt still restores at 32, with the state taken there
        assert p.lookup(PROMPT).tokens == 32


@pytest.mark.parametrize("drop", [FULL, SLIDING])
def test_a_hit_needs_every_token_group_before_it(drop):
    src, src_ref = cache(seed=3), CacheRef(list(range(8)), 32, 0)
    with pool() as p:
        pieces = pack_pieces(src, src_ref, POOL_BLOCK)
        del pieces[(drop, 2)]  # one block of one group never reached the pool
        p.store(PROMPT, pieces)
        hit = p.lookup(PROMPT)
        # full KV is needed from token 0; windows only within reach of the boundary (blocks 2, 3)
        assert hit.tokens == 0 and hit.state is None
