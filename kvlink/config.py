"""Configuration: frozen dataclasses, and the only place kvlink reads environment variables.

Environment variables (all optional):

- ``KVLINK_OPS_BACKEND``: force a kernel backend: ``auto`` (default), ``reference``, ``native``,
  ``triton`` or ``cuda``.
- ``KVLINK_BUILD_DIR``: where on-demand native builds (csrc/) are cached
  (default ``~/.cache/kvlink/build``).
- ``KVLINK_OPS_THREADS``: threads of the native copy-and-hash runs (default: one per core).
- ``KVLINK_SECRET``: shared secret for the transport handshake (read by
  :meth:`TransportConfig.from_env` and the CLI; unset means no authentication).
- ``KVLINK_INDEX_PASSWORD``: the password of the Valkey/Redis Cluster holding the global index
  (:meth:`ClusterConfig.password_from_env`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvlink.errors import ConfigError

BACKENDS = ("auto", "reference", "native", "triton", "cuda")


@dataclass(frozen=True)
class OpsConfig:
    """Which gather/scatter backend to use, where native builds go, and how many threads the
    native copy-and-hash runs use (0: one per core)."""

    backend: str = "auto"
    build_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "kvlink" / "build")
    threads: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown ops backend {self.backend!r}; expected one of {BACKENDS}")
        if self.threads < 0:
            raise ConfigError(f"ops threads must be >= 0, got {self.threads}")

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


@dataclass(frozen=True)
class DaemonConfig:
    """``kvlink pool serve``: where it listens, which models it serves, where SSD tiers live, who may use it.

    Tenants: ``tenants`` maps a tenant name to its secret (``[tenants]`` in the TOML). A caller is
    the tenant whose secret it proves (HTTP ``Authorization: Bearer <secret>``; data connections
    by the transport's HMAC handshake with the tenant name as key id), never a name it sends.
    A single secret given to the daemon (``KVLINK_SECRET``) is tenant ``default``; with no secret
    at all everything is one anonymous tenant ``default``, and the daemon refuses a non-loopback
    ``host`` unless ``allow_insecure``. ``admin_secret`` may read every tenant's ``/stats`` and
    ``/metrics``. Each (model, tenant) gets its own :class:`PoolConfig`-sized pool; its SSD tier,
    when ``root`` is set, lives in ``root/<model>/<tenant>`` (``pool.ssd_dir`` is refused: one
    directory must never be shared by two pools).
    """

    host: str = "127.0.0.1"
    http_port: int = 7480
    data_port: int = 7481
    models: tuple[str, ...] = ("kimi-linear-48b-a3b",)
    # More models, each from a spec JSON file (CacheSpec.to_dict, e.g. what an engine connector
    # writes for its own layout): model name -> path.
    spec_files: dict[str, str] = field(default_factory=dict)
    root: str | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    # The cluster-wide pool: the global index this daemon publishes its entries to (``[cluster]``).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    max_pools: int = 64
    receive_arena: int = 512 << 20  # preallocated landing area for puts (bounds one put's size)
    tenant_arena_bytes: int = 256 << 20  # most of receive_arena one tenant's transfers may hold at once
    max_request_bytes: int = 4 << 20  # largest JSON body: parsing holds the GIL (binary /lookup: 4M tokens)
    host_budget_bytes: int | None = None  # host memory of all pools together; None: a quarter of RAM
    tenants: dict[str, str] = field(default_factory=dict)  # tenant name -> secret
    admin_secret: str | None = None  # may read every tenant's /stats and /metrics (needs a tenant secret too)
    allow_insecure: bool = False  # listen on a non-loopback host without any tenant secret
    # Most log lines per minute for client-caused HTTP errors (bad headers, cut bodies), each one
    # short line without traceback; the rest are counted and summarised (bounds the daemon's log).
    client_error_log_per_minute: int = 20
    # TLS (PEM files; ``kvlink tls-cert`` writes dev ones): with tls_cert + tls_key, HTTP and data
    # connections are TLS; replies go to clients' TLS reply listeners, verified against tls_ca
    # (None: the system's trust store).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        for model in (*self.models, *self.spec_files):
            check_name("model", model)
        both = set(self.models) & set(self.spec_files)
        if both:
            raise ConfigError(f"models {sorted(both)} are given both as a preset and as a spec file")
        for name, secret in self.tenants.items():
            check_name("tenant", name)
            if not isinstance(secret, str) or len(secret) < 8 or not secret.isprintable() or not secret.isascii() \
                    or " " in secret:
                raise ConfigError(f"tenant {name!r}: secret must be at least 8 printable ASCII characters, no spaces")
        if len(set(self.tenants.values())) != len(self.tenants):
            raise ConfigError("two tenants share a secret: a secret must identify one tenant")
        if self.admin_secret is not None and (len(self.admin_secret) < 8 or self.admin_secret in self.tenants.values()):
            raise ConfigError("admin_secret must have at least 8 characters and differ from every tenant's")
        if self.pool.ssd_dir is not None:
            # One directory shared by every (model, tenant) pool would let one tenant's pool index
            # (and serve) another's entries: SSD tiers live only under root, one directory each.
            raise ConfigError("pool.ssd_dir is not allowed in a daemon config: set root (each (model, tenant) "
                              "pool gets root/<model>/<tenant>)")
        if not 0 < self.tenant_arena_bytes <= self.receive_arena:
            raise ConfigError("tenant_arena_bytes must be in 1..receive_arena")
        if not isinstance(self.client_error_log_per_minute, int) or self.client_error_log_per_minute < 0:
            raise ConfigError("client_error_log_per_minute must be >= 0")
        if self.max_request_bytes < 1024:
            raise ConfigError("max_request_bytes must be at least 1024")
        if self.host_budget_bytes is not None and self.host_budget_bytes < self.pool.page_bytes:
            raise ConfigError("host_budget_bytes must hold at least one page")
        if self.host_budget < self.pool.host_bytes:
            # Each pool reserves its whole quota when created: said now, not as a refusal per tenant later.
            raise ConfigError(f"host_budget_bytes ({self.host_budget}) cannot hold even one pool's quota "
                              f"pool.host_bytes ({self.pool.host_bytes}): lower pool.host_bytes or raise the budget")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.cluster.enabled and self.cluster.advertise_host is None and self.host in ("0.0.0.0", "::", ""):
            raise ConfigError("a daemon listening on every interface needs cluster.advertise_host: the address "
                              "other hosts reach it at")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_ca needs tls_cert and tls_key (it verifies TLS clients' reply listeners)")

    @property
    def host_budget(self) -> int:
        """Host memory all pools may hold together (each pool's own cap is ``pool.host_bytes``)."""
        return self.host_budget_bytes if self.host_budget_bytes is not None else _default_receive_budget()

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "DaemonConfig":
        """Read ``[daemon]``, ``[pool]``, ``[cluster]`` (:class:`ClusterConfig`), ``[tenants]`` (name =
        "secret") and ``[specs]`` (model = "spec.json") tables; keyword overrides (CLI flags) win.
        Raises :class:`ConfigError`."""
        import tomllib

        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        daemon, pool = dict(doc.get("daemon", {})), dict(doc.get("pool", {}))
        cluster = dict(doc.get("cluster", {}))
        unknown = set(daemon) - {f for f in cls.__dataclass_fields__
                                 if f not in ("pool", "tenants", "spec_files", "cluster")}
        unknown |= set(doc) - {"daemon", "pool", "tenants", "specs", "cluster"}
        unknown |= {f"cluster.{k}" for k in set(cluster) - set(ClusterConfig.__dataclass_fields__)}
        if "index_nodes" in cluster:
            cluster["index_nodes"] = tuple(cluster["index_nodes"])
        daemon["tenants"] = dict(doc.get("tenants", {}))
        daemon["spec_files"] = {str(k): str(v) for k, v in doc.get("specs", {}).items()}
        unknown |= {f"pool.{k}" for k in set(pool) - set(PoolConfig.__dataclass_fields__)}
        if unknown:
            raise ConfigError(f"unknown settings in {path}: {sorted(unknown)}")
        if "models" in daemon:
            daemon["models"] = tuple(daemon["models"])
        cluster_overrides = overrides.pop("cluster", None)
        daemon.update({k: v for k, v in overrides.items() if v is not None})
        try:
            cluster_config = ClusterConfig(**{**cluster, **(cluster_overrides or {})})
            return cls(pool=PoolConfig(**pool), cluster=cluster_config, **daemon)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
