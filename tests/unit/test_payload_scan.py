"""PayloadScan: the streaming form of payload_intact gives its verdict for any advance pattern."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlink.serde.payload import PayloadScan, payload_intact
from kvlink.serde.wire import PREFIX

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


@pytest.mark.parametrize("wire", [WIRE[:-1], WIRE + b"\0", WIRE[:PREFIX.size - 1], b"", b"KVLK" + bytes(200)],
                         ids=["short", "long", "prefix-only", "empty", "zeros"])
def test_malformed_buffers_fail_like_payload_intact(wire):
    assert not payload_intact(wire)
    assert not scan(wire, [3, 100, 5000])
