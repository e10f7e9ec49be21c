"""Who is calling the pool daemon: tenants identified by the secret they hold, never by a name they send.

HTTP calls carry ``Authorization: Bearer <secret>``; the secret is compared, in constant time,
with every tenant's (and the admin's) so the time taken says nothing about which was close.
Data connections prove a tenant's secret in the transport's HMAC handshake, naming the tenant
as key id (:class:`~kvlink.transport.receiver.TransferServer` ``secrets``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from kvlink.config import DaemonConfig, is_loopback
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
        (``KVLINK_SECRET``). Raises :class:`ConfigError` when ``secret`` is shorter than 8 bytes,
        names ``default`` twice or equals a tenant's or the admin's secret; when ``admin_secret``
        is set without any tenant secret (everyone would be the open tenant ``default``); or when
        no tenant secret is set and ``config.host`` is not loopback without ``config.allow_insecure``."""
        secrets = {name: s.encode() for name, s in config.tenants.items()}
        admin = config.admin_secret.encode() if config.admin_secret else None
        if secret:
            if len(secret) < 8:
                raise ConfigError("the daemon secret (KVLINK_SECRET) must have at least 8 characters, as tenants'")
            if DEFAULT_TENANT in secrets or secret in secrets.values() or secret == admin:
                raise ConfigError(f"the daemon secret would be a second tenant {DEFAULT_TENANT!r}, or equals "
                                  f"a tenant's or the admin's secret")
            secrets[DEFAULT_TENANT] = secret
        # Only tenant secrets close the daemon: the admin credential does not authenticate tenants.
        if admin is not None and not secrets:
            raise ConfigError("admin_secret without any tenant secret would leave every tenant call "
                              "unauthenticated: set tenants or KVLINK_SECRET too")
        if not secrets and not config.allow_insecure and not is_loopback(config.host):
            raise ConfigError(f"refusing to serve {config.host} without a tenant secret: set tenants or "
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

