"""Pack a request's cache out of an engine's paged layout into a payload."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from kvlink.codec import Codec, checksum, encode
from kvlink.codec.parallel import parallel_map
from kvlink.config import CodecConfig, OpsConfig
from kvlink.errors import ConfigError, StagingExhausted
from kvlink.ops.runs import Runs, buffer_pieces
from kvlink.serde import device_hash
from kvlink.serde.entry_plan import EntryPlan, address, entry_plan, register_ids
from kvlink.serde.fused import add_segment, fused_usable, segment_pieces
from kvlink.serde.layout import SegmentLayout, payload_segments
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.payload import Payload
from kvlink.serde.staging import ALIGN, StagingArena, StagingLease
from kvlink.serde.tokens import copy_tokens
from kvlink.serde.wire import PayloadHeader, SegmentHeader, header_nbytes


def choose_codec(seg: SegmentLayout, config: CodecConfig, codec: Codec | None = None) -> Codec:
    """The codec for a segment: ``codec`` when given (``Codec.NONE`` too), else the configured one.

    Either way lossy codecs never apply to state and only to float dtypes; a configured lossy
    codec applies to KV only with ``allow_lossy`` (a given one was chosen by a caller that opted
    in, e.g. a :class:`~kvlink.transport.adaptive.CodecAdvisor` with its own ``allow_lossy``).
    Raises :class:`ConfigError` otherwise.
    """
    chosen = codec is not None
    codec = Codec.parse(codec if chosen else config.state_codec if seg.is_state else config.kv_codec)
    if codec.lossy and (seg.is_state or not (chosen or config.allow_lossy)):
        why = "state is never lossy" if seg.is_state else "set allow_lossy to use it on KV"
        raise ConfigError(f"lossy codec {codec.label} refused for {seg.name}: {why}")
    if codec.lossy and seg.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"fp8 cannot encode {seg.dtype} ({seg.name})")
    return codec


def _check_into(view: memoryview, need: int) -> None:
    if view.nbytes != need or view.readonly:
        raise ConfigError(f"packing into a {'read-only ' if view.readonly else ''}buffer of {view.nbytes} "
                          f"bytes, the payload needs {need}")


class Packer:
    """Packs requests (or single layers) of one :class:`PagedCache` into payloads.

    With a :class:`StagingArena`, segment bytes live in leases of it (release the payload after
    sending); without one each payload gets a fresh buffer, as does one that does not fit a full
    arena when ``overflow`` is set (else :class:`StagingExhausted`). From a GPU cache, segments
    are hashed on the GPU unless ``ops.device_hash`` is off (:mod:`kvlink.serde.device_hash`).
    """

    def __init__(self, cache: PagedCache, codec: CodecConfig | None = None, staging: StagingArena | None = None,
                 backend: str | None = None, overflow: bool = False, ops: OpsConfig | None = None):
        self.cache = cache
        self.ops = ops or OpsConfig.from_env()
        self.codec = codec or CodecConfig()
        self.staging = staging
        self.backend = backend
        self.overflow = overflow  # a full staging area: a buffer of its own instead of StagingExhausted

    def wire_nbytes(self, ref: CacheRef, layers: Iterable[int] | None = None, group: str | None = None) -> int:
        """Size of the whole uncompressed payload (header and segments): what :meth:`pack`'s
        ``into`` must hold."""
        spec = self.cache.spec
        layouts = payload_segments(spec, list(range(spec.num_layers) if layers is None else layers),
                                   ref.token_start, ref.num_tokens, group)
        return header_nbytes(len(layouts)) + sum(seg.nbytes for seg in layouts)

    def pack(self, ref: CacheRef, layers: Iterable[int] | None = None, codecs: dict[int, Codec] | None = None,
             group: str | None = None, into=None) -> Payload:
        """Pack tokens [ref.token_start, ref.num_tokens) of the given layers (all by default).

        Every component of each layer goes in, or with ``group`` (``full``, ``window``, ``state``;
        see :meth:`CacheSpec.group`) only that group's. ``codecs`` optionally overrides the codec
        per segment index. ``into``: a writable buffer of exactly :meth:`wire_nbytes` bytes (e.g.
        pool pages reserved for the entry) that receives the whole payload, header included, in
        one pass (CPU caches, uncompressed). Raises :class:`ConfigError` for a bad reference, a
        layer listed twice or an ``into`` that does not fit, :class:`SpecError` for a bad layer or
        group and :class:`StagingExhausted` when the staging area is full.
        """
        cache = self.cache
        if into is not None:
            if any(Codec.parse(c) is not Codec.NONE for c in (codecs or {}).values()):
                raise ConfigError("packing into a buffer needs uncompressed segments")
            self.pack_into_many([(ref, layers, group, into)])
            return Payload.from_buffer(into)
        layouts, codecs, ids, ids_host, slots = self._plan(ref, layers, codecs, group)
        offsets, total = [], 0
        for seg in layouts:
            offsets.append(total)
            total += -(-seg.nbytes // ALIGN) * ALIGN
        lease = self._lease(total)
        try:
            results = self._copy_fused(layouts, offsets, codecs, lease.tensor, ids_host, slots)
            if device_hash.usable(cache.device, self.backend, self.ops):
                def gather(i: int, scratch: torch.Tensor, at: int) -> None:
                    seg = layouts[i]
                    self._gather(seg, scratch, at, ids, ids_host, slots.get(seg.layer, -1))

                on_device = device_hash.pack_segments(gather, layouts, offsets, codecs, lease.tensor, cache.device,
                                                      self.ops)
                results = [r if r is not None else d for r, d in zip(results, on_device)]
            jobs = []
            for i, (seg, off, codec) in enumerate(zip(layouts, offsets, codecs)):
                if results[i] is not None:
                    continue
                raw = self._gather(seg, lease.tensor, off, ids, ids_host, slots.get(seg.layer, -1))
                ready = None
                if cache.device.type == "cuda":
                    # Encoding and hashing of this segment start as soon as its copy is done,
                    # while the GPU moves on to the next segments.
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(cache.device))
                jobs.append((i, (codec, raw, ready)))
            done = parallel_map(self._finish, [job for _, job in jobs], total)
            for (i, _), result in zip(jobs, done):
                results[i] = result
            if cache.device.type == "cuda":
                torch.cuda.current_stream(cache.device).synchronize()
        except BaseException:
            lease.release()
            raise
        if all(codec is not Codec.NONE for codec in codecs):
            lease.release()  # every segment was re-encoded into its own buffer
            lease = None
        return self._payload(ref, layouts, codecs, results, lease)

    def _payload(self, ref: CacheRef, layouts, codecs, results, lease) -> Payload:
        spec, cache = self.cache.spec, self.cache
        headers, datas, offset = [], [], 0
        for seg, codec, (data, digest) in zip(layouts, codecs, results):
            length = memoryview(data).nbytes
            cparam = self.codec.fp8_group.bit_length() - 1 if codec is Codec.FP8_E4M3 else 0
            headers.append(SegmentHeader(seg.layer, seg.component, seg.is_state, seg.dtype, codec, cparam, seg.token_start, seg.shape,
                                         offset, length, seg.nbytes, digest))
            datas.append(data)
            offset += length
        header = PayloadHeader(spec.fingerprint, ref.token_start, ref.num_tokens, cache.block_size, tuple(headers))
        return Payload(header, datas, lease)

    def _lease(self, total: int) -> StagingLease:
        if self.staging is None:
            return StagingLease.standalone(total)
        try:
            return self.staging.lease(total)
        except StagingExhausted:
            if not self.overflow:
                raise
            return StagingLease.standalone(total, pin=self.staging.pinned)

    def _plan(self, ref: CacheRef, layers, codecs, group):
        spec = self.cache.spec
        layers = list(range(spec.num_layers) if layers is None else layers)
        if len(set(layers)) != len(layers):
            raise ConfigError("a layer is listed twice")
        ids, ids_host = ref.block_ids_checked(self.cache)
        layouts = payload_segments(spec, layers, ref.token_start, ref.num_tokens, group)
        slots = {s.layer: ref.slot(self.cache, s.layer) for s in layouts if s.is_state}
        codecs = [choose_codec(seg, self.codec, (codecs or {}).get(i)) for i, seg in enumerate(layouts)]
        return layouts, codecs, ids, ids_host, slots

    def pack_into_many(self, items) -> None:
        """``pack(ref, layers, group=group, into=into)`` for each ``(ref, layers, group, into)``
        (a request's pool entries), every segment of all of them copied and hashed in one native
        batch; each ``into`` then holds its whole payload. An entry whose layout has an
        :class:`~kvlink.serde.entry_plan.EntryPlan` costs no Python work per segment. Raises as
        :meth:`pack` does, before anything is copied."""
        spec = self.cache.spec
        fused = fused_usable(self.cache, self.backend)
        planned = fused and Codec.parse(self.codec.kv_codec) is Codec.NONE  # plans hold token segments only
        runs, todo, seen = Runs(), [], {}
        for ref, layers, group, into in items:
            layers = tuple(range(spec.num_layers) if layers is None else layers)
            if len(set(layers)) != len(layers):
                raise ConfigError("a layer is listed twice")
            view = memoryview(into).cast("B")
            plan = None
            if planned:
                ids_at = register_ids(runs, self.cache, ref, seen)  # validates ref's range first
                plan = entry_plan(self.cache, layers, ref.token_start, ref.num_tokens, group)
            if plan is None:
                todo.append(self._add_into(runs, ref, layers, group, view, fused))
                continue
            _check_into(view, plan.nbytes)
            todo.append((plan, view, runs.add_planes(plan.jobs(address(view), ids_at, scatter=False))))
        digests = runs.run_digests()
        for item in todo:
            if isinstance(item[0], EntryPlan):
                plan, view, first = item
                plan.write_header(np.frombuffer(view[:plan.header_len], np.uint64),
                                  digests[first:first + len(plan.layouts)])
            else:
                self._finish_into(item, digests)

    def _add_into(self, runs: Runs, ref: CacheRef, layers, group, view: memoryview, fused: bool):
        """The general way of :meth:`pack_into_many` for one entry: its fused segments added to
        ``runs``; what :meth:`_finish_into` needs afterwards."""
        layouts, codecs, ids, ids_host, slots = self._plan(ref, layers, None, group)
        header_len = header_nbytes(len(layouts))
        _check_into(view, header_len + sum(seg.nbytes for seg in layouts))
        if any(codec is not Codec.NONE for codec in codecs) or not fused:
            raise ConfigError("packing into a buffer needs uncompressed segments of a CPU cache")
        offsets, at = [], header_len
        for seg in layouts:
            offsets.append(at)
            at += seg.nbytes
        buf = torch.frombuffer(view, dtype=torch.uint8)
        placed = self._add_fused(runs, layouts, offsets, codecs, buf, ids_host, slots)
        return ref, layouts, codecs, ids, ids_host, slots, view, buf, offsets, header_len, placed, len(runs)

    def _finish_into(self, item, digests: np.ndarray) -> None:
        ref, layouts, codecs, ids, ids_host, slots, view, buf, offsets, header_len, placed, end = item
        results: list = [None] * len(layouts)
        for (i, out), digest in zip(placed, digests[end - len(placed):end]):
            results[i] = (memoryview(out.numpy()), int(digest))
        for i, seg in enumerate(layouts):
            if results[i] is None:  # a layout the runs cannot describe: the classic gather
                out = view[offsets[i]: offsets[i] + seg.nbytes]
                if offsets[i] % seg.torch_dtype.itemsize == 0:  # straight into place
                    self._gather(seg, buf, offsets[i], ids, ids_host, slots.get(seg.layer, -1))
                else:  # a typed view of the buffer cannot start there: gather apart, place it
                    raw = self._gather(seg, torch.empty(seg.nbytes, dtype=torch.uint8), 0, ids, ids_host,
                                       slots.get(seg.layer, -1))
                    out[:] = memoryview(raw.reshape(-1).view(torch.uint8).numpy())
                results[i] = (out, checksum(out))
        view[:header_len] = self._payload(ref, layouts, codecs, results, None).header_bytes()

    def pack_layer(self, ref: CacheRef, layer: int) -> Payload:
        """Pack one layer on its own, e.g. as soon as prefill has produced it."""
        return self.pack(ref, [layer])

    def _gather(self, seg: SegmentLayout, buf: torch.Tensor, off: int, ids, ids_host, slot: int) -> torch.Tensor:
        out = buf[off : off + seg.nbytes].view(seg.torch_dtype)
        if seg.is_state:
            pool = self.cache.tensor(seg.layer, seg.component)
            out.view(seg.shape).copy_(pool[slot], non_blocking=out.is_pinned())
        else:
            rows = self.cache.tensor(seg.layer, seg.component)
            t0 = seg.token_start
            copy_tokens(rows, ids, ids_host, t0, t0 + seg.shape[0], self.cache.block_size, out, True, self.backend)
        return out.view(seg.shape)

    def _copy_fused(self, layouts, offsets, codecs, buf: torch.Tensor, ids_host, slots) -> list:
        """Copy and hash every uncompressed segment of a CPU cache in one native call (the
        checksum is computed while the bytes are in cache); ``(data, checksum)`` per segment,
        None for those left to the classic path."""
        results: list = [None] * len(layouts)
        runs = Runs()
        placed = self._add_fused(runs, layouts, offsets, codecs, buf, ids_host, slots)
        for (i, out), digest in zip(placed, runs.run()):
            results[i] = (memoryview(out.numpy()), digest)
        return results

    def _add_fused(self, runs: Runs, layouts, offsets, codecs, buf: torch.Tensor, ids_host, slots) -> list:
        """Add the segments the native runs can copy to ``runs``: ``[(index, destination)]``, in
        the order of their digests."""
        if not fused_usable(self.cache, self.backend):
            return []
        ids_np = np.asarray(ids_host, np.int64)
        placed = []
        ids_at = runs.block_ids(ids_np)
        for i, (seg, off, codec) in enumerate(zip(layouts, offsets, codecs)):
            if codec is not Codec.NONE:
                continue
            out = buf[off: off + seg.nbytes]
            slot = slots.get(seg.layer, -1)
            if not add_segment(runs, self.cache, seg, ids_at, slot, out.data_ptr(), scatter=False):
                src = segment_pieces(self.cache, seg, ids_np, slot)
                if src is None:
                    continue
                runs.add(src, buffer_pieces(out))
            placed.append((i, out))
        return placed

    def _finish(self, job) -> tuple[object, int]:
        codec, raw, ready = job
        if ready is not None:
            ready.synchronize()
        data = encode(codec, raw, zstd_level=self.codec.zstd_level, fp8_group=self.codec.fp8_group)
        return data, checksum(data)
