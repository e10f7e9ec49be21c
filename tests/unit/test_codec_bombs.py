"""Decompression bombs and undefined header bits: refused with typed errors, memory stays small.

python-zstandard's one-shot ``decompress`` sizes its output by the frame's declared content size
and ignores ``max_output_size``: a 32 KiB frame declaring 1 GiB used to allocate 1 GiB, one
declaring 2**40 raised a bare MemoryError. Decoders now never allocate past the segment's raw size.
"""

import contextlib
import dataclasses
import struct
import tracemalloc

import lz4.block
import pytest
import torch
import zstandard

from kvlink.codec import Codec, checksum, decode, encode
from kvlink.errors import CodecError, KvlinkError, WireFormatError
from kvlink.serde import CacheRef, Packer, PagedCache, Unpacker
from kvlink.serde.payload import Payload, PayloadScan, payload_intact
from kvlink.serde.wire import PREFIX, PayloadHeader, parse_header
from kvlink.config import CodecConfig
from kvlink.spec import CacheSpec, FullAttention

from .helpers import same, snapshot

RAW = 64 << 10  # raw bytes of each segment below (256 tokens x 2 heads x 64 dims x bf16)
SPEC = CacheSpec("bomb-test", (FullAttention(2, 64),))
REF = CacheRef(list(range(16)), 256, 0)
MIB = 1 << 20


def zstd_rle_frame(content: int, declared: int | None, window_log: int = 20) -> bytes:
    """A hand-built zstd frame of RLE blocks (4 bytes per 128 KiB) decoding to ``content`` zero
    bytes, declaring ``declared`` as its content size (None: size not written)."""
    if declared is None:
        fhd, fcs = 0x00, b""
    elif declared < 1 << 32:
        fhd, fcs = 0x80, struct.pack("<I", declared)
    else:
        fhd, fcs = 0xC0, struct.pack("<Q", declared)
    out = bytearray(struct.pack("<IBB", 0xFD2FB528, fhd, (window_log - 10) << 3) + fcs)
    left = content
    while True:
        n = min(left, 128 << 10)
        left -= n
        out += (n << 3 | 1 << 1 | (left == 0)).to_bytes(3, "little") + b"\0"  # RLE block of n zeros
        if not left:
            return bytes(out)


def rss_peak_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return None


