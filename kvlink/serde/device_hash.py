"""Checksums of payloads computed on the GPU, for packs from and unpacks into a GPU cache.

Packing: each uncompressed segment is gathered into device scratch; from there a side stream copies it to
its place in the (pinned) staging lease while the main stream hashes the scratch
(:func:`kvlink.ops.digest.queue_xxh3`). The device-to-host copy is the plain copy a pack must do
anyway, the hash reads device memory, and the host hashes nothing but segments under 241 bytes
(xxh3's short paths) from the copy.

Unpacking with verification: the segments are copied to device scratch first, checked there,
and only then written into the cache from the scratch (:func:`land_verified`), so a mismatch
still leaves the cache untouched.

A CPU cache packed or unpacked with ``backend="triton"`` under ``TRITON_INTERPRET=1`` takes the same path,
without streams: that is how CI runs it.
"""

from __future__ import annotations

import torch

from kvlink.codec import Codec, checksum
from kvlink.codec.lossless import as_byte_tensor
from kvlink.config import OpsConfig
from kvlink.errors import ChecksumMismatch, LengthError
from kvlink.ops import digest
from kvlink.serde.staging import ALIGN

_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def usable(cache_device: torch.device, backend: str | None, ops: OpsConfig) -> bool:
    """Whether a pack from (or a verified unpack into) a cache on ``cache_device`` hashes on the device: CUDA caches when
    Triton is there and ``ops.device_hash`` is on; CPU caches only when the ``triton`` gather
    backend was asked for and runs in the interpreter."""
    if not ops.device_hash:
        return False
    if cache_device.type == "cuda":
        return digest.available("cuda")
    return cache_device.type == "cpu" and backend == "triton" and digest.available("cpu")


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
    left to the caller (compressed, or larger than ``ops.device_scratch_bytes``). Raises what
    ``gather`` raises; then nothing is returned and ``out`` holds partial bytes.
    """
    results: list = [None] * len(layouts)
    todo = [(i, seg.nbytes) for i, (seg, codec) in enumerate(zip(layouts, codecs)) if codec is Codec.NONE]
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    side = _copy_stream(device) if cuda else None
    queued = []
    try:
        _queue_groups(gather, todo, offsets, out, device, ops, main, side, queued)
    finally:  # on an error too: no copy may still be writing into ``out`` once the caller frees it
        if cuda:
            side.synchronize()
    for group, hashed, digests in queued:
        for (i, _, _), value in zip(hashed, digest.to_ints(digests)):
            results[i] = value
        for i, n, _ in group:
            data = memoryview(out[offsets[i]: offsets[i] + n].numpy())
            results[i] = (data, results[i] if n >= digest.MIN_LEN else checksum(data))
    return results


def _queue_groups(gather, todo, offsets, out, device, ops, main, side, queued) -> None:
    """:func:`pack_segments`' device work, group by group: gathers and hashes on the current
    stream, copies to ``out`` on ``side`` (CUDA) as each gather is done."""
    cuda = side is not None
    for group in _batches(todo, ops.device_scratch_bytes):
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
            scratch.record_stream(side)  # freed only once the side stream's copies are done
        queued.append((group, hashed, digests))


def land_verified(payload, indices, names: list[str], device: torch.device, ops: OpsConfig) -> dict:
    """Copy the uncompressed segments ``indices`` of ``payload`` (at least 241 bytes each, up to
    ``ops.device_scratch_bytes`` in all, in order) to device scratch and check them there:
    ``{index: bytes on the device}`` for the segments taken; the caller verifies the rest on the
    host. Raises :class:`~kvlink.errors.ChecksumMismatch` naming ``names[i]`` for a segment whose
    bytes do not match, and :class:`~kvlink.errors.LengthError` for one of the wrong length,
    before the caller writes anything.
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
    scratch = torch.empty(used, dtype=torch.uint8, device=device)
    for i, at in picked:
        source = as_byte_tensor(payload.datas[i])
        scratch[at: at + source.numel()].copy_(source, non_blocking=source.is_pinned())
    lengths = [header.segments[i].length for i, _ in picked]
    got = digest.to_ints(digest.queue_xxh3(scratch, [at for _, at in picked], lengths))
    for (i, _), value in zip(picked, got):
        if value != header.segments[i].checksum:
            raise ChecksumMismatch(names[i], header.segments[i].checksum, value)
    return {i: scratch[at: at + n] for (i, at), n in zip(picked, lengths)}
