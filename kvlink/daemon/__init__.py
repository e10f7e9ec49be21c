"""``kvlink pool serve`` and its clients. See :mod:`kvlink.daemon.protocol` for the API."""

from kvlink.daemon.client import PoolClient, SyncPoolClient
from kvlink.daemon.server import PoolDaemon

__all__ = ["PoolClient", "PoolDaemon", "SyncPoolClient"]
