"""``kvlink pool serve``'s settings: :class:`DaemonConfig`, read from TOML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvlink.config.pool import ClusterConfig, PoolConfig, check_name
from kvlink.config.transport import _default_receive_budget
from kvlink.errors import ConfigError


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
