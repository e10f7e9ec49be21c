"""Structure-aware fuzzing of the payload decoder: mutated fields (header re-sealed), truncations,
bit flips, huge segment sizes and decompression bombs inside valid framing. Only typed errors
escape, a rejected payload writes nothing, PayloadScan agrees with payload_intact, memory stays
bounded."""

import dataclasses
import struct

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlink.codec import Codec, checksum
from kvlink.config import CodecConfig
from kvlink.errors import ChecksumMismatch, KvlinkError
from kvlink.serde import Packer, Unpacker
from kvlink.serde.payload import Payload, PayloadScan, is_payload, payload_intact
from kvlink.serde.wire import ENTRY, PREFIX

from .helpers import HYBRID, filled, outside_ref, random_ref, same, snapshot
from .test_codec_bombs import MIB, bounded_memory, reseal, zstd_rle_frame

BS = 4
SRC = filled(HYBRID, 16, BS)
REF = random_ref(16, BS, 22, slot=1, seed=7)
CODECS = [CodecConfig(), CodecConfig(kv_codec="shuffle-zstd", state_codec="zstd"),
          CodecConfig(kv_codec="shuffle-lz4", state_codec="lz4"), CodecConfig(kv_codec="fp8-e4m3", state_codec="zstd", allow_lossy=True)]
WIRES = [Packer(SRC, codec=c).pack(REF).tobytes() for c in CODECS]
# Small enough (tens of bytes, apart from the 32 KiB ones) to pass the segment length bound of the
# tiny payloads above, so they reach the decoders inside valid framing.
BOMBS = [zstd_rle_frame(1 << 17, 1 << 40), zstd_rle_frame(1 << 17, 1 << 30), zstd_rle_frame(1 << 20, None),
         zstd_rle_frame(1 << 10, None, window_log=31), zstd_rle_frame(1 << 30, 1 << 30), zstd_rle_frame(1 << 30, None),
         lz4.block.compress(bytes(64 << 10), store_size=False)]

DST = filled(HYBRID, 16, BS, seed=11)
BEFORE = snapshot(DST)
OUTSIDE = outside_ref(DST, REF)


def snapshot_views(cache) -> list:
    """The tensors :func:`snapshot` copies, in its order (views, to restore them)."""
    out = []
    for layer in range(cache.spec.num_layers):
        out.extend(t for _, t in (*cache.planes(layer), *cache.states(layer)))
    return out


PREFIX_FIELDS = [(4, "<H"), (6, "<H"), (8, "<I"), (12, "<I"), (40, "<Q"), (48, "<Q"), (56, "<I"), (60, "<I"),
                 (64, "<Q")]
ENTRY_FIELDS = [(0, "<H"), (2, "<H"), (4, "<B"), (5, "<B"), (6, "<B"), (7, "<B"), (8, "<H"), (10, "<H"), (12, "<I"),
                *[(16 + 4 * k, "<I") for k in range(6)], (40, "<Q"), (48, "<Q"), (56, "<Q"), (64, "<Q")]


def undefined_bits(wire: bytes) -> bool:
    """Whether the header flags, the header's or a segment's reserved field, or a non-fp8 codec
    parameter are set: v2 defines none of them, so such a payload must never be accepted."""
    if len(wire) < PREFIX.size:
        return False
    _, _, flags, header_len, nseg, *_, reserved, _ = PREFIX.unpack_from(wire, 0)
    if flags or reserved:
        return True
    if header_len != PREFIX.size + nseg * ENTRY.size or header_len > len(wire):
        return False
    entries = (ENTRY.unpack_from(wire, PREFIX.size + i * ENTRY.size) for i in range(nseg))
    return any(e[7] or (e[6] and e[4] != Codec.FP8_E4M3) for e in entries)


def sealed(buf: bytearray) -> bytes:
    """Re-seal the header checksum, when the header length still fits the buffer."""
    header_len = struct.unpack_from("<I", buf, 8)[0] if len(buf) >= PREFIX.size else 0
    if PREFIX.size <= header_len <= len(buf):
        struct.pack_into("<Q", buf, 16, 0)
        struct.pack_into("<Q", buf, 16, checksum(bytes(buf[:header_len])))
    return bytes(buf)


