"""The prefix cache pool (:class:`PoolConfig`), its place in the cluster-wide pool
(:class:`ClusterConfig`), and the names and hosts they accept."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from kvlink.errors import ConfigError


@dataclass(frozen=True)
class PoolConfig:
    """Prefix cache pool settings (sizes in bytes).

    Tiers, top down: GPU (``gpu_bytes`` > 0), host DRAM (``host_bytes``), SSD (``ssd_dir`` set).
    ``write_mode``: ``back`` writes an entry to SSD only when it is demoted; ``through`` also
    writes every new entry to SSD before :meth:`Pool.store` returns, so host eviction loses nothing.
    ``checkpoint_every``: the state checkpoints a pool asks engines for, every N blocks
    (``Pool.checkpoint_positions``; None: only at the last block boundary).
    """

    block_size: int = 64
    namespace: str = ""
    checkpoint_every: int | None = 16
    host_bytes: int = 1 << 30  # this pool's cap (its tenant's quota), reserved whole in a shared HostBudget at creation
    page_bytes: int = 256 << 10
    chunk_bytes: int = 64 << 20  # memory tiers allocate (and charge the budget) this much at a time, on demand
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
        if self.chunk_bytes < self.page_bytes:
            raise ConfigError("chunk_bytes must hold at least one page")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError("checkpoint_every must be positive (or None)")
        if self.ssd_bytes <= 0 or self.ssd_segment_bytes <= 0:
            raise ConfigError("ssd_bytes and ssd_segment_bytes must be positive")


@dataclass(frozen=True)
class ClusterConfig:
    """A pool daemon's (or a cluster client's) place in the cluster-wide pool.

    ``index_nodes``: "host:port" of some nodes of the Valkey/Redis Cluster holding the global
    index (the client discovers the rest). ``cluster``: the name of this daemon's cluster
    (datacenter); ``node``: its stable name in the index (default ``<advertise host>:<data port>``),
    kept across restarts so a restarted daemon replaces its own records. ``advertise_host``: the
    address other hosts reach this daemon at (default: the daemon's ``host``). A holder whose
    heartbeat is ``heartbeat_ttl_s`` old is no longer offered; updates are batched every
    ``publish_interval_s`` (at most ``publish_batch`` per round trip, ``queue_limit`` waiting:
    beyond, the daemon re-publishes everything it holds once the index keeps up again).
    ``lookup_batch``: blocks probed in the first round of a lookup (the rest only if all of those
    are cached somewhere). ``replicate_after``: fetches of one prefix from a daemon of the same
    cluster after which a client copies it into its own daemon (0: never).
    """

    index_nodes: tuple[str, ...] = ()
    cluster: str = "local"
    node: str | None = None
    advertise_host: str | None = None
    key_prefix: str = "kvl"
    password: str | None = None
    heartbeat_ttl_s: float = 3.0
    publish_interval_s: float = 0.05
    publish_batch: int = 4096
    queue_limit: int = 1 << 18
    lookup_batch: int = 256
    replicate_after: int = 3
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster)
        if self.node is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,96}", self.node):
            raise ConfigError("node name must match [A-Za-z0-9._:-]{1,96}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", self.key_prefix):
            raise ConfigError("key_prefix must match [A-Za-z0-9_-]{1,16}")
        for addr in self.index_nodes:
            host, _, port = str(addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"index node {addr!r} is not host:port")
        if not 0.1 <= self.heartbeat_ttl_s <= 3600:
            raise ConfigError("heartbeat_ttl_s must be in [0.1, 3600]")
        if not 0 < self.publish_interval_s < self.heartbeat_ttl_s:
            raise ConfigError("publish_interval_s must be positive and below heartbeat_ttl_s")
        if self.publish_batch <= 0 or self.queue_limit < self.publish_batch or self.lookup_batch <= 0:
            raise ConfigError("publish_batch and lookup_batch must be positive, queue_limit >= publish_batch")
        if self.replicate_after < 0 or self.timeout_s <= 0:
            raise ConfigError("replicate_after must be >= 0 and timeout_s positive")

    @property
    def enabled(self) -> bool:
        return bool(self.index_nodes)

    @staticmethod
    def password_from_env() -> str | None:
        """The index's password from ``KVLINK_INDEX_PASSWORD`` (None when unset or empty)."""
        return os.environ.get("KVLINK_INDEX_PASSWORD") or None


NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(kind: str, name: object) -> str:
    """A model or tenant name that is safe as one path component: ``[A-Za-z0-9._-]{1,64}``, not
    ``.`` or ``..``. Raises :class:`ConfigError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{kind} name must match [A-Za-z0-9._-]{{1,64}} and not be . or ..")
    return name


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address: listening there needs
    no secret or TLS warning (only local processes can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
