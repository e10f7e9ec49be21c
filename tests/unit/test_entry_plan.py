"""Entry plans: a pool entry packed through its plan is byte for byte what the general packer
makes, and a restore takes the plan only for exactly that header; anything else is parsed and
refused with the general path's typed error."""

import copy
import dataclasses
import sys

import numpy as np
import pytest
import torch

from kvlink.engine.pieces import restore_pieces
from kvlink.errors import ChecksumMismatch, ConfigError, IncompatibleLayoutError, PoolError
from kvlink.ops.runs import Runs, buffer_pieces, reference_runs
from kvlink.pool.index import FULL, SLIDING
from kvlink.serde import CacheRef, Packer, Payload
from kvlink.serde import entry_plan as plans
from kvlink.serde.wire import CHECKSUM_OFFSET, PayloadHeader, parse_header
from tests.unit.helpers import same, snapshot
from tests.unit.test_pool_entry_checks import P, REF, caches, entries_of, hit_for

GROUPS = [("full", (0, 1)), ("window", (2,))]


@pytest.mark.parametrize("group,layers", GROUPS)
def test_a_planned_pack_is_the_general_packers_payload(group, layers):
    src, _ = caches()
    for block in range(2):
        span = REF.span((block + 1) * P, block * P)
        general = Packer(src).pack(span, layers, group=group).tobytes()
        into = bytearray(len(general))
        Packer(src).pack(span, layers, group=group, into=into)
        assert bytes(into) == general
        assert plans.entry_plan(src, layers, span.token_start, span.num_tokens, group) is not None


def test_states_and_head_major_planes_have_no_plan():
    src, _ = caches()
    assert plans.entry_plan(src, (0,), 8, 8, "state") is None


def reseal(entry: bytes, change) -> bytes:
    """The entry with its header changed by ``change`` (a PayloadHeader -> PayloadHeader) and
    sealed again with a right header checksum."""
    header = parse_header(entry)
    new = change(header).encode()
    return new + entry[len(new):]


def restore(entries, dst):
    return restore_pieces(dst, hit_for(entries), entries, REF, P)


@pytest.mark.parametrize("case", ["segment-start", "fingerprint", "range"])
def test_a_header_not_the_plans_is_parsed_and_refused(case):
    src, dst = caches()
    entries = entries_of(src)
    key = next(k for k in entries if k[0] == FULL and k[1][1] == 1)

    def change(h: PayloadHeader) -> PayloadHeader:
        if case == "segment-start":
            return dataclasses.replace(h, segments=(dataclasses.replace(h.segments[0], token_start=0),
                                                    *h.segments[1:]))
        if case == "fingerprint":
            return dataclasses.replace(h, fingerprint=bytes(16))
        return dataclasses.replace(h, token_start=0)

    entries[key] = reseal(entries[key], change)
    before = snapshot(dst)
    with pytest.raises((PoolError, IncompatibleLayoutError)):
        restore(entries, dst)
    assert same(snapshot(dst), before)


def test_a_planned_header_with_a_wrong_header_checksum_is_refused_before_any_write():
    src, dst = caches()
    entries = entries_of(src)
    key = (SLIDING, hit_for(entries).sliding[0])
    broken = bytearray(entries[key])
    broken[CHECKSUM_OFFSET] ^= 1
    entries[key] = bytes(broken)
    before = snapshot(dst)
    with pytest.raises(ChecksumMismatch, match="header"):
        restore(entries, dst)
    assert same(snapshot(dst), before)


def test_a_planned_entry_whose_bytes_do_not_match_its_checksum_is_named():
    src, dst = caches()
    entries = entries_of(src)
    key = next(k for k in entries if k[0] == FULL and k[1][1] == 1)
    broken = bytearray(entries[key])
    broken[-1] ^= 0x40  # the last segment: layer 1's v
    entries[key] = bytes(broken)
    with pytest.raises(ChecksumMismatch, match=f"full entry {key[1].hex()[:16]} layer 1 v"):
        restore(entries, dst)


def test_every_planned_entry_restores_bit_exact():
    src, dst = caches()
    entries = entries_of(src)
    assert restore(entries, dst) == 8
    for layers, group in (((0, 1), "full"), ((2,), "window")):
        assert (Packer(dst).pack(REF, layers, group=group).tobytes()
                == Packer(src).pack(REF, layers, group=group).tobytes())
    assert any(plan is not None for plan in dst.entry_plans.values())


def test_plans_per_cache_are_bounded(monkeypatch):
    src, _ = caches()
    monkeypatch.setattr(plans, "_MAX_SEGMENTS", 4)  # two plans of layer 1's k and v
    for block in range(5):
        plans.entry_plan(src, (1,), block * P, (block + 1) * P, "full")
        assert sum(len(p.layouts) for p in src.entry_plans.values()) <= 4
    assert (( 1,), 4 * P, 5 * P, "full") in src.entry_plans  # the newest stays


