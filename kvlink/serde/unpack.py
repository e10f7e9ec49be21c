"""Unpack a payload into a paged cache: validate everything first, then write.

Structure, fingerprint, layout and block table are all checked, and every compressed segment is
verified and decoded, before the first byte is written: any of those errors leaves the destination
untouched. Uncompressed segments of a CPU cache are verified while they are copied (one pass over
memory instead of two), so a checksum mismatch there is raised after the write: the tokens and
state slot the payload addresses hold garbage then, and nothing else was touched. The caller
treats them as not loaded, as after any failed load. Into a GPU cache, uncompressed segments are
checked on the GPU from device scratch and written from there only when all match
(:mod:`kvlink.serde.device_hash`), so nothing is written on a mismatch.
"""

from __future__ import annotations

import numpy as np
import torch

from kvlink.codec import Codec, decode
from kvlink.codec.parallel import parallel_map
from kvlink.config import OpsConfig
from kvlink.errors import ChecksumMismatch, FingerprintMismatch, IncompatibleLayoutError
from kvlink.ops.runs import Runs, buffer_pieces
from kvlink.serde import device_hash
from kvlink.serde.fused import add_segment, fused_usable, segment_pieces
from kvlink.serde.layout import TORCH_DTYPES, payload_segments
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.payload import Payload
from kvlink.serde.wire import PayloadHeader
from kvlink.serde.tokens import copy_tokens


def check_compatible(payload: Payload | PayloadHeader, cache: PagedCache, ref: CacheRef,
                     group: str | None = None) -> None:
    """Raise unless every segment of ``payload`` (or of a parsed header) is exactly what
    ``cache``'s spec expects at ``ref``.

    Every layer present must carry all its components (a peer's payload), or with ``group``
    (``full``, ``window``, ``state``: a pool entry) exactly its components of that group, in
    component order. Raises :class:`FingerprintMismatch` or :class:`IncompatibleLayoutError` naming
    the segment or the missing component, :class:`SpecError` for an unknown group.
    """
    spec, header = cache.spec, payload if isinstance(payload, PayloadHeader) else payload.header
    if header.fingerprint != spec.fingerprint:
        raise FingerprintMismatch(spec.fingerprint, header.fingerprint)
    if header.token_end != ref.num_tokens:
        raise IncompatibleLayoutError(f"payload ends at token {header.token_end}, destination expects {ref.num_tokens}")
    by_layer: dict[int, list] = {}
    for seg in header.segments:
        if by_layer and seg.layer in by_layer and seg.layer != next(reversed(by_layer)):
            raise IncompatibleLayoutError(f"{seg.name}: segments of a layer must be adjacent")
        by_layer.setdefault(seg.layer, []).append(seg)
    for layer, segs in by_layer.items():
        if layer >= spec.num_layers:
            raise IncompatibleLayoutError(f"layer {layer} beyond the destination's {spec.num_layers} layers")
        expected = {exp.component: exp for exp in payload_segments(spec, (layer,), header.token_start, header.token_end,
                                                                 group)}
        components = [seg.component for seg in segs]
        if components != sorted(expected):  # also refuses repeats and disorder
            missing = [spec.layers[layer].components[c].name for c in sorted(set(expected) - set(components))]
            raise IncompatibleLayoutError(f"layer {layer}: payload lacks components {missing}" if missing else
                                          f"layer {layer}: components {components}, expected {sorted(expected)}"
                                          + (f" (group {group})" if group else ""))
        for seg in segs:
            exp = expected[seg.component]
            got = (seg.is_state, seg.dtype, seg.shape, seg.token_start)
            want = (exp.is_state, exp.dtype, exp.shape, exp.token_start)
            if got != want:
                raise IncompatibleLayoutError(f"{exp.name}: got state/dtype/shape/start {got}, expected {want}")
            if seg.codec.lossy and seg.is_state:
                raise IncompatibleLayoutError(f"{exp.name}: lossy codec on state is never accepted")


