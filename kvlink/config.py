"""Configuration: frozen dataclasses, and the only place kvlink reads environment variables.

Environment variables (all optional):

- ``KVLINK_OPS_BACKEND``: force a kernel backend: ``auto`` (default), ``reference``, ``native``,
  ``triton`` or ``cuda``.
- ``KVLINK_BUILD_DIR``: where on-demand native builds (csrc/) are cached
  (default ``~/.cache/kvlink/build``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvlink.errors import ConfigError

BACKENDS = ("auto", "reference", "native", "triton", "cuda")


@dataclass(frozen=True)
class OpsConfig:
    """Which gather/scatter backend to use and where native builds go."""

    backend: str = "auto"
    build_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "kvlink" / "build")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown ops backend {self.backend!r}; expected one of {BACKENDS}")

    @classmethod
    def from_env(cls) -> "OpsConfig":
        kwargs: dict = {}
        if backend := os.environ.get("KVLINK_OPS_BACKEND"):
            kwargs["backend"] = backend
        if build_dir := os.environ.get("KVLINK_BUILD_DIR"):
            kwargs["build_dir"] = Path(build_dir)
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
        if self.fp8_group <= 0 or self.fp8_group & (self.fp8_group - 1):
            raise ConfigError(f"fp8_group must be a positive power of two, got {self.fp8_group}")


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
