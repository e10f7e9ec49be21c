"""Pool entries of a request, packed out of and restored into a paged cache.

A pool block of ``P`` tokens (a multiple of the cache's block size) is stored as self-describing
payloads: its full-window token tensors (one ``full`` entry: K/V, MLA latents, indexer keys),
its windowed ones (a ``sliding`` entry: sliding and chunked windows) and, when a state checkpoint
lies at its end, every state tensor (a ``state`` entry). A layer holding attention and an SSM
contributes to both.
Every entry carries its own checksums and the spec fingerprint, so a restore from any tier (or
from the daemon) is verified before a byte lands in the cache.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import numpy as np
import torch

from kvlink.codec import Codec
from kvlink.errors import ChecksumMismatch, ConfigError, EntryMissing, LengthError, PoolError
from kvlink.ops.runs import Runs, buffer_pieces, concat, slice_pieces
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit
from kvlink.pool.slab import Landing
from kvlink.serde import CacheRef, Packer, PagedCache, Payload, StagingArena, Unpacker, check_compatible
from kvlink.serde.entry_plan import EntryPlan, address, entry_plan, register_ids
from kvlink.serde.fused import add_segment, fused_usable, segment_pieces
from kvlink.serde.wire import PREFIX, PayloadHeader, parse_header, peek_lengths


_GROUP = {FULL: "full", SLIDING: "window", STATE: "state"}  # pool entry kind -> spec component group


def _groups(cache: PagedCache) -> dict[str, list[int]]:
    """Layers holding components of each entry kind."""
    return {kind: sorted({layer for layer, _ in cache.spec.group(group)}) for kind, group in _GROUP.items()}


def check_block_size(cache: PagedCache, pool_block: int) -> None:
    if pool_block % cache.block_size:
        raise ConfigError(f"pool block size {pool_block} must be a multiple of the cache's {cache.block_size}")


def pack_pieces(cache: PagedCache, ref: CacheRef, pool_block: int, first_block: int = 0, landing=None,
                staging: StagingArena | None = None, held: list | None = None) -> dict:
    """``{(kind, block): value}`` for every full pool block of ``ref`` from ``first_block`` on.

    With ``landing`` (a pool's :meth:`~kvlink.pool.pool.Pool.landing`) and a CPU cache, each
    entry is packed straight into pool pages reserved for it (checksums computed on the way), so
    the pool keeps them without another copy: the value is that landing, and the caller calls
    :func:`release_pieces` after the store (it hands back what was not kept). Otherwise (or when
    the pool has no room for a run of pages) the value is a payload's header and segment
    buffers: the pool and the transport take them as they are, without joining them.

    The state entry goes with the last block only when the request ends exactly on a pool
    block boundary: the slot holds the state at ``ref.num_tokens`` and nowhere else.

    ``staging`` (with ``held``): payloads are packed into leases of that arena (a buffer of their
    own when it is full) and appended to ``held``; release them once the pieces were sent.
    """
    check_block_size(cache, pool_block)
    ref = ref.checked(cache)
    packer = Packer(cache, staging=staging, overflow=True)
    groups = _groups(cache)
    nblocks = ref.num_tokens // pool_block
    direct = landing is not None and fused_usable(cache, None)
    pieces: dict = {}
    landed = []  # (ref, layers, group, into) packed together once every room is reserved

    def pack(key, span, kind, group):
        if direct:
            room = landing(packer.wire_nbytes(span, groups[kind], group))
            if room is not None:
                pieces[key] = room
                landed.append((span, groups[kind], group, room.view))
                return
        payload = packer.pack(span, groups[kind], group=group)
        if held is not None:
            held.append(payload)
        pieces[key] = payload.buffers()

    try:
        for b in range(first_block, nblocks):
            span = ref.span((b + 1) * pool_block, b * pool_block)
            for kind in (FULL, SLIDING):
                if groups[kind]:
                    pack((kind, b), span, kind, _GROUP[kind])
        if groups[STATE] and nblocks and nblocks * pool_block == ref.num_tokens:
            pack((STATE, nblocks - 1), ref.span(ref.num_tokens, ref.num_tokens), STATE, "state")
        if landed:
            packer.pack_into_many(landed)  # the whole request in one native batch
    except BaseException:
        release_pieces(pieces)
        raise
    return pieces


def release_pieces(pieces: dict) -> None:
    """Hand back the pool pages of :func:`pack_pieces` values the pool did not keep."""
    for value in pieces.values():
        if isinstance(value, Landing):
            value.release()


def restore_pieces(cache: PagedCache, hit: PrefixHit, entries: dict, ref: CacheRef, pool_block: int) -> int:
    """Write the entries of ``hit`` (``{(kind, key): value}``, a value being the entry's bytes or
    a list of buffers back to back: pool pages from ``Pool.pin_views``, the daemon's reply) into
    ``ref``'s blocks and slot; returns the tokens restored (``hit.tokens``).

    A value may also be a future of one (``Pool.pin_hit(background=True)``: an entry still
    being read from SSD), waited for when its turn comes.

    The hit is checked against the spec (a full entry per block, the window's blocks, a state
    exactly when the model has states), and each entry's header, token range, layers and
    components against its group, before anything is written (with futures: each entry before
    it is written). On a CPU cache
    the entries' bytes go straight from where they are into the cache, hashed on the way (one
    native batch for the hit; one per entry while entries are still arriving), so a
    :class:`~kvlink.errors.ChecksumMismatch` is raised after the write; with arriving entries an
    error in a later entry leaves the earlier ones written. Only ``ref``'s blocks from
    the hit and its slot are ever touched: on any error, treat them as not loaded. Elsewhere
    every checksum is verified before the first write. Raises :class:`PoolError` for a hit or
    entry of the wrong shape, :class:`EntryMissing` for an entry lost while it was read, and the
    entry's typed error otherwise
    (:class:`~kvlink.errors.ChecksumMismatch`, :class:`~kvlink.errors.FingerprintMismatch`,
    :class:`~kvlink.errors.IncompatibleLayoutError`, :class:`~kvlink.errors.LengthError`).
    """
    check_block_size(cache, pool_block)
    ref = ref.span(hit.tokens).checked(cache)  # the ids the hit needs, validated once
    groups = _groups(cache)
    blocks = hit.tokens // pool_block
    window = -(-cache.spec.window_tokens // pool_block) if groups[SLIDING] else 0
    want = {FULL: blocks if groups[FULL] else 0, SLIDING: min(window, blocks),
            STATE: 1 if groups[STATE] and blocks else 0}
    got = {FULL: len(hit.full), SLIDING: len(hit.sliding), STATE: int(hit.state is not None)}
    if hit.tokens % pool_block or got != want:
        raise PoolError(f"a hit of {hit.tokens} tokens with {got} entries cannot restore {cache.spec.name}: "
                        f"it needs {want}")
    jobs = [(FULL, key, b * pool_block, (b + 1) * pool_block) for b, key in enumerate(hit.full)]
    jobs += [(SLIDING, key, b * pool_block, (b + 1) * pool_block)
             for b, key in enumerate(hit.sliding, start=blocks - len(hit.sliding))]
    if hit.state is not None:
        jobs.append((STATE, hit.state, hit.tokens, hit.tokens))
    fused = fused_usable(cache, None)
    classic = []

    def check(kind: str, key: bytes, start: int, end: int) -> _Entry:
        value = _resolved(entries[(kind, key)], kind, key)
        span = ref.span(end, start)
        if fused:
            planned = _planned(cache, value, kind, key, span, groups[kind])
            if planned is not None:
                return planned
        header, pieces = entry_segments(value)
        _check_header(cache, kind, key, header, span, groups[kind])
        return _Entry(kind, key, span, value, header, pieces)

    def write(batch: list[_Entry]) -> None:
        """The fused copy when it can do all of ``batch``, else the classic path for each."""
        if not (fused and all(e.plan is not None or all(seg.codec is Codec.NONE for seg in e.header.segments)
                              for e in batch) and _restore_fused(cache, batch)):
            for e in batch:
                if e.header is None:  # accepted through its plan: parsed and checked now, as any other
                    e.header, e.pieces = entry_segments(e.value)
                    _check_header(cache, e.kind, e.key, e.header, e.span, groups[e.kind])
                classic.append((_payload_of(e.header, e.pieces, e.value), e.span, _GROUP[e.kind]))

    if any(isinstance(entries[(kind, key)], concurrent.futures.Future) for kind, key, _, _ in jobs):
        # Entries still being read from SSD: each is written as soon as it is in and checked,
        # so its copy overlaps the next one's read.
        for job in jobs:
            write([check(*job)])
    else:
        write([check(*job) for job in jobs])  # all checked before the first write, then one batch
    for payload, _, _ in classic:
        payload.verify()  # all of them before their first write
    unpacker = Unpacker(cache)
    for payload, span, group in classic:
        unpacker.unpack(payload, span, verify=False, group=group)
    return hit.tokens


def _check_header(cache: PagedCache, kind: str, key: bytes, header: PayloadHeader, span: CacheRef,
                  layers: list[int]) -> None:
    """Raise unless an entry's parsed header holds ``layers`` over ``span``'s tokens, as the
    spec expects them (:class:`PoolError`, or :func:`check_compatible`'s errors)."""
    got = sorted({seg.layer for seg in header.segments})
    if (header.token_start, header.token_end) != (span.token_start, span.num_tokens) or got != layers:
        raise PoolError(f"{kind} entry {key.hex()[:16]}: tokens [{header.token_start}, {header.token_end}) of "
                        f"layers {got}, expected [{span.token_start}, {span.num_tokens}) of layers {layers}")
    check_compatible(header, cache, span, _GROUP[kind])


def _resolved(value, kind: str, key: bytes):
    """An entry value, waiting for it when a pool reader is still bringing it in."""
    if isinstance(value, concurrent.futures.Future):
        value = value.result()
        if value is None:
            raise EntryMissing(f"{kind} entry {key.hex()[:16]} was lost while it was read; look up again")
    return value


def entry_segments(value) -> tuple[PayloadHeader, list]:
    """An entry's parsed header and each segment's bytes as pieces, read where they are (one
    buffer, or a list of buffers back to back) without joining them. Raises the typed
    :class:`~kvlink.errors.WireFormatError` of a malformed entry."""
    bufs = [memoryview(b).cast("B") if not isinstance(b, torch.Tensor) else memoryview(b.numpy()).cast("B")
            for b in (value if isinstance(value, (list, tuple)) else [value])]
    total = sum(b.nbytes for b in bufs)
    head = _first_bytes(bufs, PREFIX.size)
    if len(head) < PREFIX.size:
        raise LengthError(f"entry of {total} bytes is shorter than a payload header")
    header_len, body_len = peek_lengths(head)
    header = parse_header(_first_bytes(bufs, header_len))
    if header_len + body_len != total:
        raise LengthError(f"entry of {total} bytes, its header says {header_len + body_len}")
    all_pieces = concat([buffer_pieces(b) for b in bufs])
    pieces = []
    for seg in header.segments:
        if seg.offset + seg.length > body_len:
            raise LengthError(f"{seg.name}: bytes [{seg.offset}, {seg.offset + seg.length}) beyond a body of {body_len}")
        pieces.append(slice_pieces(all_pieces, header_len + seg.offset, seg.length))
    return header, pieces


def _first_bytes(bufs: list[memoryview], n: int) -> bytes:
    out, need = [], n
    for b in bufs:
        if need <= 0:
            break
        out.append(bytes(b[:need]))
        need -= len(out[-1])
    return b"".join(out)


def _payload_of(header: PayloadHeader, pieces: list, value) -> Payload:
    """The entry as a :class:`Payload` for the classic path: over its own buffer when it is one,
    else joined (an entry split over pages or reply parts: one copy)."""
    if not isinstance(value, (list, tuple)) or len(value) == 1:
        return Payload.from_buffer(value[0] if isinstance(value, (list, tuple)) else value)
    runs, datas = Runs(), []
    for src in pieces:
        datas.append(bytearray(int(src[1].sum())))
        runs.add(src, buffer_pieces(datas[-1]))
    runs.run(hash=False, stream=False)
    return Payload(header, datas)


@dataclass
class _Entry:
    """One entry of a hit, checked and ready to write: parsed (``header``, ``pieces``), or
    accepted through its layout's plan (``plan``, its bytes at ``addr``, its ``digests``)."""

    kind: str
    key: bytes
    span: CacheRef
    value: object
    header: PayloadHeader | None = None
    pieces: list | None = None
    plan: EntryPlan | None = None
    addr: int = 0
    digests: np.ndarray | None = None


def _planned(cache: PagedCache, value, kind: str, key: bytes, span: CacheRef, layers: list[int]) -> _Entry | None:
    """The entry through the plan of its layout, when it is one buffer holding exactly the
    payload that plan describes (see :mod:`kvlink.serde.entry_plan`); None to parse it."""
    bufs = value if isinstance(value, (list, tuple)) else [value]
    if len(bufs) != 1:
        return None
    buf = bufs[0]
    view = memoryview(buf.numpy() if isinstance(buf, torch.Tensor) else buf).cast("B")
    plan = entry_plan(cache, tuple(layers), span.token_start, span.num_tokens, _GROUP[kind])
    if plan is None or view.nbytes != plan.nbytes:
        return None
    digests = plan.read_header(np.frombuffer(view[:plan.header_len], np.uint64), f"{kind} entry {key.hex()[:16]}")
    if digests is None:
        return None
    return _Entry(kind, key, span, value, plan=plan, addr=address(view), digests=digests)


def _restore_fused(cache: PagedCache, checked: list[_Entry]) -> bool:
    """Every segment of every entry straight into the cache in one batch of copy-and-hash runs.
    False, having written nothing, when a plane's layout cannot be described by runs (e.g.
    head-major blocks, where a token's values are not adjacent): the classic path does it then."""
    runs, expect, seen = Runs(), [], {}
    for e in checked:
        if e.plan is not None:
            first = runs.add_planes(e.plan.jobs(e.addr, register_ids(runs, cache, e.span, seen), scatter=True))
            expect.append((first, e.digests, e, e.plan.layouts))
            continue
        ids, ids_host = e.span.block_ids_checked(cache)
        ids_np = np.asarray(ids_host, np.int64)
        ids_at = runs.block_ids(ids_np)
        for seg, src in zip(e.header.segments, e.pieces):
            slot = e.span.slot(cache, seg.layer) if seg.is_state else -1
            at = len(runs)
            if len(src[0]) != 1 or not add_segment(runs, cache, seg, ids_at, slot, int(src[0][0]), scatter=True):
                dst = segment_pieces(cache, seg, ids_np, slot)
                if dst is None:
                    return False
                runs.add(src, dst)
            expect.append((at, np.array([seg.checksum], np.uint64), e, (seg,)))
    got = runs.run_digests()
    for first, want, e, segs in expect:
        have = got[first:first + len(want)]
        if not np.array_equal(have, want):
            i = int(np.flatnonzero(have != want)[0])
            seg = segs[i]
            name = cache.spec.layers[seg.layer].components[seg.component].name
            raise ChecksumMismatch(f"{e.kind} entry {e.key.hex()[:16]} layer {seg.layer} {name}", int(want[i]),
                                   int(have[i]))
    return True