class Unpacker:
    """Writes payloads into one :class:`PagedCache`."""

    def _fused_jobs(self, payload: Payload, ids_host: list[int], slots: dict) -> tuple[Runs, list[int]]:
        """Uncompressed segments of a CPU cache as one batch of copy-and-hash runs, and their
        indices (none when the classic path does it all)."""
        cache = self.cache
        runs, order = Runs(), []
        if not fused_usable(cache, self.backend):
            return runs, order
        ids_np = np.asarray(ids_host, np.int64)
        ids_at = runs.block_ids(ids_np)
        for i, (seg, data) in enumerate(zip(payload.header.segments, payload.datas)):
            if seg.codec is not Codec.NONE or data.nbytes != seg.raw_nbytes:
                continue  # a wrong length is reported by the classic path's checks
            src = buffer_pieces(data)
            slot = slots.get(seg.layer, -1)
            if not add_segment(runs, cache, seg, ids_at, slot, int(src[0][0]), scatter=True):
                dst = segment_pieces(cache, seg, ids_np, slot)
                if dst is None:
                    continue
                runs.add(src, dst)
            order.append(i)
        return runs, order

    def __init__(self, cache: PagedCache, backend: str | None = None, ops: OpsConfig | None = None):
        self.cache = cache
        self.backend = backend
        self.ops = ops or OpsConfig.from_env()

    def unpack(self, payload: Payload | bytes | bytearray | memoryview, ref: CacheRef, verify: bool = True,
               group: str | None = None) -> list[int]:
        """Write ``payload`` into ``ref``'s blocks and slot; returns the layers written.

        Each layer present must carry every component (so "layer written" means all of it), or
        with ``group`` exactly its components of that group (the pool's per-group entries).

        ``ref.block_ids`` must cover tokens [0, payload end); only tokens from the payload's start
        are written. A :class:`~kvlink.errors.ChecksumMismatch` may come after the payload's
        tokens and slot were written (see the module docstring). Raises (writing nothing) :class:`~kvlink.errors.WireFormatError` subclasses for
        malformed or corrupt payloads, :class:`~kvlink.errors.FingerprintMismatch` /
        :class:`~kvlink.errors.IncompatibleLayoutError` for the wrong layout,
        :class:`~kvlink.errors.ConfigError` for a bad block table or slot, and
        :class:`~kvlink.errors.CodecError` when a segment does not decode. ``verify=False`` skips
        the checksum pass, for bytes already verified against the same checksums (a receiver's
        part verifier).
        """
        if not isinstance(payload, Payload):
            payload = Payload.from_buffer(payload)
        cache, header = self.cache, payload.header
        check_compatible(payload, cache, ref, group)
        ref = ref.span(header.token_end, header.token_start)
        ids, ids_host = ref.block_ids_checked(cache)
        slots = {s.layer: ref.slot(cache, s.layer) for s in header.segments if s.is_state}
        names = [f"layer {s.layer} {cache.spec.layers[s.layer].components[s.component].name}" for s in header.segments]
        runs, fused = self._fused_jobs(payload, ids_host, slots)
        rest = [i for i in range(len(header.segments)) if i not in fused]
        landed = {}  # segments checked on the device, from where they are written
        if verify and device_hash.usable(cache.device, self.backend, self.ops):
            landed = device_hash.land_verified(payload, rest, names, cache.device, self.ops)
        if verify:  # the other segments outside the fused runs are checked before anything is written
            for i in rest:
                if i not in landed:
                    payload.verify_segment(i, names[i])
        landed = {i: data.view(TORCH_DTYPES[header.segments[i].dtype]).view(header.segments[i].shape)
                  for i, data in landed.items()}
        rest = [i for i in rest if i not in landed]
        decoded = parallel_map(
            lambda i: decode(header.segments[i].codec, payload.datas[i], TORCH_DTYPES[header.segments[i].dtype],
                             header.segments[i].numel,
                             fp8_group=1 << header.segments[i].codec_param).view(header.segments[i].shape),
            rest, sum(header.segments[i].raw_nbytes for i in rest if header.segments[i].codec is not Codec.NONE))
        for i, values in [*zip(rest, decoded), *landed.items()]:
            seg = header.segments[i]
            if seg.is_state:
                cache.tensor(seg.layer, seg.component)[slots[seg.layer]].copy_(values, non_blocking=values.is_pinned())
            else:
                rows = cache.tensor(seg.layer, seg.component)
                copy_tokens(rows, ids, ids_host, seg.token_start, seg.token_start + seg.shape[0], cache.block_size,
                            values, False, self.backend)
        if fused:
            # Each fused segment is hashed while it is copied: a mismatch is found after the
            # write, and raised then (the docstring's exception to "nothing written").
            digests = runs.run(hash=verify)
            if verify:
                for i, digest in zip(fused, digests):
                    if digest != header.segments[i].checksum:
                        raise ChecksumMismatch(names[i], header.segments[i].checksum, digest)
        if cache.device.type == "cuda":
            torch.cuda.current_stream(cache.device).synchronize()
        return sorted({seg.layer for seg in header.segments})