def test_a_copied_cache_does_not_use_the_originals_plans():
    # Regression (review): a plan holds the cache tensors' addresses, and a deepcopy of the cache
    # carried its plans along: a restore into the copy wrote into the original.
    src, dst = caches()
    entries = entries_of(src)
    restore(entries, dst)  # dst's plans are made
    twin = copy.deepcopy(dst)
    for t in twin.entry_plans.values():
        assert t is None or t.anchor[2] != twin.tensor(*t.anchor[:2]).data_ptr()
    for cache in (dst, twin):
        for layer in range(3):
            for _, rows in cache.planes(layer):
                rows.zero_()
    before = snapshot(dst)
    assert restore(entries, twin) == 8
    assert same(snapshot(dst), before), "the restore into the copy wrote into the original"
    for layers, group in (((0, 1), "full"), ((2,), "window")):
        assert (Packer(twin).pack(REF, layers, group=group).tobytes()
                == Packer(src).pack(REF, layers, group=group).tobytes())


def test_plane_jobs_added_in_bulk_keep_their_place_among_other_jobs():
    a = torch.arange(4096, dtype=torch.uint8)
    b, c, d = (torch.zeros(4096, dtype=torch.uint8) for _ in range(3))
    runs = Runs()
    first = runs.add(buffer_pieces(a[:1000]), buffer_pieces(b[:1000]))
    bulk = runs.add_planes(np.array([[c.data_ptr(), a.data_ptr(), 0, 512, 0, 512, 0, 0],
                                     [c.data_ptr() + 512, a.data_ptr() + 512, 0, 512, 0, 512, 0, 0]], np.int64))
    last = runs.add(buffer_pieces(a[2000:3000]), buffer_pieces(d[:1000]))
    assert (first, bulk, last, len(runs)) == (0, 1, 3, 4)
    got = runs.run()
    want = [reference_runs([a.data_ptr() + s], [0], [n], [0, 1], 1)[0] for s, n in ((0, 1000), (0, 512),
                                                                                     (512, 512), (2000, 1000))]
    assert got == want
    assert torch.equal(b[:1000], a[:1000]) and torch.equal(c[:1024], a[:1024]) and torch.equal(d[:1000], a[2000:3000])
    with pytest.raises(ConfigError):
        runs.add_planes(np.zeros((1, 7), np.int64))


def test_a_checked_id_list_is_registered_once_per_batch():
    src, _ = caches()
    ref = CacheRef([0, 1], 8, 0).checked(src)
    runs, seen = Runs(), {}
    at = {plans.register_ids(runs, src, ref.span(8, 4), seen), plans.register_ids(runs, src, ref.span(4), seen)}
    assert len(at) == 1 and len(seen) == 1
    with pytest.raises(ConfigError):
        plans.register_ids(runs, src, ref.span(12, 8), seen)  # past the request's blocks


def test_packing_into_a_buffer_returns_the_payload_it_wrote():
    src, _ = caches()
    span = REF.span(P)
    into = bytearray(Packer(src).wire_nbytes(span, (0, 1), "full"))
    payload = Packer(src).pack(span, (0, 1), group="full", into=into)
    assert payload.tobytes() == bytes(into) and isinstance(payload, Payload)
    payload.verify()


def test_plans_made_from_many_threads_at_once_stay_consistent(monkeypatch):
    # Stores and loads of one cache run in several threads: making, evicting and looking up
    # plans at once must neither raise (a dict changed while summed) nor hand out a wrong plan.
    import threading

    src, _ = caches()
    monkeypatch.setattr(plans, "_MAX_SEGMENTS", 16)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up at once
    errors, start = [], threading.Barrier(4)

    def work(seed):
        start.wait()
        try:
            for i in range(300):
                block = (seed * 7 + i) % 40
                plan = plans.entry_plan(src, (1,), block * P, (block + 1) * P, "full")
                assert plan.layouts[0].token_start == block * P
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:1]


def test_a_state_codec_does_not_keep_kv_entries_off_their_plans():
    # Plans hold token segments only: a compressed state codec says nothing about them.
    from kvlink.config import CodecConfig

    src, _ = caches()
    packer = Packer(src, CodecConfig(state_codec="zstd"))
    span = REF.span(P)
    into = bytearray(packer.wire_nbytes(span, (0, 1), "full"))
    src.entry_plans.clear()
    packer.pack(span, (0, 1), group="full", into=into)
    assert bytes(into) == Packer(src).pack(span, (0, 1), group="full").tobytes()
    assert src.entry_plans[((0, 1), 0, P, "full")] is not None
