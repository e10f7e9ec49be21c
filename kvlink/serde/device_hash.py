"""Checksums of payloads computed on the GPU, for packs from and unpacks into a GPU cache.

Packing: each uncompressed segment is gathered into device scratch; from there a side stream
copies it to its place in the staging lease (pinned, for the copies to overlap) while the main
stream hashes the scratch (:func:`kvlink.ops.digest.queue_xxh3`). The device-to-host copy is the
plain copy a pack makes anyway. Gathering into scratch rather than straight into pinned memory
costs device memory bandwidth only, and lets the hash read device memory instead of reading the
pinned copy back over PCIe. The host hashes only segments under 241 bytes (xxh3's short paths).

Unpacking with verification: the segments are copied to device scratch first, checked there,
and only then written into the cache from the scratch (:func:`land_verified`), so a mismatch
still leaves the cache untouched.

Without device memory for the scratch the call hashes on the host; where the kernels cannot run,
the device hashes on the host from then on. A CPU cache packed or unpacked with
``backend="triton"`` under ``TRITON_INTERPRET=1`` takes the device path without streams: that
is how CI runs it.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from kvlink.codec import Codec, checksum
from kvlink.codec.lossless import as_byte_tensor
from kvlink.config import OpsConfig
from kvlink.errors import BackendUnavailable, ChecksumMismatch, LengthError
from kvlink.ops import digest
from kvlink.serde.staging import ALIGN

log = logging.getLogger(__name__)

_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}
_BROKEN: set[torch.device] = set()  # devices whose kernels failed to build: hashed on the host since


def usable(cache_device: torch.device, backend: str | None, ops: OpsConfig) -> bool:
    """Whether a pack from (or a verified unpack into) a cache on ``cache_device`` hashes on the
    device: CUDA caches when Triton is there and ``ops.device_hash`` is on; CPU caches only when
    the ``triton`` gather backend was asked for and runs in the interpreter."""
    if not ops.device_hash or cache_device in _BROKEN:
        return False
    if cache_device.type == "cuda":
        return digest.available("cuda")
    return cache_device.type == "cpu" and backend == "triton" and digest.available("cpu")


def _fall_back(device: torch.device, exc: Exception) -> None:
    """After a device path failed for want of memory (that call only) or of working kernels (this
    device from now on): the caller hashes on the host instead."""
    if isinstance(exc, BackendUnavailable):
        _BROKEN.add(device)
        log.warning("hashing payloads of %s on the host from now on: %s", device, exc)
    else:
        log.warning("no device memory to hash on %s; this call hashes on the host: %s", device, exc)


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _batches(todo: list[tuple[int, int]], cap: int) -> list[list[tuple[int, int, int]]]:
    """``(index, nbytes)`` in order, grouped so each group's aligned scratch fits ``cap``:
    ``[(index, nbytes, scratch offset)]`` per group. A segment over ``cap`` is left out."""
    groups, group, used = [], [], 0
    for i, n in todo:
        size = -(-n // ALIGN) * ALIGN
        if size > cap:
            continue
        if used + size > cap:
            groups.append(group)
            group, used = [], 0
        group.append((i, n, used))
        used += size
    if group:
        groups.append(group)
    return groups


def pack_segments(gather, layouts, offsets, codecs, out: torch.Tensor, device: torch.device,
                  ops: OpsConfig) -> list:
    """Copy the uncompressed segments to ``out[offsets[i]:]`` hashing them on ``device``.

    ``gather(i, scratch, at)`` writes segment ``i``'s bytes into the device tensor ``scratch`` at
    byte ``at`` (on the current stream). Returns ``(data, checksum)`` per segment, None for those
    left to the caller: compressed ones, those over half of ``ops.device_scratch_bytes``, and all
    of them when the device has no memory for the scratch or its kernels cannot run there. Raises
    what ``gather`` raises otherwise; then ``out`` holds partial bytes.
    """
    results: list = [None] * len(layouts)
    todo = [(i, seg.nbytes) for i, (seg, codec) in enumerate(zip(layouts, codecs)) if codec is Codec.NONE]
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    side = _copy_stream(device) if cuda else None
    queued = []
    try:
        _queue_groups(gather, todo, offsets, out, device, ops, main, side, queued)
    except (torch.cuda.OutOfMemoryError, BackendUnavailable) as exc:
        _fall_back(device, exc)
        return results  # the caller's classic path writes and hashes every segment again
    for group, hashed, digests in queued:
        on_device = dict(zip((i for i, _, _ in hashed), digest.to_ints(digests)))
        for i, n, _ in group:
            data = memoryview(out[offsets[i]: offsets[i] + n].numpy())
            results[i] = (data, on_device[i] if i in on_device else checksum(data))  # short: xxh3's host paths
    return results


def _queue_groups(gather, todo, offsets, out, device, ops, main, side, queued) -> None:
    """:func:`pack_segments`' device work, batch by batch: gathers and hashes on the current
    stream, copies to ``out`` on ``side`` (CUDA) as each gather is done. Returns (or raises) only
    once every copy has ended, so ``out`` is whole and no copy reads freed scratch."""
    cuda = side is not None
    # Scratch is dropped only after the host saw its copies end (not record_stream, which would
    # also wait for copies queued later): so a new batch reuses it, and the device holds at most
    # two batches of half the bound each, one gathered while the other's copies drain.
    draining: deque = deque()  # (copies done, scratch)
    try:
        for group in _batches(todo, ops.device_scratch_bytes // 2):
            while len(draining) >= 2:
                done, _ = draining.popleft()
                done.synchronize()
            last = group[-1]
            scratch = torch.empty(last[2] + last[1], dtype=torch.uint8, device=device)
            for i, n, at in group:
                gather(i, scratch, at)
                dst, src = out[offsets[i]: offsets[i] + n], scratch[at: at + n]
                if cuda:  # the copy of this segment starts while the next ones are gathered
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        dst.copy_(src, non_blocking=True)
                else:
                    dst.copy_(src)
            hashed = [(i, n, at) for i, n, at in group if n >= digest.MIN_LEN]
            digests = digest.queue_xxh3(scratch, [at for _, _, at in hashed], [n for _, n, _ in hashed])
            if cuda:
                done = torch.cuda.Event()
                done.record(side)
                draining.append((done, scratch))
            del scratch
            queued.append((group, hashed, digests))
    finally:
        if cuda:
            side.synchronize()
        draining.clear()


def land_verified(payload, indices, names: list[str], device: torch.device, ops: OpsConfig) -> dict:
    """Copy the uncompressed segments ``indices`` of ``payload`` (at least 241 bytes each, up to
    ``ops.device_scratch_bytes`` in all, in order) to device scratch and check them there:
    ``{index: bytes on the device}`` for the segments taken (none when the device has no memory
    for them or its kernels cannot run there); the caller verifies the rest on the host. Raises
    :class:`~kvlink.errors.ChecksumMismatch` naming ``names[i]`` for a segment whose bytes do not
    match, and :class:`~kvlink.errors.LengthError` for one of the wrong length, before the caller
    writes anything.
    """
    header = payload.header
    picked, used = [], 0
    for i in indices:
        seg = header.segments[i]
        size = -(-seg.length // ALIGN) * ALIGN
        if seg.codec is not Codec.NONE or seg.length < digest.MIN_LEN or used + size > ops.device_scratch_bytes:
            continue
        if payload.datas[i].nbytes != seg.length:
            raise LengthError(f"{names[i]}: {payload.datas[i].nbytes} bytes, expected {seg.length}")
        picked.append((i, used))
        used += size
    if not picked:
        return {}
    lengths = [header.segments[i].length for i, _ in picked]
    try:
        scratch = torch.empty(used, dtype=torch.uint8, device=device)
        for i, at in picked:
            source = as_byte_tensor(payload.datas[i])
            scratch[at: at + source.numel()].copy_(source, non_blocking=source.is_pinned())
        got = digest.to_ints(digest.queue_xxh3(scratch, [at for _, at in picked], lengths))
    except (torch.cuda.OutOfMemoryError, BackendUnavailable) as exc:
        _fall_back(device, exc)
        return {}
    for (i, _), value in zip(picked, got):
        if value != header.segments[i].checksum:
            raise ChecksumMismatch(names[i], header.segments[i].checksum, value)
    return {i: scratch[at: at + n] for (i, at), n in zip(picked, lengths)}
