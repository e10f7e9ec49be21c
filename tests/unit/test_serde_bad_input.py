"""Malformed, truncated, bit-flipped or incompatible payloads raise typed errors and write nothing."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlink.config import CodecConfig
from kvlink.errors import (BadMagic, ChecksumMismatch, ConfigError, FingerprintMismatch, IncompatibleLayoutError,
                           KvlinkError, LengthError, UnknownCodec, UnsupportedVersion, WireFormatError)
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, Unpacker
from kvlink.serde.wire import ENTRY, PREFIX
from kvlink.spec import CacheSpec, FullAttention

from .helpers import HYBRID, filled, outside_ref, random_ref, same, snapshot

BS = 4
SRC = filled(HYBRID, 16, BS)
REF = random_ref(16, BS, 22, slot=1, seed=7)
WIRE = Packer(SRC).pack(REF).tobytes()
WIRE_LZ4 = Packer(SRC, codec=CodecConfig(kv_codec="shuffle-lz4", state_codec="zstd")).pack(REF).tobytes()


def _dest():
    dst = filled(HYBRID, 16, BS, seed=11)
    return dst, snapshot(dst)


def _rejected(wire, exc=KvlinkError, ref=REF):
    dst, before = _dest()
    outside = outside_ref(dst, ref)
    with pytest.raises(exc) as raised:
        Unpacker(dst).unpack(wire, ref)
    assert same(outside, outside_ref(dst, ref)), "a rejected payload wrote outside its blocks and slot"
    if not isinstance(raised.value, ChecksumMismatch):  # found by the fused copy, after its write
        assert same(before, snapshot(dst)), "a rejected payload wrote into the destination"


def _patch_header(wire: bytes, offset: int, fmt: str, value) -> bytes:
    """Change a header field and re-seal the header checksum (a well-formed but lying header)."""
    from kvlink.codec import checksum

    buf = bytearray(wire)
    struct.pack_into(fmt, buf, offset, value)
    header_len = struct.unpack_from("<I", buf, 8)[0]
    head = bytearray(buf[:header_len])
    struct.pack_into("<Q", head, 16, 0)
    struct.pack_into("<Q", buf, 16, checksum(head))
    return bytes(buf)


def test_bad_magic_and_version():
    _rejected(b"XXXX" + WIRE[4:], BadMagic)
    _rejected(WIRE[:4] + struct.pack("<H", 3) + WIRE[6:], UnsupportedVersion)


def test_v1_payload_is_refused_with_a_clear_error():
    dst, before = _dest()
    with pytest.raises(UnsupportedVersion, match="version 1 .*pack it again"):
        Unpacker(dst).unpack(WIRE[:4] + struct.pack("<H", 1) + WIRE[6:], REF)
    assert same(before, snapshot(dst))


def test_empty_and_short():
    _rejected(b"", LengthError)
    _rejected(WIRE[:10], LengthError)


def test_header_length_beyond_buffer():
    _rejected(_patch_header(WIRE, 8, "<I", PREFIX.size + ENTRY.size * 100_000), LengthError)
    _rejected(_patch_header(WIRE, 12, "<I", 1 << 30), LengthError)


def test_body_length_mismatch():
    _rejected(WIRE + b"\0", LengthError)
    _rejected(_patch_header(WIRE, 64, "<Q", 1 << 60), LengthError)


def test_segment_length_beyond_limit():
    seg0 = PREFIX.size
    _rejected(_patch_header(WIRE, seg0 + 48, "<Q", 1 << 50), LengthError)  # length of segment 0
    _rejected(_patch_header(WIRE, seg0 + 56, "<Q", 12345), LengthError)  # raw length vs shape


def test_unknown_codec():
    _rejected(_patch_header(WIRE, PREFIX.size + 6, "<B", 99), UnknownCodec)


def test_checksum_names_segment():
    """The classic path (a backend asked for by name) verifies before writing anything."""
    buf = bytearray(WIRE)
    buf[-3] ^= 0x10
    dst, before = _dest()
    with pytest.raises(ChecksumMismatch, match="layer 5 v"):
        Unpacker(dst, backend="reference").unpack(bytes(buf), REF)
    assert same(before, snapshot(dst))


def test_checksum_mismatch_on_the_fused_path_writes_only_the_payloads_blocks_and_slot():
    """Uncompressed segments of a CPU cache are verified while copied: the error comes after the
    write, which touched nothing the payload does not address."""
    buf = bytearray(WIRE)
    buf[-3] ^= 0x10
    dst, _ = _dest()
    before = outside_ref(dst, REF)
    with pytest.raises(ChecksumMismatch, match="layer 5 v"):
        Unpacker(dst).unpack(bytes(buf), REF)
    assert same(before, outside_ref(dst, REF))


def test_fingerprint_mismatch():
    other = CacheSpec("other-model", HYBRID.layers)
    dst = PagedCache.allocate(other, 16, BS, 3, fill="zeros")
    with pytest.raises(FingerprintMismatch):
        Unpacker(dst).unpack(WIRE, REF)


def test_shape_or_dtype_mismatch_with_same_fingerprint_is_rejected():
    # a lying sender: right fingerprint, wrong shape (re-sealed header)
    _rejected(_patch_header(WIRE, PREFIX.size + 16, "<I", 3), (IncompatibleLayoutError, LengthError))
    _rejected(_patch_header(WIRE, PREFIX.size + 2, "<H", 1), (IncompatibleLayoutError, LengthError))
    _rejected(_patch_header(WIRE, PREFIX.size + 4, "<B", 1), (IncompatibleLayoutError, LengthError))  # role


def test_wrong_token_count_or_table():
    _rejected(WIRE, IncompatibleLayoutError, ref=CacheRef(REF.block_ids, 21, 1))
    _rejected(WIRE, ConfigError, ref=CacheRef(list(REF.block_ids)[:3], 22, 1))
    _rejected(WIRE, ConfigError, ref=CacheRef(REF.block_ids, 22, 99))
    _rejected(WIRE, ConfigError, ref=CacheRef([0, 0, 1, 2, 3, 4], 22, 1))


def test_typed_errors_are_one_tree():
    for exc in (BadMagic, UnsupportedVersion, LengthError, UnknownCodec, ChecksumMismatch):
        assert issubclass(exc, WireFormatError) and issubclass(exc, KvlinkError)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=len(WIRE) - 1), which=st.sampled_from(["raw", "lz4"]))
def test_truncated_always_rejected(cut, which):
    wire = WIRE if which == "raw" else WIRE_LZ4
    cut = min(cut, len(wire) - 1)
    _rejected(wire[:cut], WireFormatError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["raw", "lz4"]))
def test_any_bit_flip_rejected(data, which):
    wire = WIRE if which == "raw" else WIRE_LZ4
    # half the flips land in the header, where they are most dangerous
    header_len = struct.unpack_from("<I", wire, 8)[0]
    hi = header_len - 1 if data.draw(st.booleans()) else len(wire) - 1
    pos = data.draw(st.integers(min_value=0, max_value=hi))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    buf = bytearray(wire)
    buf[pos] ^= 1 << bit
    _rejected(bytes(buf), WireFormatError)


def test_parse_never_allocates_from_lengths():
    # a 72-byte prefix claiming a 4 GiB body must fail on the buffer, not try to allocate
    with pytest.raises(LengthError):
        Payload.from_buffer(_patch_header(WIRE, 64, "<Q", (1 << 32))[: PREFIX.size])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(st.one_of(
        st.builds(FullAttention, st.integers(1, 3), st.integers(1, 9), st.none() | st.integers(1, 9),
                  st.sampled_from(["bfloat16", "float32", "float16"])),
        st.builds(lambda w, h, d: __import__("kvlink").SlidingWindow(h, d, window=w), st.integers(1, 12),
                  st.integers(1, 3), st.integers(1, 9)),
        st.builds(lambda r, l: __import__("kvlink").MLA(r, l), st.integers(1, 16), st.integers(1, 8)),
        st.builds(lambda a, b, c: __import__("kvlink").LinearAttention((a, b), "float32", c, "bfloat16"),
                  st.integers(1, 4), st.integers(1, 6), st.none() | st.tuples(st.integers(1, 8), st.integers(1, 3))),
    ), min_size=1, max_size=5),
    block_size=st.integers(1, 8),
    tokens=st.integers(0, 60),
    start_blocks=st.integers(0, 8),
    layout=st.sampled_from(["blocks_first", "kv_first", "split"]),
    codec=st.sampled_from(["none", "shuffle-lz4", "zstd"]),
    seed=st.integers(0, 1000),
)
def test_random_layouts_roundtrip(layers, block_size, tokens, start_blocks, layout, codec, seed):
    spec = CacheSpec("prop", tuple(layers))
    nb = max(1, -(-tokens // block_size)) + 3
    torch.manual_seed(seed)
    src = PagedCache.allocate(spec, nb, block_size, 2, layout=layout, fill="randn")
    dst = PagedCache.allocate(spec, nb + 2, block_size, 3, layout=layout, fill="zeros")
    start = min(start_blocks * block_size, (tokens // block_size) * block_size)
    src_ref = random_ref(nb, block_size, tokens, slot=1, token_start=start, seed=seed)
    dst_ref = random_ref(nb + 2, block_size, tokens, slot=2, seed=seed + 1)
    cfg = CodecConfig(kv_codec=codec, state_codec=codec)
    wire = Packer(src, codec=cfg).pack(src_ref).tobytes()
    Unpacker(dst).unpack(wire, dst_ref)
    # repacking the destination with the same range gives the same bytes: bit-exact both ways
    again = Packer(dst, codec=cfg).pack(CacheRef(dst_ref.block_ids, tokens, 2, start)).tobytes()
    assert Payload.from_buffer(again).header.segments == Payload.from_buffer(wire).header.segments
    assert again == wire


def test_is_payload_judges_by_header_and_length_only():
    from kvlink.serde.payload import is_payload

    payload = Packer(SRC).pack(REF)
    assert is_payload(WIRE) and is_payload(payload.buffers()) and is_payload(memoryview(WIRE))
    assert not is_payload(WIRE[:-1]) and not is_payload(WIRE + b"x")  # wrong total length
    assert not is_payload(b"") and not is_payload([]) and not is_payload(b"KVLK" + bytes(100))
    assert not is_payload(_patch_header(WIRE, 4, "<H", 9))  # unsupported version
    flipped = bytearray(WIRE)
    flipped[30] ^= 1  # inside the header: its checksum fails
    assert not is_payload(bytes(flipped))
    assert not is_payload(torch.zeros(4))  # not a buffer
    flipped = bytearray(WIRE)
    flipped[-1] ^= 1  # segment bytes are not hashed here (the receiver's verifier does that)
    assert is_payload(bytes(flipped))
