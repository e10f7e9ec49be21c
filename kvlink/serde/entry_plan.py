"""Plans of fixed-shape payloads of a CPU paged cache, made once and reused entry after entry.

An engine packs and restores the same pool block ranges request after request: a request of
N pool blocks is N payloads whose layout (segments, offsets, header) depends only on the block's
token range, the layers and the group. An :class:`EntryPlan` holds what that layout costs to
work out (the header's bytes, where its checksums go, one plane-job row per segment), so that
packing or restoring an entry is a few numpy operations and its share of one native batch of
copy-and-hash runs, instead of Python work per segment.

A restore accepts an entry through its plan only when the entry's header is, byte for byte,
the plan's header with its checksums filled in and the header checksum right: exactly the
header :func:`~kvlink.serde.wire.parse_header` and
:func:`~kvlink.serde.unpack.check_compatible` accept for that range (a plan is checked with them
when it is made). Anything else goes the general way, which names what is wrong.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from kvlink.codec import Codec, checksum
from kvlink.errors import ChecksumMismatch
from kvlink.serde.layout import SegmentLayout, payload_segments
from kvlink.ops.runs import Runs
from kvlink.serde.paged import CacheRef, CheckedIds, PagedCache
from kvlink.serde.unpack import check_compatible
from kvlink.serde.wire import CHECKSUM_OFFSET, ENTRY, PREFIX, PayloadHeader, SegmentHeader, header_nbytes, parse_header

_WORD = 8
_SUM_IN_ENTRY = ENTRY.size - _WORD  # a segment's checksum is the last field of its entry
_HEADER_SUM = CHECKSUM_OFFSET // _WORD
_MISSING = object()
_LOCK = threading.Lock()
_MAX_SEGMENTS = 1 << 17  # per cache, over all its plans (~140 bytes each); the oldest half goes first


@dataclass(frozen=True, eq=False)
class EntryPlan:
    """One payload layout of a CPU cache: uncompressed token segments of ``layers`` (``group``)
    over tokens ``[token_start, token_end)``, each a plane job of the cache's rows."""

    layouts: tuple[SegmentLayout, ...]
    header_len: int
    nbytes: int  # header and body
    words: np.ndarray  # the header as uint64 words, every checksum zero
    sums: np.ndarray  # index in ``words`` of each segment's checksum
    planes: np.ndarray  # [segments, 8] plane jobs: packed side relative to the payload's start, block ids to ``ids_at``
    anchor: tuple[int, int, int]  # (layer, component, address) of the first segment's tensor when made

    def jobs(self, addr: int, ids_at: int, scatter: bool) -> np.ndarray:
        """The plane jobs of the payload at address ``addr`` (whose bytes the caller owns and
        sized to :attr:`nbytes`), the request's block ids registered at ``ids_at``."""
        desc = self.planes.copy()
        desc[:, 0] += addr
        desc[:, 6] += ids_at
        desc[:, 7] = int(scatter)
        return desc

    def write_header(self, out: np.ndarray, digests: np.ndarray) -> None:
        """Write the header of the payload whose segments hash to ``digests`` into ``out``, the
        payload's first :attr:`header_len` bytes as uint64 words."""
        out[:] = self.words
        out[self.sums] = digests
        out[_HEADER_SUM] = checksum(memoryview(out).cast("B"))  # over the header, its own field zero

    def read_header(self, head: np.ndarray, name: str) -> np.ndarray | None:
        """The segment checksums of a payload whose header words are ``head``, when that header
        is this plan's with its checksums filled in; None when it is not (parse it the general
        way). Raises :class:`ChecksumMismatch` when it is, but its header checksum is wrong."""
        words = head.copy()
        expect = int(words[_HEADER_SUM])
        digests = words[self.sums].copy()
        words[self.sums] = 0
        words[_HEADER_SUM] = 0
        if not np.array_equal(words, self.words):
            return None
        words[self.sums] = digests
        got = checksum(memoryview(words).cast("B"))
        if got != expect:
            raise ChecksumMismatch(f"{name} header", expect, got)
        return digests


