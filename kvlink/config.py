"""Configuration: frozen dataclasses, and the only place kvlink reads environment variables.

Environment variables (all optional):

- ``KVLINK_OPS_BACKEND``: force a kernel backend: ``auto`` (default), ``reference``, ``native``,
  ``triton`` or ``cuda``.
- ``KVLINK_BUILD_DIR``: where on-demand native builds (csrc/) are cached
  (default ``~/.cache/kvlink/build``).
- ``KVLINK_SECRET``: shared secret for the transport handshake (read by
  :meth:`TransportConfig.from_env` and the CLI; unset means no authentication).
"""

from __future__ import annotations

import os
import re
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


_RATE_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "bps": 1, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(text: str | float | int | None) -> float | None:
    """A link rate in bits per second from ``"10gbit"``, ``"500mbit"``, ``"2.5G"``, ``"1.2GBps"`` or a
    number (bits/s). ``None``, ``""``, ``"0"`` and ``"unlimited"`` mean no cap."""
    if text is None or isinstance(text, (int, float)):
        return None if not text else float(text)
    raw = text.strip()
    if raw.lower() in ("", "0", "none", "unlimited", "inf"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", raw)
    unit = match.group(2) if match else ""
    # "GBps"/"MBps" are bytes per second; everything else is bits.
    key = unit.lower() if not unit.endswith("Bps") else unit[:-3].lower() + "bps"
    if not match or key not in _RATE_UNITS:
        raise ConfigError(f"cannot parse rate {text!r}; use e.g. 10gbit, 500mbit, 1.2GBps")
    value = float(match.group(1)) * _RATE_UNITS[key]
    if value <= 0:
        raise ConfigError(f"rate must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class TransportConfig:
    """Sender and receiver settings. Rates are bits per second; sizes are bytes.

    The defaults were chosen by measurement (``kvlink bench transfer``, benchmarks/transfer.py):
    4 connections; parts are cut into 256 KiB grid chunks (the unit of acknowledgement and
    retransmission) and sent in frames of consecutive chunks sized to ~4 ms at the pacing rate,
    or ~16 ms at the estimated rate when nothing paces, up to 64 MiB (per-frame cost is what limits
    loopback speed below that: on a 16-core host 16 MiB frames reached 0.77-0.82x of raw sockets
    where 4 MiB frames reached 0.68-0.76x; on 2 cores 64 MiB frames use ~5% less CPU than 16 MiB);
    4 MiB until the first rate estimate, so concurrent transfers' weights act from the start.
    A receiver announcing a smaller ``max_chunk_bytes`` gets frames within it.

    Integrity: with ``chunk_checksums=None`` (the default) a sender hashes every chunk (xxh3)
    unless the transfer was opened ``verifiable`` (its parts are kvlink payloads) and the
    receiver announces at the handshake that it verifies whole parts itself (a receiver given a
    ``part_verifier``, e.g. the decode side or the pool daemon checking payloads against their own
    checksums); then chunks go unhashed and a part that fails verification is resent whole.
    ``True`` always hashes chunks, ``False`` never does (the application verifies).
    """

    connections: int = 4
    chunk_bytes: int = 64 << 20           # the largest DATA frame (a run of grid chunks)
    grid_bytes: int = 256 << 10           # acknowledgement/retransmission unit
    chunk_checksums: bool | None = None
    window_bytes: int = 192 << 20         # unacknowledged bytes per connection (3 largest frames)
    rate_cap: float | None = None         # link share this sender may use (bits/s); None: no cap
    adaptive: bool = True                 # congestion-aware rate control under the cap
    initial_rate: float | None = None     # adaptive start: pace at this (bits/s); None: TCP's slow start
    burst_bytes: int | None = None        # pacing burst; default max(2 chunks, 2 ms at the rate)
    connect_timeout: float = 5.0
    progress_timeout: float = 10.0        # a connection with unacked data and no ack this long is dead
    reconnect_attempts: int = 6           # per connection loss, with exponential backoff from 50 ms
    chunk_retries: int = 5                # a chunk failing its checksum is resent at most this often
    transfer_timeout: float | None = None  # whole transfer, from open to verified end
    # receiver side
    max_chunk_bytes: int = 64 << 20       # largest DATA frame accepted (lands in place: no buffer)
    max_transfer_bytes: int = 64 << 30
    receive_budget_bytes: int = 64 << 30  # all transfers held by a receiver at once
    accept_backlog: int = 1024            # begun transfers not yet taken by the application
    idle_timeout: float = 60.0            # a receiving transfer with no data this long is dropped
    handshake_timeout: float = 5.0
    use_uvloop: bool = True

    def __post_init__(self) -> None:
        if self.connections < 1 or self.connections > 256:
            raise ConfigError(f"connections must be in 1..256, got {self.connections}")
        if not 4096 <= self.grid_bytes <= self.chunk_bytes <= self.max_chunk_bytes:
            raise ConfigError(f"need 4096 <= grid_bytes <= chunk_bytes <= max_chunk_bytes, got {self.grid_bytes}, "
                              f"{self.chunk_bytes}, {self.max_chunk_bytes}")
        if self.window_bytes < self.chunk_bytes:
            raise ConfigError("window_bytes must hold at least one chunk")
        for name in ("rate_cap", "initial_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("connect_timeout", "progress_timeout", "idle_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.reconnect_attempts < 0 or self.chunk_retries < 0:
            raise ConfigError("retry counts must be >= 0")

    @staticmethod
    def secret_from_env() -> bytes | None:
        """The shared secret from ``KVLINK_SECRET`` (None when unset or empty)."""
        value = os.environ.get("KVLINK_SECRET", "")
        return value.encode() if value else None


@dataclass(frozen=True)
class PoolConfig:
    """Prefix cache pool settings (sizes in bytes).

    Tiers, top down: GPU (``gpu_bytes`` > 0), host DRAM (``host_bytes``), SSD (``ssd_dir`` set).
    ``write_mode``: ``back`` writes an entry to SSD only when it is demoted; ``through`` also
    writes every new entry to SSD right away (in the background), so host eviction loses nothing.
    """

    block_size: int = 64
    namespace: str = ""
    checkpoint_every: int | None = 16
    host_bytes: int = 1 << 30
    page_bytes: int = 256 << 10
    gpu_bytes: int = 0
    gpu_device: str = "cuda"
    ssd_dir: str | None = None
    ssd_bytes: int = 16 << 30
    ssd_durable: bool = False
    ssd_segment_bytes: int = 256 << 20  # SSD segment file size (at most ssd_bytes / 4); eviction's unit
    policy: str = "s3fifo"
    write_mode: str = "back"
    io_queue: int = 256  # background SSD writes waiting at most; beyond, demotions are dropped
    verify_memory: bool = False  # also verify xxh3 on GPU/host reads (SSD reads always are)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.page_bytes <= 0 or self.host_bytes < self.page_bytes:
            raise ConfigError("block_size and page_bytes must be positive, host_bytes at least one page")
        if self.policy not in ("lru", "s3fifo"):
            raise ConfigError(f"policy must be lru or s3fifo, got {self.policy!r}")
        if self.write_mode not in ("back", "through"):
            raise ConfigError(f"write_mode must be back or through, got {self.write_mode!r}")
        if self.io_queue <= 0:
            raise ConfigError("io_queue must be positive")
        if self.ssd_bytes <= 0 or self.ssd_segment_bytes <= 0:
            raise ConfigError("ssd_bytes and ssd_segment_bytes must be positive")


@dataclass(frozen=True)
class DaemonConfig:
    """``kvlink pool serve``: where it listens, which models it serves, where SSD tiers live.

    Each (model, namespace) gets its own :class:`PoolConfig`-sized pool; its SSD tier, when
    ``root`` is set, lives in ``root/<model>/<namespace>``.
    """

    host: str = "127.0.0.1"
    http_port: int = 7480
    data_port: int = 7481
    models: tuple[str, ...] = ("kimi-linear-48b-a3b",)
    root: str | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_pools: int = 64
    receive_arena: int = 512 << 20  # preallocated landing area for puts (bounds one put's size)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "DaemonConfig":
        """Read ``[daemon]`` and ``[pool]`` tables; keyword overrides (CLI flags) win."""
        import tomllib

        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        daemon, pool = dict(doc.get("daemon", {})), dict(doc.get("pool", {}))
        unknown = set(daemon) - {f for f in cls.__dataclass_fields__ if f != "pool"}
        unknown |= {f"pool.{k}" for k in set(pool) - set(PoolConfig.__dataclass_fields__)}
        if unknown:
            raise ConfigError(f"unknown settings in {path}: {sorted(unknown)}")
        if "models" in daemon:
            daemon["models"] = tuple(daemon["models"])
        daemon.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(pool=PoolConfig(**pool), **daemon)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
