"""PayloadScan: the streaming form of payload_intact gives its verdict for any advance pattern."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlink.codec.checksum import checksum
from kvlink.ops.runs import native_available
from kvlink.serde.payload import PayloadScan, payload_intact
from kvlink.serde.wire import PREFIX
from kvlink.serde.wire import parse_header as parse_payload_header

from .test_serde_bad_input import WIRE, WIRE_LZ4


def scan(buf, steps) -> bool:
    s = PayloadScan(memoryview(buf))
    end = 0
    for step in steps:
        end += step
        s.advance(end)
    s.advance(len(buf))
    return s.verdict()


@pytest.mark.parametrize("wire", [WIRE, WIRE_LZ4], ids=["raw", "lz4"])
@pytest.mark.parametrize("step", [1, 7, PREFIX.size - 1, 4096, 1 << 30])
def test_intact_payload_passes_whatever_the_steps(wire, step):
    assert payload_intact(wire)
    assert scan(wire, [step] * (len(wire) // step + 1))


def test_scan_is_not_done_before_the_end():
    s = PayloadScan(memoryview(WIRE))
    s.advance(len(WIRE) - 1)
    assert not s.verdict() and s.scanned == len(WIRE) - 1
    s.advance(len(WIRE) - 5)  # going back is ignored
    assert s.scanned == len(WIRE) - 1
    s.advance(len(WIRE))
    assert s.verdict()


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, len(WIRE) - 1), bit=st.integers(0, 7), seed=st.integers(0, 2**32 - 1))
def test_any_flipped_bit_fails_like_payload_intact(pos, bit, seed):
    bad = bytearray(WIRE)
    bad[pos] ^= 1 << bit
    rng = random.Random(seed)
    steps = [rng.randint(1, 9000) for _ in range(len(bad) // 1000 + 2)]
    assert not payload_intact(bad)
    assert not scan(bad, steps)
    if native_available():  # and landed the way a reader thread lands it
        assert not land(bad, steps)[0]


@pytest.mark.parametrize("wire", [WIRE[:-1], WIRE + b"\0", WIRE[:PREFIX.size - 1], b"", b"KVLK" + bytes(200)],
                         ids=["short", "long", "prefix-only", "empty", "zeros"])
def test_malformed_buffers_fail_like_payload_intact(wire):
    assert not payload_intact(wire)
    assert not scan(wire, [3, 100, 5000])


needs_native = pytest.mark.skipif(not native_available(), reason="native CPU library not built")


def with_empty_segments(wire: bytes, where: list[int]) -> bytes:
    """``wire`` with an empty segment inserted before each index in ``where`` (len: at the end)."""
    header = parse_payload_header(wire)
    segs = list(header.segments)
    for i in sorted(where, reverse=True):
        at = segs[i - 1].offset + segs[i - 1].length if i else 0
        segs.insert(i, dataclasses.replace(segs[min(i, len(segs) - 1)], shape=(0,), offset=at, length=0,
                                           raw_nbytes=0, checksum=checksum(b"")))
    new = dataclasses.replace(header, segments=tuple(segs))
    return new.encode() + wire[header.header_len:]


@needs_native
@pytest.mark.parametrize("where", [[0], [1], ["end"], [0, 1, "end"]], ids=["first", "middle", "last", "all"])
def test_landing_passes_payloads_with_empty_segments(where):
    # took() closed only the segment that ended at its end: an empty segment after it left
    # hot_span an empty span (the reader then aborted its connection) or, at the end, the verdict
    # False for an intact payload (resent until the retries ran out).
    n = len(parse_payload_header(WIRE).segments)
    wire = with_empty_segments(WIRE, [n if w == "end" else w for w in where])
    assert payload_intact(wire) and scan(wire, [4096])
    for step in (1, 4096, 1 << 30):
        assert land(wire, [step])[0]


@needs_native
def test_landing_fails_a_bad_empty_segment():
    n = len(parse_payload_header(WIRE).segments)
    wire = bytearray(with_empty_segments(WIRE, [n]))
    header = parse_payload_header(bytes(wire))
    segs = list(header.segments)
    segs[-1] = dataclasses.replace(segs[-1], checksum=segs[-1].checksum ^ 1)
    bad = dataclasses.replace(header, segments=tuple(segs)).encode() + bytes(wire[header.header_len:])
    assert not payload_intact(bad) and not land(bad, [4096])[0]


def land(buf, steps) -> tuple[bool, int]:
    """Feed ``buf`` the way a reader thread lands it: spans from hot_span, each hashed into the
    scan's native state as it 'arrives' (in pieces of the given steps), then took(). Returns
    the verdict and how many bytes were hashed on landing."""
    from kvlink.ops.landing import Xxh3State

    s = PayloadScan(memoryview(buf))
    assert isinstance(s._hash, Xxh3State)
    view, pos, hot, i = memoryview(buf), 0, 0, 0
    while pos < len(buf):
        stop, state = s.hot_span(pos)
        assert pos < stop <= len(buf)
        end = min(stop, pos + steps[i % len(steps)])
        i += 1
        if state:
            assert state == s._hash.address
            s._hash.update(view[pos:end])
            hot += end - pos
        s.took(end, bool(state))
        pos = end
    return s.verdict(), hot


@needs_native
@pytest.mark.parametrize("wire", [WIRE, WIRE_LZ4], ids=["raw", "lz4"])
@pytest.mark.parametrize("step", [1, 7, PREFIX.size - 1, 4096, 1 << 30])
def test_landing_hashes_every_segment_byte_and_passes_an_intact_payload(wire, step):
    ok, hot = land(wire, [step])
    header_len = parse_payload_header(wire).header_len
    assert ok and hot == len(wire) - header_len


@needs_native
@pytest.mark.parametrize("wire", [WIRE[:-1], WIRE + b"\0", WIRE[:PREFIX.size - 1], b"KVLK" + bytes(200)],
                         ids=["short", "long", "prefix-only", "zeros"])
def test_landing_fails_malformed_buffers(wire):
    assert not land(wire, [3, 100, 5000])[0]


@needs_native
def test_landing_and_advancing_mix():
    """A scan landed hot up to a point, then advanced over bytes another thread landed (cold)."""
    s = PayloadScan(memoryview(WIRE))
    pos = 0
    while pos < len(WIRE) // 2:
        stop, state = s.hot_span(pos)
        end = min(stop, len(WIRE) // 2)
        if state:
            s._hash.update(memoryview(WIRE)[pos:end])
        s.took(end, bool(state))
        pos = end
    s.advance(len(WIRE))
    assert s.verdict()
    with pytest.raises(ValueError):
        s.hot_span(3)