def field_value(fmt: str):
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    return st.one_of(st.integers(0, top), st.sampled_from([0, 1, 2, 5, 6, 255, 1 << 16, 1 << 31, 1 << 40, top]
                                                          ).map(lambda v: min(v, top)))


@st.composite
def mutated(draw) -> bytes:
    wire = draw(st.sampled_from(WIRES))
    nseg = struct.unpack_from("<I", wire, 12)[0]
    how = draw(st.sampled_from(["field", "segment", "segment-codec", "truncate", "flip", "append"]))
    buf = bytearray(wire)
    if how == "field":
        if draw(st.booleans()):
            off, fmt = draw(st.sampled_from(PREFIX_FIELDS))
        else:
            rel, fmt = draw(st.sampled_from(ENTRY_FIELDS))
            off = PREFIX.size + draw(st.integers(0, nseg - 1)) * ENTRY.size + rel
        struct.pack_into(fmt, buf, off, draw(field_value(fmt)))
        return sealed(buf)
    if how in ("segment", "segment-codec"):
        p = Payload.from_buffer(wire)
        datas = [bytes(d) for d in p.datas]
        header, i = p.header, draw(st.integers(0, nseg - 1))
        datas[i] = draw(st.one_of(st.sampled_from(BOMBS), st.binary(max_size=256),
                                  st.integers(0, len(datas[i])).map(lambda n: datas[i][:n]),
                                  st.integers(0, 8 * len(datas[i]) - 1).map(
                                      lambda b: bytes(x ^ (1 << (b % 8)) if j == b // 8 else x
                                                      for j, x in enumerate(datas[i])) if datas[i] else b"")))
        if how == "segment-codec":
            segs = list(header.segments)
            segs[i] = dataclasses.replace(segs[i], codec=draw(st.sampled_from(list(Codec))))
            header = dataclasses.replace(header, segments=tuple(segs))
        return reseal(header, datas)
    if how == "truncate":
        return wire[:draw(st.integers(0, len(wire) - 1))]
    if how == "flip":
        bit = draw(st.integers(0, 8 * len(wire) - 1))
        buf[bit // 8] ^= 1 << (bit % 8)
        return sealed(buf) if draw(st.booleans()) else bytes(buf)
    return wire + draw(st.binary(min_size=1, max_size=64))


@pytest.fixture(scope="module")
def memory_guard():
    # Resident-set peak over the whole run (a 1 GiB bomb decoded anywhere would show).
    with bounded_memory(256 * MIB, trace=False):
        yield


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(wire=mutated(), steps=st.lists(st.integers(1, 4096), max_size=8))
def test_mutated_payloads_only_raise_typed_errors_and_write_nothing(memory_guard, wire, steps):
    intact = payload_intact(wire)
    if undefined_bits(wire):
        assert not intact, "a payload with undefined flags or reserved bits set passed"
    scan, pos = PayloadScan(wire), 0
    for step in steps:
        pos += step
        scan.advance(pos)
    scan.advance(len(wire))
    assert scan.verdict() == intact
    assert isinstance(is_payload(wire), bool)
    try:
        Payload.from_buffer(wire)
    except KvlinkError:
        assert not intact
    try:
        Unpacker(DST).unpack(wire, REF)
    except ChecksumMismatch:
        # Found by the fused copy after its write (kvlink.serde.unpack): only the payload's
        # blocks and slot may differ; undo them for the next example.
        assert same(OUTSIDE, outside_ref(DST, REF)), "a rejected payload wrote outside its blocks and slot"
        for now, then in zip(snapshot_views(DST), BEFORE):
            now.copy_(then)
    except KvlinkError:
        assert same(BEFORE, snapshot(DST)), "a rejected payload wrote into the destination"
    else:
        assert intact
        for now, then in zip(snapshot_views(DST), BEFORE):  # undo the write for the next example
            now.copy_(then)
