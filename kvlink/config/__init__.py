"""Configuration: frozen dataclasses, and the only package where kvlink reads environment variables.

Environment variables (all optional):

- ``KVLINK_OPS_BACKEND``: force a kernel backend: ``auto`` (default), ``reference``, ``native``,
  ``triton`` or ``cuda``.
- ``KVLINK_BUILD_DIR``: where on-demand native builds (csrc/) are cached
  (default ``~/.cache/kvlink/build``).
- ``KVLINK_OPS_THREADS``: threads of the native copy-and-hash runs (default: one per core).
- ``KVLINK_DEVICE_HASH``: ``0`` hashes payloads of GPU caches on the host instead of the GPU.
- ``KVLINK_DEVICE_SCRATCH_BYTES``: device scratch per pack or verified unpack for that (256 MiB).
- ``KVLINK_SECRET``: shared secret for the transport handshake (read by
  :meth:`TransportConfig.from_env` and the CLI; unset means no authentication).
- ``KVLINK_INDEX_PASSWORD``: the password of the Valkey/Redis Cluster holding the global index
  (:meth:`ClusterConfig.password_from_env`).
"""

from kvlink.config.daemon import DaemonConfig
from kvlink.config.ops import BACKENDS, CodecConfig, OpsConfig, triton_interpret_enabled
from kvlink.config.pool import NAME_RE, ClusterConfig, PoolConfig, check_name, is_loopback
from kvlink.config.transport import TransportConfig, parse_rate

__all__ = ["BACKENDS", "NAME_RE", "ClusterConfig", "CodecConfig", "DaemonConfig", "OpsConfig", "PoolConfig",
           "TransportConfig", "check_name", "is_loopback", "parse_rate", "triton_interpret_enabled"]
