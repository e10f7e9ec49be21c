"""Unpack a payload into a paged cache: validate everything first, then write.

Any error leaves the destination untouched: structure, fingerprint, layout, block table and
checksums are all checked, and every segment is decoded, before the first byte is written.
"""

from __future__ import annotations

import torch

from kvlink.codec import Codec, decode
from kvlink.codec.parallel import parallel_map
from kvlink.errors import FingerprintMismatch, IncompatibleLayoutError
from kvlink.serde.layout import TORCH_DTYPES, layer_segments
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.payload import Payload
from kvlink.serde.tokens import copy_tokens


def check_compatible(payload: Payload, cache: PagedCache, ref: CacheRef, group: str | None = None) -> None:
    """Raise unless every segment of ``payload`` is exactly what ``cache``'s spec expects at ``ref``.

    Every layer present must carry all its components (a peer's payload), or with ``group``
    (``full``, ``window``, ``state``: a pool entry) exactly its components of that group, in
    component order. Raises :class:`FingerprintMismatch` or :class:`IncompatibleLayoutError` naming
    the segment or the missing component, :class:`SpecError` for an unknown group.
    """
    spec, header = cache.spec, payload.header
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
        expected = {exp.component: exp for exp in layer_segments(spec, layer, header.token_start, header.token_end,
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

    def __init__(self, cache: PagedCache, backend: str | None = None):
        self.cache = cache
        self.backend = backend

    def unpack(self, payload: Payload | bytes | bytearray | memoryview, ref: CacheRef, verify: bool = True,
               group: str | None = None) -> list[int]:
        """Write ``payload`` into ``ref``'s blocks and slot; returns the layers written.

        Each layer present must carry every component (so "layer written" means all of it), or
        with ``group`` exactly its components of that group (the pool's per-group entries).

        ``ref.block_ids`` must cover tokens [0, payload end); only tokens from the payload's start
        are written. Raises (writing nothing) :class:`~kvlink.errors.WireFormatError` subclasses for
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
        if verify:
            payload.verify([f"layer {s.layer} {cache.spec.layers[s.layer].components[s.component].name}"
                            for s in header.segments])
        decoded = parallel_map(
            lambda job: decode(job[0].codec, job[1], TORCH_DTYPES[job[0].dtype], job[0].numel,
                               fp8_group=1 << job[0].codec_param).view(job[0].shape),
            zip(header.segments, payload.datas),
            sum(s.raw_nbytes for s in header.segments if s.codec is not Codec.NONE))
        for seg, values in zip(header.segments, decoded):
            if seg.is_state:
                cache.tensor(seg.layer, seg.component)[slots[seg.layer]].copy_(values, non_blocking=values.is_pinned())
            else:
                rows = cache.tensor(seg.layer, seg.component)
                copy_tokens(rows, ids, ids_host, seg.token_start, seg.token_start + seg.shape[0], cache.block_size,
                            values, False, self.backend)
        if cache.device.type == "cuda":
            torch.cuda.current_stream(cache.device).synchronize()
        return sorted({seg.layer for seg in header.segments})

