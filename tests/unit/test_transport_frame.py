"""Frame headers and the token bucket."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlink.errors import BadMagic, ChecksumMismatch, ConfigError, LengthError, UnsupportedVersion, WireFormatError
from kvlink.transport.frame import HEADER_SIZE, FrameType, check_body, make_frame, parse_header
from kvlink.transport.pacing import TokenBucket


def test_roundtrip_and_body_check():
    body = bytes(range(256)) * 10
    head, view = make_frame(FrameType.DATA, transfer_id=7, stream=3, offset=4096, body=body)
    assert len(head) == HEADER_SIZE
    header = parse_header(head, max_data=1 << 20)
    assert (header.type, header.transfer_id, header.stream, header.offset, header.length) == (FrameType.DATA, 7, 3, 4096, 2560)
    check_body(header, view)
    bad = bytearray(body)
    bad[100] ^= 4
    with pytest.raises(ChecksumMismatch, match="offset 4096"):
        check_body(header, bad)


def test_limits():
    head, _ = make_frame(FrameType.DATA, body=b"x" * 100)
    with pytest.raises(LengthError):
        parse_header(head, max_data=99)
    head, _ = make_frame(FrameType.ERROR, body=b"x" * (64 << 10 + 1))
    with pytest.raises(LengthError):
        parse_header(head, max_data=1 << 30)
    with pytest.raises(LengthError):
        parse_header(head[:-1], max_data=1 << 30)


def test_magic_version_type():
    head, _ = make_frame(FrameType.ACK)
    with pytest.raises(BadMagic):
        parse_header(b"XXXX" + head[4:], 1 << 20)
    with pytest.raises(UnsupportedVersion):
        parse_header(head[:4] + b"\x02" + head[5:], 1 << 20)
    forged = bytearray(head)
    forged[5] = 200  # unknown type, header checksum recomputed
    from kvlink.codec import checksum
    forged[44:48] = (checksum(bytes(forged[:44])) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(WireFormatError, match="unknown frame type"):
        parse_header(bytes(forged), 1 << 20)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, HEADER_SIZE - 1), bit=st.integers(0, 7))
def test_any_header_bit_flip_rejected(pos, bit):
    head = bytearray(make_frame(FrameType.DATA, 1, 2, 3, b"abc")[0])
    head[pos] ^= 1 << bit
    with pytest.raises(WireFormatError):
        parse_header(bytes(head), 1 << 20)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_paces_to_rate():
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=500, clock=clock)
    assert bucket.reserve(500) == 0.0          # the burst goes at once
    assert bucket.reserve(250) == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.reserve(100) == pytest.approx(0.1)
    # over a long run, sent bytes / elapsed converges to the rate
    sent, t0 = 0, clock.now
    for _ in range(1000):
        clock.now += bucket.reserve(64)
        sent += 64
    assert sent / (clock.now - t0) == pytest.approx(1000, rel=0.01)


def test_token_bucket_burst_is_bounded_and_rate_changes():
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=100, clock=clock)
    clock.now += 60  # idle for a minute: still only one burst of credit
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)
    bucket.set_rate(4000)
    clock.now += 0.1  # earns 400 bytes, but credit stops at the 100-byte burst
    assert bucket.reserve(400) == pytest.approx(300 / 4000)
    with pytest.raises(ConfigError):
        bucket.set_rate(0)


async def test_acquire_waits_on_the_loop():
    import asyncio

    loop = asyncio.get_running_loop()
    bucket = TokenBucket(rate=1e6, burst=10_000)
    start = loop.time()
    await bucket.acquire(10_000)  # burst: no wait
    await bucket.acquire(2_000)   # 2 ms of debt: the loop must sleep at least that long
    assert loop.time() - start >= 0.0019


def _resealed(head: bytes, offset: int, fmt: str, value: int) -> bytes:
    import struct

    from kvlink.codec import checksum

    buf = bytearray(head)
    struct.pack_into(fmt, buf, offset, value)
    struct.pack_into("<I", buf, 44, checksum(bytes(buf[:44])) & 0xFFFFFFFF)
    return bytes(buf)


def test_reserved_field_and_undefined_flags_are_refused():
    # Version 1 defines only DATA's UNCHECKED bit; anything else set (with a valid header
    # checksum) was silently accepted before, leaving no room for a later version's meaning.
    head, _ = make_frame(FrameType.DATA, body=b"x" * 10, flags=1)
    assert parse_header(head, 1 << 20).flags == 1
    with pytest.raises(WireFormatError, match="reserved"):
        parse_header(_resealed(head, 40, "<I", 1), 1 << 20)
    with pytest.raises(WireFormatError, match="flag"):
        parse_header(_resealed(head, 6, "<H", 2), 1 << 20)
    ack, _ = make_frame(FrameType.ACK, body=b"")
    with pytest.raises(WireFormatError, match="flag"):
        parse_header(_resealed(ack, 6, "<H", 1), 1 << 20)


def test_repace_keeps_one_bucket_and_its_earned_tokens():
    from kvlink.transport.pacing import repace

    assert repace(None, None, None, 1 << 20) is None
    bucket = repace(None, 1e9, None, 1 << 20)
    assert bucket.rate == 1e9 and bucket.burst == 4_000_000  # ~4 ms at the rate
    assert repace(bucket, 1e9, None, 1 << 20) is bucket
    slow = repace(bucket, 1e6, None, 1 << 20)
    assert slow is bucket and bucket.rate == 1e6 and bucket.burst == 1 << 20  # at least one grid chunk
    assert repace(bucket, 1e6, 8 << 20, 1 << 20).burst == 8 << 20  # a configured burst wins
    assert repace(bucket, None, None, 1 << 20) is None
