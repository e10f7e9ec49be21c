"""Who is calling the pool daemon: tenants identified by the secret they hold, never by a name they send.

HTTP calls carry ``Authorization: Bearer <secret>``; the secret is compared, in constant time,
with every tenant's (and the admin's) so the time taken says nothing about which was close.
Data connections prove a tenant's secret in the transport's HMAC handshake, naming the tenant
as key id (:class:`~kvlink.transport.receiver.TransferServer` ``secrets``).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from kvlink.config import DaemonConfig
from kvlink.errors import AccessDenied, ConfigError

DEFAULT_TENANT = "default"  # the single-secret tenant, and the anonymous one without any secret
ADMIN = object()            # what :meth:`Tenants.identify` returns for the admin credential


@dataclass(frozen=True)
class Tenants:
    """The daemon's credentials: tenant name -> secret, and an optional admin secret."""

    secrets: dict[str, bytes]
    admin: bytes | None = None

    @classmethod
    def from_config(cls, config: DaemonConfig, secret: bytes | None = None) -> "Tenants":
        """Tenants of ``config.tenants``, plus tenant ``default`` for a single ``secret``
        (``KVLINK_SECRET``). Raises :class:`ConfigError` when ``default`` is named twice, or when
        nothing is secret and ``config.host`` is not loopback without ``config.allow_insecure``."""
        secrets = {name: s.encode() for name, s in config.tenants.items()}
        if secret:
            if DEFAULT_TENANT in secrets or secret in secrets.values():
                raise ConfigError(f"the daemon secret would be a second tenant {DEFAULT_TENANT!r} or secret")
            secrets[DEFAULT_TENANT] = secret
        admin = config.admin_secret.encode() if config.admin_secret else None
        if not secrets and admin is None and not config.allow_insecure and not _loopback(config.host):
            raise ConfigError(f"refusing to serve {config.host} without a secret: set tenants or "
                              f"KVLINK_SECRET, or allow_insecure = true")
        return cls(secrets, admin)

    @property
    def open(self) -> bool:
        """No tenant secret: everyone is the anonymous tenant ``default``."""
        return not self.secrets

    def identify(self, authorization: str | None):
        """The tenant name (or :data:`ADMIN`) an ``Authorization`` header proves. Raises
        :class:`AccessDenied` for a missing or unknown credential (unless the daemon is open)."""
        token = b""
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip().encode("utf-8", "replace")
        found = None
        # Compare against every credential, always: no early exit that would time the search.
        for name, secret in self.secrets.items():
            if hmac.compare_digest(token, secret):
                found = name
        if self.admin is not None and hmac.compare_digest(token, self.admin):
            found = ADMIN
        if found is not None:
            return found
        if self.open and not token:
            return DEFAULT_TENANT
        raise AccessDenied("missing or unknown credential (Authorization: Bearer <tenant secret>)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
