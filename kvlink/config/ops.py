"""Kernel backends and codecs: :class:`OpsConfig` (read from the environment) and :class:`CodecConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvlink.errors import ConfigError

BACKENDS = ("auto", "reference", "native", "triton", "cuda")


@dataclass(frozen=True)
class OpsConfig:
    """Which gather/scatter backend to use, where native builds go, how many threads the native
    copy-and-hash runs use (0: one per core), and whether payloads packed from a GPU cache are
    hashed on the GPU (``device_hash``) through at most ``device_scratch_bytes`` of device memory
    per batch of segments (a larger segment is hashed on the host)."""

    backend: str = "auto"
    build_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "kvlink" / "build")
    threads: int = 0
    device_hash: bool = True
    device_scratch_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown ops backend {self.backend!r}; expected one of {BACKENDS}")
        if self.threads < 0:
            raise ConfigError(f"ops threads must be >= 0, got {self.threads}")
        if self.device_scratch_bytes <= 0:
            raise ConfigError(f"device_scratch_bytes must be positive, got {self.device_scratch_bytes}")

    @classmethod
    def from_env(cls) -> "OpsConfig":
        kwargs: dict = {}
        if backend := os.environ.get("KVLINK_OPS_BACKEND"):
            kwargs["backend"] = backend
        if build_dir := os.environ.get("KVLINK_BUILD_DIR"):
            kwargs["build_dir"] = Path(build_dir)
        if threads := os.environ.get("KVLINK_OPS_THREADS"):
            try:
                kwargs["threads"] = int(threads)
            except ValueError:
                raise ConfigError(f"KVLINK_OPS_THREADS must be an integer, got {threads!r}") from None
        if (device_hash := os.environ.get("KVLINK_DEVICE_HASH")) is not None:
            if device_hash not in ("0", "1"):
                raise ConfigError(f"KVLINK_DEVICE_HASH must be 0 or 1, got {device_hash!r}")
            kwargs["device_hash"] = device_hash == "1"
        if scratch := os.environ.get("KVLINK_DEVICE_SCRATCH_BYTES"):
            try:
                kwargs["device_scratch_bytes"] = int(scratch)
            except ValueError:
                raise ConfigError(f"KVLINK_DEVICE_SCRATCH_BYTES must be an integer, got {scratch!r}") from None
        return cls(**kwargs)


@dataclass(frozen=True)
class CodecConfig:
    """How segments are encoded.

    ``kv_codec`` and ``state_codec`` are codec names (see :mod:`kvlink.codec`). Lossy codecs are
    refused for recurrent state whatever is configured, and for KV unless ``allow_lossy`` is set.
    """

    kv_codec: str = "none"
    state_codec: str = "none"
    zstd_level: int = 1
    allow_lossy: bool = False
    fp8_group: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd_level must be in 1..22, got {self.zstd_level}")
        # The wire carries the group as an exponent 0..16: a larger group would make payloads
        # every receiver rejects.
        if self.fp8_group <= 0 or self.fp8_group & (self.fp8_group - 1) or self.fp8_group > 1 << 16:
            raise ConfigError(f"fp8_group must be a power of two in 1..65536, got {self.fp8_group}")


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