def entry_plan(cache: PagedCache, layers: tuple[int, ...], token_start: int, token_end: int,
               group: str | None) -> EntryPlan | None:
    """The plan of that payload for ``cache`` (made on first use, then remembered by the cache),
    or None when one segment cannot be a plane job (states, rows whose tokens are not adjacent):
    those payloads take the general way. The cache must be a CPU cache."""
    plans = cache.entry_plans
    key = (layers, token_start, token_end, group)
    plan = plans.get(key, _MISSING)  # lock-free: plans are only added and dropped under _LOCK
    if plan is not _MISSING and _current(cache, plan):
        return plan
    with _LOCK:  # stores and loads of one cache run in several threads
        plan = plans.get(key, _MISSING)
        if plan is not _MISSING:
            if _current(cache, plan):
                return plan
            plans.clear()  # a copy of the cache (deepcopy, unpickled): its plans address the original's memory
        plan = _make(cache, layers, token_start, token_end, group)
        plans[key] = plan
        held = sum(len(p.layouts) for p in plans.values() if p is not None)
        if held > _MAX_SEGMENTS:  # bounded: the oldest half goes; ranges still in use come back
            for old in list(plans)[:len(plans) // 2]:
                del plans[old]
        return plan


def _current(cache: PagedCache, plan: EntryPlan | None) -> bool:
    """Whether ``plan`` was made for this cache's memory (not copied along with the cache)."""
    return plan is None or cache.tensor(*plan.anchor[:2]).data_ptr() == plan.anchor[2]


def _make(cache: PagedCache, layers, token_start: int, token_end: int, group: str | None) -> EntryPlan | None:
    spec, bs = cache.spec, cache.block_size
    layouts = tuple(payload_segments(spec, layers, token_start, token_end, group))
    if not layouts:
        return None
    header_len = header_nbytes(len(layouts))
    rows_out, headers, offset = [], [], 0
    for seg in layouts:
        if seg.is_state:
            return None  # its slot differs request by request
        rows = cache.tensor(seg.layer, seg.component)
        if rows.dim() != 2 or rows.stride(1) != 1:
            return None
        es = rows.element_size()
        tok = rows.shape[1] // bs * es
        t0 = seg.token_start
        if seg.shape[0] * tok != seg.nbytes:
            return None
        rows_out.append((header_len + offset, rows.data_ptr(), rows.stride(0) * es, bs * tok, (t0 % bs) * tok,
                         seg.nbytes, t0 // bs, 0))
        headers.append(SegmentHeader(seg.layer, seg.component, False, seg.dtype, Codec.NONE, 0, t0, seg.shape,
                                     offset, seg.nbytes, seg.nbytes, 0))
        offset += seg.nbytes
    header = PayloadHeader(spec.fingerprint, token_start, token_end, bs, tuple(headers))
    encoded = header.encode()
    # What a restore accepts through this plan is what the general checks accept.
    check_compatible(parse_header(encoded), cache, CacheRef([], token_end, token_start=token_start), group)
    words = np.frombuffer(encoded, np.uint64).copy()
    words[_HEADER_SUM] = 0
    sums = (PREFIX.size + np.arange(len(layouts)) * ENTRY.size + _SUM_IN_ENTRY) // _WORD
    first = layouts[0]
    anchor = (first.layer, first.component, cache.tensor(first.layer, first.component).data_ptr())
    return EntryPlan(layouts, header_len, header_len + offset, words, sums.astype(np.int64),
                     np.array(rows_out, np.int64), anchor)


def register_ids(runs: Runs, cache: PagedCache, ref: CacheRef, seen: dict) -> int:
    """Check ``ref``'s token range and register its block ids with ``runs`` for plan jobs;
    returns where they start. A validated id list (:meth:`CacheRef.checked`) is registered once
    per ``seen`` (one dict per batch), however many spans of it come. Raises
    :class:`~kvlink.errors.ConfigError` for a bad reference."""
    ids = ref.block_ids
    if isinstance(ids, CheckedIds) and ids.cache is cache:
        ids.check(ref)
        at = seen.get(id(ids))
        if at is None:
            at = seen[id(ids)] = runs.block_ids(ids.ids.numpy())
        return at
    _, host = ref.block_ids_checked(cache)
    return runs.block_ids(np.asarray(host, np.int64))


def address(view: memoryview) -> int:
    """Address of the first byte of a contiguous buffer."""
    return np.frombuffer(view, np.uint8).ctypes.data
