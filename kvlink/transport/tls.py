"""TLS for kvlink connections: ``ssl.SSLContext`` builders from PEM files, and a self-signed dev CA.

``TransferServer(..., ssl=server_context(cert, key))`` and ``TransferClient(..., ssl=client_context(ca),
server_hostname=...)`` encrypt and authenticate the data path; the HMAC handshake still runs inside
TLS. ``make_dev_certs`` (``kvlink tls-cert``) writes a CA plus server and client certificates for
tests and trials; production deployments bring certificates from their own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

from kvlink.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2
MAX_DEV_CERT_DAYS = 3650
DEV_CERT_FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def _load(action, what: str, *paths) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS {what} from {', '.join(str(p) for p in paths if p)}: {exc}") from exc


def server_context(cert: str | os.PathLike, key: str | os.PathLike, ca: str | os.PathLike | None = None
                   ) -> ssl.SSLContext:
    """A server context presenting ``cert`` (PEM, chain allowed) with ``key``. With ``ca``, clients
    must present a certificate that ``ca`` signed (mutual TLS). Raises :class:`ConfigError` when a
    file is missing or not a valid PEM certificate/key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load(lambda: ctx.load_cert_chain(cert, key), "certificate/key", cert, key)
    if ca is not None:
        _load(lambda: ctx.load_verify_locations(cafile=ca), "CA", ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | os.PathLike | None, cert: str | os.PathLike | None = None,
                   key: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (PEM; None: the system's trust
    store) and its host name (pass ``server_hostname`` to the client when connecting by address).
    ``cert``/``key`` present a client certificate for servers that require one. Raises
    :class:`ConfigError` when a file is missing or invalid."""
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts only ``ca``; verifies cert and host name
        _load(lambda: ctx.load_verify_locations(cafile=ca), "CA", ca)
    ctx.minimum_version = MIN_VERSION
    if cert is not None:
        _load(lambda: ctx.load_cert_chain(cert, key), "client certificate/key", cert, key)
    return ctx


def make_dev_certs(out: str | os.PathLike, hosts: list[str] | tuple[str, ...] = ("localhost", "127.0.0.1"),
                   days: int = 30, force: bool = False) -> dict[str, Path]:
    """Write a self-signed dev CA (``ca.pem``; its key is not kept, so nothing more can be signed
    with it), a server certificate for ``hosts`` (DNS names or IP addresses) and a client
    certificate, with their keys (mode 0600), into ``out``. Returns name -> path.

    Raises :class:`ConfigError` for a bad host, ``days`` outside 1..3650, existing files (unless
    ``force``) or when the ``cryptography`` package is missing (``pip install 'kvlink[tls]'``).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ConfigError("dev certificates need the 'cryptography' package: pip install 'kvlink[tls]'") from None
    if not 1 <= days <= MAX_DEV_CERT_DAYS:
        raise ConfigError(f"days must be within 1..{MAX_DEV_CERT_DAYS}, got {days}")
    if not hosts:
        raise ConfigError("at least one host name or address is needed")
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host) or len(host) > 253:
                raise ConfigError(f"bad host name {host!r}") from None
            names.append(x509.DNSName(host))
    out = Path(out)
    paths = {name: out / name for name in DEV_CERT_FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (force to replace)")
    out.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvlink dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = subject("kvlink dev CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(subject(cn)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(str(hosts[0]), ExtendedKeyUsageOID.SERVER_AUTH, names)
    client_cert, client_key = leaf("kvlink dev client", ExtendedKeyUsageOID.CLIENT_AUTH, None)

    def pem_cert(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    contents = {"ca.pem": pem_cert(ca_cert), "server.pem": pem_cert(server_cert), "server-key.pem": pem_key(server_key),
                "client.pem": pem_cert(client_cert), "client-key.pem": pem_key(client_key)}
    for name, data in contents.items():
        _write(paths[name], data, private=name.endswith("-key.pem"))
    return paths


def _write(path: Path, data: bytes, private: bool) -> None:
    # A fresh temporary name, created exclusively (O_EXCL: never a leftover or planted file or
    # symlink) with mode 0600, so keys are never briefly readable; then renamed over ``path``
    # (rename replaces a symlink there, it does not write through it).
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if not private:
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write {path}: {exc}") from exc
        raise
