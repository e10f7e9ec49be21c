"""The transport's settings (:class:`TransportConfig`), link rates, and the defaults sized from
this host's memory and descriptor limits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from kvlink.errors import ConfigError

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


def _default_receive_budget() -> int:
    """A quarter of physical memory (``os.sysconf``), at least 256 MiB; 4 GiB where unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 4 << 30
    return max(256 << 20, total // 4) if total > 0 else 4 << 30


def _default_max_connections() -> int:
    """A quarter of the soft ``RLIMIT_NOFILE``, within 16..1024 (1024 where unknown)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 4))


@dataclass(frozen=True)
class TransportConfig:
    """Sender and receiver settings. Rates are bits per second; sizes are bytes.

    The defaults were chosen by measurement (``kvlink bench transfer``, benchmarks/transfer.py):
    4 connections; parts are cut into 256 KiB grid chunks (the unit of acknowledgement and
    retransmission) and sent in frames of consecutive chunks sized to ~4 ms at the pacing rate,
    or ~16 ms at the estimated rate when nothing paces, up to 64 MiB (per-frame cost is what limits
    loopback speed below that: on a 16-core host 16 MiB frames reached 0.77-0.82x of raw sockets
    where 4 MiB frames reached 0.68-0.76x; on 2 cores 64 MiB frames use ~5% less CPU than 16 MiB);
    4 MiB until the first rate estimate, so concurrent transfers' weights act from the start (a
    transfer alone on its client: 16 MiB, growing with the rate its acknowledgements show).
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
    # Receiver memory: all transfers held at once (default: a quarter of physical RAM, so a host
    # is never promised more than it has), one transfer, and one peer address's share of it all.
    receive_budget_bytes: int = field(default_factory=_default_receive_budget)
    max_transfer_bytes: int | None = None  # None: the peer share
    peer_share_bytes: int | None = None    # bytes one peer may hold reserved (data + bookkeeping); None: budget / 2
    max_parts: int = 131072               # parts one transfer may declare at BEGIN
    accept_backlog: int = 1024            # begun transfers not yet taken by the application
    idle_timeout: float = 60.0            # a receiving transfer with no data this long fails, freeing its bytes
    handshake_timeout: float = 5.0        # TCP or TLS handshake plus kvlink handshake, per connection
    conn_idle_timeout: float = 300.0      # an authenticated connection with no frame this long is closed
    # Authenticated connections a receiver holds at once, all peers together (default: a quarter
    # of the descriptor limit, at most 1024: each costs two descriptors and a reader thread), and
    # of one peer (refused with ERROR busy when its handshake completes).
    max_connections: int = field(default_factory=_default_max_connections)
    max_connections_per_peer: int = 128
    # A peer is its proven key id when it has one (a pool daemon's tenant), else its address.
    # Connections still in the handshake have their own, smaller limits (no reader thread yet;
    # not counted above): when full, the oldest one from that address (or of all) is dropped, so
    # silent connections cannot keep a real peer out.
    max_handshakes: int = 64
    max_handshakes_per_peer: int = 16
    # Begun, unfinished transfers held at once, in total and by one peer (each costs bookkeeping,
    # and a claimer's task, even with no byte reserved).
    max_live_transfers: int = 1024
    max_live_transfers_per_peer: int = 64

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
        if self.conn_idle_timeout <= 0:
            raise ConfigError("conn_idle_timeout must be positive")
        if self.receive_budget_bytes <= 0:
            raise ConfigError("receive_budget_bytes must be positive")
        for name in ("max_transfer_bytes", "peer_share_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("max_parts", "max_connections", "max_connections_per_peer", "max_handshakes",
                     "max_handshakes_per_peer", "max_live_transfers", "max_live_transfers_per_peer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def peer_share(self) -> int:
        """Bytes one peer (key id, else address) may hold reserved at a receiver (``peer_share_bytes``, default
        half the budget, never more than the budget)."""
        share = self.peer_share_bytes if self.peer_share_bytes is not None else self.receive_budget_bytes // 2
        return max(1, min(share, self.receive_budget_bytes))

    @property
    def transfer_limit(self) -> int:
        """The most bytes one transfer may reserve (``max_transfer_bytes``, within the peer share)."""
        limit = self.max_transfer_bytes if self.max_transfer_bytes is not None else self.peer_share
        return min(limit, self.peer_share)

    @staticmethod
    def proxy_key_from_env() -> str | None:
        """The API key ``kvlink proxy`` requires from clients, from ``KVLINK_PROXY_KEY`` (None when unset)."""
        return os.environ.get("KVLINK_PROXY_KEY") or None

    @staticmethod
    def secret_from_env() -> bytes | None:
        """The shared secret from ``KVLINK_SECRET`` (None when unset or empty)."""
        value = os.environ.get("KVLINK_SECRET", "")
        return value.encode() if value else None
