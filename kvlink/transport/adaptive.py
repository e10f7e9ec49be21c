"""Bandwidth-adaptive codec choice: per segment, the codec that delivers soonest at the current rate.

Encoding, sending and decoding overlap (segments are encoded on all cores while earlier ones are
on the wire, and the receiver decodes as parts land), so a segment of ``n`` bytes with codec
``c`` takes about ``max(n / (enc_c * cores), n / (ratio_c * rate), n / (dec_c * cores))``. On
a slow link the middle term rules and the best-compressing codec wins; on a fast one the CPU
terms do and raw bytes win. Speeds and ratios are measured on samples of the cache's own data,
per (segment class, dtype), so the choice follows the data actually sent.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from kvlink.codec import Codec, decode, encode
from kvlink.serde.layout import TORCH_DTYPES, SegmentLayout, layer_segments

DEFAULT_CANDIDATES = (Codec.NONE, Codec.SHUFFLE_LZ4, Codec.SHUFFLE_ZSTD)
SAMPLE_BYTES = 1 << 20


@dataclass(frozen=True)
class CodecProfile:
    """Measured on a sample: compression ratio and single-core encode/decode speed (bytes/s)."""

    codec: Codec
    ratio: float
    encode_bps: float
    decode_bps: float


def _key(seg: SegmentLayout) -> tuple[str, str]:
    return ("state" if seg.is_state else "kv", seg.dtype)


def link_rate(snapshot) -> float | None:
    """The rate (bits/s) a sender can use on a link, from its :class:`~kvlink.transport.LinkSnapshot`:
    the lower of the bottleneck estimate and the cap, else the pacing rate (None: unknown)."""
    known = [r for r in (snapshot.available_bps, snapshot.cap_bps) if r]
    return min(known) if known else snapshot.pacing_bps


class CodecAdvisor:
    """Chooses codecs for a payload's segments from measured profiles and a link rate.

    Lossy fp8 is a candidate only with ``allow_lossy`` and never for recurrent state.
    """

    def __init__(self, candidates=DEFAULT_CANDIDATES, allow_lossy: bool = False, cores: int | None = None,
                 zstd_level: int = 1):
        self.candidates = tuple(Codec.parse(c) for c in candidates)
        if allow_lossy and Codec.FP8_E4M3 not in self.candidates:
            self.candidates += (Codec.FP8_E4M3,)
        self.allow_lossy = allow_lossy
        self.cores = cores or os.cpu_count() or 1
        self.zstd_level = zstd_level
        self.profiles: dict[tuple[str, str], list[CodecProfile]] = {}

    def calibrate(self, seg: SegmentLayout, sample: torch.Tensor) -> list[CodecProfile]:
        """Measure every candidate on ``sample`` (a flat CPU tensor of the segment's dtype)."""
        sample = sample.reshape(-1)[: max(1, SAMPLE_BYTES // sample.element_size())].contiguous()
        nbytes = sample.numel() * sample.element_size()
        out = []
        for codec in self.candidates:
            if codec.lossy and (seg.is_state or not self.allow_lossy):
                continue
            t0 = time.perf_counter()
            data = encode(codec, sample, zstd_level=self.zstd_level)
            t1 = time.perf_counter()
            decode(codec, data, TORCH_DTYPES[seg.dtype], sample.numel())
            t2 = time.perf_counter()
            size = memoryview(data).nbytes
            # NONE costs a memcpy at each end; the floor keeps tiny timings from dividing by ~0.
            out.append(CodecProfile(codec, nbytes / max(size, 1), nbytes / max(t1 - t0, 1e-7),
                                    nbytes / max(t2 - t1, 1e-7)))
        self.profiles[_key(seg)] = out
        return out

    def calibrate_cache(self, cache, ref) -> None:
        """Profile every (segment class, dtype) a request of ``cache`` carries, on its own data
        (``cache``: a :class:`~kvlink.serde.PagedCache`, ``ref``: a :class:`~kvlink.serde.CacheRef`)."""
        spec = cache.spec
        ids = [int(b) for b in list(ref.block_ids)[:64]]
        for layer in range(spec.num_layers):
            segs = layer_segments(spec, layer, ref.token_start, ref.num_tokens)
            if all(_key(seg) in self.profiles for seg in segs):
                continue
            # in component order, as the segments: token tensors, then states
            tensors = [rows[ids] for _, rows in cache.planes(layer)]
            tensors += [pool[ref.state_slot or 0] for _, pool in cache.states(layer)]
            for seg, tensor in zip(segs, tensors):
                if _key(seg) not in self.profiles:
                    self.calibrate(seg, tensor.detach().to("cpu").reshape(-1))

    def delivery_time(self, profile: CodecProfile, nbytes: int, rate_bps: float) -> float:
        """Seconds to get ``nbytes`` across at ``rate_bps`` bits/s with this codec, pipelined."""
        wire = nbytes / profile.ratio / (rate_bps / 8)
        if profile.codec is Codec.NONE:
            return wire
        return max(nbytes / (profile.encode_bps * self.cores), wire, nbytes / (profile.decode_bps * self.cores))

    def choose(self, seg: SegmentLayout, rate_bps: float | None) -> Codec:
        """Best codec for ``seg`` at ``rate_bps`` (None: unknown rate, send raw)."""
        profiles = self.profiles.get(_key(seg))
        if not profiles or not rate_bps:
            return Codec.NONE
        return min(profiles, key=lambda p: (self.delivery_time(p, seg.nbytes, rate_bps), p.codec)).codec

    def codecs(self, segments: list[SegmentLayout], rate_bps: float | None) -> dict[int, Codec]:
        """``{segment index: codec}`` for ``Packer.pack(..., codecs=...)``."""
        return {i: self.choose(seg, rate_bps) for i, seg in enumerate(segments)}
