"""Pool entries and hits are checked against the spec before anything is written (review of the
general layer spec): an entry with part of its group, an empty entry, an entry of another group, a
hit short of blocks or of its state, an unknown group, and explicit codec overrides."""

import dataclasses

import pytest
import torch

from kvlink.codec import Codec
from kvlink.config import CodecConfig
from kvlink.engine.pieces import pack_pieces, restore_pieces
from kvlink.errors import ConfigError, IncompatibleLayoutError, PoolError, SpecError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, Unpacker
from kvlink.spec import CacheSpec, FullAttention, Layer, LinearAttention, SlidingWindow, StateTensor, TokenTensor
from tests.unit.helpers import same, snapshot

# layer 0: attention and an SSM in one layer (Falcon-H1 style); 1: full; 2: sliding window of 4
HYBRID = Layer((TokenTensor("k", (2, 4), "float32"), TokenTensor("v", (2, 4), "float32")),
               (StateTensor("conv", (4, 3)), StateTensor("recurrent", (2, 3))))
SPEC = CacheSpec("entry-checks", (HYBRID, FullAttention(2, 4, dtype="float32"),
                                  SlidingWindow(2, 4, dtype="float32", window=4)))
P = 4  # pool block = cache block
REF = CacheRef([0, 1], 8, 0)


def caches():
    torch.manual_seed(0)
    return (PagedCache.allocate(SPEC, 8, P, num_slots=2, fill="randn"),
            PagedCache.allocate(SPEC, 8, P, num_slots=2, fill="zeros"))


def subset(payload: Payload, keep) -> bytes:
    """A re-sealed payload holding only the segments ``keep`` accepts (what a buggy or hostile
    pool could hand back)."""
    segs, datas, offset = [], [], 0
    for seg, data in zip(payload.header.segments, payload.datas):
        if keep(seg):
            segs.append(dataclasses.replace(seg, offset=offset))
            datas.append(data)
            offset += seg.length
    return Payload(dataclasses.replace(payload.header, segments=tuple(segs)), datas).tobytes()


def entries_of(src):
    pieces = pack_pieces(src, REF, P)
    return {(kind, bytes([kind == SLIDING, b])): b"".join(bytes(x) for x in bufs)
            for (kind, b), bufs in pieces.items()}


def hit_for(entries, tokens=8):
    full = tuple(k for (kind, k) in sorted(entries) if kind == FULL)
    sliding = tuple(k for (kind, k) in sorted(entries) if kind == SLIDING)[-1:]
    state = next((k for (kind, k) in entries if kind == STATE), None)
    return PrefixHit(tokens, full, sliding, state, tokens, "test")


def test_a_complete_hit_restores_every_component():
    src, dst = caches()
    entries = entries_of(src)
    assert restore_pieces(dst, hit_for(entries), entries, REF, P) == 8
    for layer in range(SPEC.num_layers):
        got = Packer(dst).pack(CacheRef(REF.block_ids, 8, 0, 4 if layer == 2 else 0), [layer]).tobytes()
        assert got == Packer(src).pack(CacheRef(REF.block_ids, 8, 0, 4 if layer == 2 else 0), [layer]).tobytes()


@pytest.mark.parametrize("case", ["state-without-recurrent", "empty-full", "state-as-full", "hit-short-of-a-block",
                                  "hit-without-state", "state-at-other-tokens"])
def test_wrong_entries_or_hits_write_nothing(case):
    src, dst = caches()
    entries = entries_of(src)
    hit = hit_for(entries)
    state_key = hit.state
    if case == "state-without-recurrent":  # regression: the slot kept the previous request's recurrent state
        entries[(STATE, state_key)] = subset(Payload.from_buffer(entries[(STATE, state_key)]), lambda s: s.component != 3)
    elif case == "empty-full":  # regression: an entry without segments restored nothing and said nothing
        key = hit.full[1]
        entries[(FULL, key)] = subset(Payload.from_buffer(entries[(FULL, key)]), lambda s: False)
    elif case == "state-as-full":
        entries[(FULL, hit.full[1])] = entries[(STATE, state_key)]
    elif case == "hit-short-of-a-block":  # regression: returned 8 tokens with block 1 never written
        hit = dataclasses.replace(hit, full=hit.full[:1])
    elif case == "hit-without-state":
        hit = dataclasses.replace(hit, state=None)
    else:
        other = Packer(src).pack(CacheRef(REF.block_ids, 4, 0, 4), [0], group="state").tobytes()
        entries[(STATE, state_key)] = other
    before = snapshot(dst)
    with pytest.raises((PoolError, IncompatibleLayoutError)):
        restore_pieces(dst, hit, entries, REF, P)
    assert same(snapshot(dst), before), "a refused restore wrote something"


def test_a_group_entry_must_carry_the_whole_group():
    src, dst = caches()
    state = Packer(src).pack(CacheRef(REF.block_ids, 8, 0, 8), [0], group="state")
    only_conv = subset(state, lambda s: s.component == 2)
    with pytest.raises(IncompatibleLayoutError, match="lacks components \\['recurrent'\\]"):
        Unpacker(dst).unpack(only_conv, REF, group="state")
    with pytest.raises(IncompatibleLayoutError):  # K/V where a state entry is expected
        Unpacker(dst).unpack(Packer(src).pack(REF, [0], group="full").tobytes(), REF, group="state")


@pytest.mark.parametrize("group", ["states", "sliding", ""])
def test_an_unknown_group_is_refused_not_packed_empty(group):
    src, _ = caches()
    with pytest.raises(SpecError, match="unknown component group"):
        Packer(src).pack(REF, group=group)


def test_an_explicit_none_codec_is_honoured_and_overrides_keep_the_rules():
    src, _ = caches()
    packer = Packer(src, CodecConfig(kv_codec="fp8_e4m3", allow_lossy=True))
    payload = packer.pack(REF, [1], codecs={0: Codec.NONE, 1: Codec.NONE})
    assert [s.codec for s in payload.segments] == [Codec.NONE, Codec.NONE]  # regression: NONE is falsy
    with pytest.raises(ConfigError, match="state is never lossy"):
        Packer(src).pack(REF, [0], codecs={2: Codec.FP8_E4M3})


def test_token_counts_beyond_the_wire_field_are_typed():
    states_only = PagedCache.allocate(CacheSpec("states", (LinearAttention((2, 2)),)), 0, P, fill="zeros")
    with pytest.raises(SpecError, match="bad token range"):  # was struct.error from the header encoder
        Packer(states_only).pack(CacheRef([], 1 << 32, 0, 1 << 32))


def test_a_short_uncompressed_segment_is_refused_before_any_byte_is_read_or_written():
    """Regression: a re-sealed entry whose last uncompressed segment was cut short passed the
    header checks; the fused restore copied its shape's worth of bytes from the segment's start,
    reading past the entry's end into the cache (then raised ChecksumMismatch)."""
    from kvlink.errors import LengthError
    from tests.unit.test_codec_bombs import reseal, split

    src, dst = caches()
    entries = entries_of(src)
    hit = hit_for(entries)
    key = (FULL, hit.full[1])
    header, datas = split(entries[key])
    datas[-1] = datas[-1][:-8]
    marker = bytearray(reseal(header, datas)) + b"\xab" * 8  # what a short read would take in
    entries[key] = memoryview(marker)[:-8]
    with pytest.raises(LengthError, match="uncompressed length"):
        Payload.from_buffer(entries[key])
    before = snapshot(dst)
    with pytest.raises(LengthError):
        restore_pieces(dst, hit, entries, REF, P)
    assert same(snapshot(dst), before)
