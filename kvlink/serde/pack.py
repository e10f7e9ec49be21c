"""Pack a request's cache out of an engine's paged layout into a payload."""

from __future__ import annotations

from typing import Iterable

import torch

from kvlink.codec import Codec, encode
from kvlink.codec.checksum import checksums
from kvlink.codec.parallel import parallel_map
from kvlink.config import CodecConfig
from kvlink.errors import ConfigError
from kvlink.serde.layout import SegmentLayout, payload_segments
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.payload import Payload
from kvlink.serde.staging import ALIGN, StagingArena, StagingLease
from kvlink.serde.tokens import copy_tokens
from kvlink.serde.wire import PayloadHeader, SegmentHeader


def choose_codec(seg: SegmentLayout, config: CodecConfig) -> Codec:
    """The configured codec for a segment; lossy codecs never apply to state."""
    codec = Codec.parse(config.state_codec if seg.kind.is_state else config.kv_codec)
    if codec.lossy and (seg.kind.is_state or not config.allow_lossy):
        why = "state is never lossy" if seg.kind.is_state else "set allow_lossy to use it on KV"
        raise ConfigError(f"lossy codec {codec.label} refused for {seg.name}: {why}")
    if codec.lossy and seg.dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"fp8 cannot encode {seg.dtype} ({seg.name})")
    return codec


class Packer:
    """Packs requests (or single layers) of one :class:`PagedCache` into payloads.

    With a :class:`StagingArena`, segment bytes live in leases of it (release the payload after
    sending); without one each payload gets a fresh buffer.
    """

    def __init__(self, cache: PagedCache, codec: CodecConfig | None = None, staging: StagingArena | None = None,
                 backend: str | None = None):
        self.cache = cache
        self.codec = codec or CodecConfig()
        self.staging = staging
        self.backend = backend

    def pack(self, ref: CacheRef, layers: Iterable[int] | None = None, codecs: dict[int, Codec] | None = None) -> Payload:
        """Pack tokens [ref.token_start, ref.num_tokens) of the given layers (all by default).

        ``codecs`` optionally overrides the codec per segment index. Raises :class:`ConfigError`
        for a bad reference and :class:`StagingExhausted` when the staging area is full.
        """
        cache, spec = self.cache, self.cache.spec
        layers = list(range(spec.num_layers) if layers is None else layers)
        if len(set(layers)) != len(layers):
            raise ConfigError("a layer is listed twice")
        ids = ref.ids_tensor(cache)
        ids_host = ids.tolist()
        layouts = payload_segments(spec, layers, ref.token_start, ref.num_tokens)
        slot = ref.slot(cache) if any(s.kind.is_state for s in layouts) else -1
        offsets, total = [], 0
        for seg in layouts:
            offsets.append(total)
            total += -(-seg.nbytes // ALIGN) * ALIGN
        lease = self.staging.lease(total) if self.staging else StagingLease.standalone(total)
        try:
            raws = [self._gather(seg, lease.tensor, off, ids, ids_host, slot) for seg, off in zip(layouts, offsets)]
            if cache.device.type == "cuda":
                torch.cuda.current_stream(cache.device).synchronize()
            return self._encode(ref, layouts, raws, lease, codecs or {})
        except BaseException:
            lease.release()
            raise

    def pack_layer(self, ref: CacheRef, layer: int) -> Payload:
        """Pack one layer on its own, e.g. as soon as prefill has produced it."""
        return self.pack(ref, [layer])

    def _gather(self, seg: SegmentLayout, buf: torch.Tensor, off: int, ids, ids_host, slot: int) -> torch.Tensor:
        out = buf[off : off + seg.nbytes].view(seg.torch_dtype)
        if seg.kind.is_state:
            pool = dict(self.cache.states(seg.layer))[seg.kind]
            out.view(seg.shape).copy_(pool[slot])
        else:
            rows = dict(self.cache.planes(seg.layer))[seg.kind]
            t0 = seg.token_start
            copy_tokens(rows, ids, ids_host, t0, t0 + seg.shape[0], self.cache.block_size, out, True, self.backend)
        return out.view(seg.shape)

    def _encode(self, ref: CacheRef, layouts, raws, lease, overrides) -> Payload:
        codecs = [overrides.get(i) or choose_codec(seg, self.codec) for i, seg in enumerate(layouts)]
        cfg = self.codec
        datas = parallel_map(lambda job: encode(job[0], job[1], zstd_level=cfg.zstd_level, fp8_group=cfg.fp8_group),
                             zip(codecs, raws), sum(0 if c is Codec.NONE else r.nbytes for c, r in zip(codecs, raws)))
        if all(codec is not Codec.NONE for codec in codecs):
            lease.release()  # every segment was re-encoded into its own buffer
            lease = None
        headers, offset = [], 0
        for seg, codec, data, digest in zip(layouts, codecs, datas, checksums(datas)):
            length = memoryview(data).nbytes
            cparam = self.codec.fp8_group.bit_length() - 1 if codec is Codec.FP8_E4M3 else 0
            headers.append(SegmentHeader(seg.layer, seg.kind, seg.dtype, codec, cparam, seg.token_start, seg.shape,
                                         offset, length, seg.nbytes, digest))
            offset += length
        header = PayloadHeader(self.cache.spec.fingerprint, ref.token_start, ref.num_tokens, self.cache.block_size,
                               tuple(headers))
        return Payload(header, datas, lease)