@contextlib.contextmanager
def bounded_memory(limit: int, trace: bool = True):
    """Fail unless the block's peak memory (Python allocations unless ``trace`` is off, and the
    resident set where Linux lets a process reset its peak) grows by less than ``limit`` bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        rss0 = rss_peak_kib()
    except OSError:
        rss0 = None
    if trace:
        tracemalloc.start()
    try:
        yield
    finally:
        if trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < limit, f"peak Python allocations {peak / MIB:.1f} MiB"
        if rss0 is not None:
            grown = (rss_peak_kib() - rss0) << 10
            assert grown < limit, f"resident set grew by {grown / MIB:.1f} MiB"


def test_rle_frame_is_a_real_bomb():
    # The test frame is what it claims: a 32 KiB frame that zstd itself expands to 1 GiB.
    frame = zstd_rle_frame(1 << 30, 1 << 30)
    assert len(frame) <= 33 << 10
    reader = zstandard.ZstdDecompressor().stream_reader(frame)
    assert len(reader.read(4 * MIB)) == 4 * MIB


@pytest.mark.parametrize("declared", [1 << 30, 1 << 40, RAW + 1, RAW - 1])
def test_zstd_declared_size_beyond_raw_is_refused_without_allocating(declared):
    frame = zstd_rle_frame(min(declared, 1 << 30), declared)
    with bounded_memory(16 * MIB), pytest.raises(CodecError):
        decode(Codec.ZSTD, frame, torch.uint8, RAW)


def test_zstd_undeclared_size_stops_at_raw():
    frame = zstd_rle_frame(1 << 30, None)
    with bounded_memory(16 * MIB), pytest.raises(CodecError):
        decode(Codec.ZSTD, frame, torch.uint8, RAW)


def test_zstd_huge_window_trailing_frames_and_garbage_refused():
    good = bytes(encode(Codec.ZSTD, torch.arange(RAW, dtype=torch.uint8) % 7))
    assert torch.equal(decode(Codec.ZSTD, good, torch.uint8, RAW), torch.arange(RAW, dtype=torch.uint8) % 7)
    with bounded_memory(16 * MIB), pytest.raises(CodecError):  # a 2 GiB window for 64 KiB of output
        decode(Codec.ZSTD, zstd_rle_frame(RAW, None, window_log=31), torch.uint8, RAW)
    with bounded_memory(16 * MIB):  # declared and fitting: zstd decodes straight into the output
        assert not decode(Codec.ZSTD, zstd_rle_frame(RAW, RAW, window_log=31), torch.uint8, RAW).any()
    for tail in (good, b"\0" * 8, zstd_rle_frame(1 << 30, None)):
        with bounded_memory(16 * MIB), pytest.raises(CodecError):
            decode(Codec.ZSTD, good + tail, torch.uint8, RAW)
    with pytest.raises(CodecError):
        decode(Codec.ZSTD, good[:-3], torch.uint8, RAW)


def test_lz4_bomb_and_impossible_sizes_refused():
    bomb = lz4.block.compress(bytes(8 * MIB), store_size=False)  # ~32 KiB expanding 255x
    with bounded_memory(4 * MIB), pytest.raises(CodecError):
        decode(Codec.LZ4, bomb, torch.uint8, RAW)
    for raw in (1 << 31, 1 << 40):  # beyond the block format (used to escape as OverflowError)
        with bounded_memory(4 * MIB), pytest.raises(CodecError):
            decode(Codec.LZ4, bomb, torch.uint8, raw)
    with bounded_memory(4 * MIB), pytest.raises(CodecError):  # more than 255x its size: refused up front
        decode(Codec.LZ4, b"\x1f\0" * 8, torch.uint8, 1 << 30)


def test_fp8_and_bad_arguments_refused():
    with pytest.raises(CodecError):
        decode(Codec.FP8_E4M3, b"\0" * 64, torch.bfloat16, 1 << 40)
    with pytest.raises(CodecError):
        decode(Codec.FP8_E4M3, b"\0" * 5, torch.bfloat16, 1, fp8_group=0)
    with pytest.raises(CodecError):
        decode(Codec.ZSTD, b"", torch.uint8, -1)


# --- the same bombs inside valid framing, through the Unpacker -------------------------------------

def source_wire(kv_codec: str = "zstd") -> bytes:
    torch.manual_seed(0)
    cache = PagedCache.allocate(SPEC, 16, 16, fill="randn")
    return Packer(cache, CodecConfig(kv_codec=kv_codec)).pack(REF).tobytes()


def reseal(header: PayloadHeader, datas: list[bytes]) -> bytes:
    """A payload with these segment bytes: offsets, lengths and every checksum recomputed, so only
    the decoder can notice what is wrong inside a segment."""
    segs, offset = [], 0
    for seg, data in zip(header.segments, datas):
        segs.append(dataclasses.replace(seg, offset=offset, length=len(data), checksum=checksum(data)))
        offset += len(data)
    header = dataclasses.replace(header, segments=tuple(segs))
    return header.encode() + b"".join(datas)


def split(wire: bytes) -> tuple[PayloadHeader, list[bytes]]:
    p = Payload.from_buffer(wire)
    return p.header, [bytes(d) for d in p.datas]


def test_bomb_in_a_valid_payload_is_refused_and_writes_nothing():
    header, datas = split(source_wire("zstd"))
    assert header.segments[0].codec is Codec.ZSTD and header.segments[0].raw_nbytes == RAW
    for bomb in (zstd_rle_frame(1 << 30, 1 << 30), zstd_rle_frame(1 << 30, 1 << 40), zstd_rle_frame(1 << 30, None)):
        wire = reseal(header, [bomb, *datas[1:]])
        assert payload_intact(wire)  # the framing is valid: only decoding can catch it
        dst = PagedCache.allocate(SPEC, 16, 16, fill="randn")
        before = snapshot(dst)
        with bounded_memory(32 * MIB), pytest.raises(CodecError):
            Unpacker(dst).unpack(wire, REF)
        assert same(before, snapshot(dst))


def patch_and_seal(wire: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(wire)
    struct.pack_into(fmt, buf, offset, value)
    header_len = struct.unpack_from("<I", buf, 8)[0]
    struct.pack_into("<Q", buf, 16, 0)
    struct.pack_into("<Q", buf, 16, checksum(bytes(buf[:header_len])))
    return bytes(buf)


@pytest.mark.parametrize("where,fmt,value", [
    (6, "<H", 1), (6, "<H", 0x8000),          # header flags: v2 defines none
    (60, "<I", 1),                             # header reserved
    (PREFIX.size + 10, "<H", 1 << 15),         # segment 0 reserved
    (PREFIX.size + 4, "<B", 3),                # segment 0 role: neither tokens nor state
    (PREFIX.size + 8, "<H", 3),                # codec parameter on a zstd segment
])
def test_undefined_bits_are_refused(where, fmt, value):
    wire = source_wire()
    bad = patch_and_seal(wire, where, fmt, value)
    with pytest.raises(WireFormatError):
        parse_header(bad)
    assert not payload_intact(bad)
    scan = PayloadScan(bad)
    scan.advance(len(bad))
    assert not scan.verdict()
    dst = PagedCache.allocate(SPEC, 16, 16, fill="randn")
    before = snapshot(dst)
    with pytest.raises(KvlinkError):
        Unpacker(dst).unpack(bad, REF)
    assert same(before, snapshot(dst))
    assert payload_intact(wire)


def test_fp8_group_beyond_the_wire_exponent_is_refused_at_config():
    # The wire stores the group as an exponent 0..16; 2**17 used to make payloads no receiver reads.
    from kvlink.config import CodecConfig
    from kvlink.errors import ConfigError

    CodecConfig(fp8_group=1 << 16)
    with pytest.raises(ConfigError):
        CodecConfig(fp8_group=1 << 17)
