"""Connection handshake bodies: HELLO, CHALLENGE, AUTH, ACCEPT, ERROR (JSON, at most 64 KiB).

Without a secret: HELLO -> ACCEPT. With one, both sides prove they hold it (mutual HMAC-SHA256
over both nonces, the session id and the layout fingerprint)::

    client                               server
    HELLO {v, session, conn, fingerprint, nonce}  ->
                                         <-  CHALLENGE {nonce}
    AUTH {mac = H(secret, "client" ...)}  ->
                                         <-  ACCEPT {max_chunk, mac = H(secret, "server" ...)}

HELLO may also carry ``key`` (a key id): a receiver holding several secrets (``TransferServer(secrets=)``)
checks the MACs with that key's secret and records which key the peer proved. An unknown key id
is challenged too (with a secret nobody holds) and fails at AUTH exactly like a wrong secret, so
key ids cannot be enumerated.

A fingerprint the server does not accept ends the handshake with ERROR {"code": "fingerprint"}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from kvlink.errors import (AuthenticationError, KvlinkError, FingerprintMismatch, HandshakeError, TransferCancelled,
                           TransferFailed, TransferRejected, TransferTimeout, TransportError)

PROTOCOL = 1
NONCE_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode(body: bytes, required: dict[str, type]) -> dict:
    """Parse a JSON control body and check the named fields' types; raises :class:`HandshakeError`."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise HandshakeError("control body is not JSON") from None
    if not isinstance(obj, dict):
        raise HandshakeError("control body is not a JSON object")
    for name, kind in required.items():
        if not isinstance(obj.get(name), kind) or isinstance(obj.get(name), bool) and kind is not bool:
            raise HandshakeError(f"control body field {name!r} missing or not {kind.__name__}")
    return obj


def hex_bytes(obj: dict, name: str, size: int | None = None) -> bytes:
    try:
        value = bytes.fromhex(obj[name])
    except (KeyError, TypeError, ValueError):
        raise HandshakeError(f"field {name!r} is not hex") from None
    if size is not None and len(value) != size:
        raise HandshakeError(f"field {name!r} must be {size} bytes")
    return value


def mac(secret: bytes, role: str, client_nonce: bytes, server_nonce: bytes, session: bytes,
        fingerprint: bytes) -> str:
    msg = b"kvlink-v1|" + role.encode() + b"|" + client_nonce + server_nonce + session + fingerprint
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def check_mac(expected: str, got: object) -> None:
    """Raises :class:`AuthenticationError` unless ``got`` is the expected MAC (any str: a
    non-ASCII one is refused before ``compare_digest``, which would raise TypeError)."""
    if not isinstance(got, str) or not got.isascii() or not hmac.compare_digest(expected, got):
        raise AuthenticationError("shared-secret check failed")


# Error codes carried in ERROR frames, and the exception each becomes on the other side.
ERROR_TYPES: dict[str, type[KvlinkError]] = {
    "fingerprint": FingerprintMismatch,
    "auth": AuthenticationError,
    "handshake": HandshakeError,
    "unknown_transfer": TransferRejected,
    "rejected": TransferRejected,
    "range": TransferRejected,
    "busy": TransferRejected,
    "timeout": TransferTimeout,
    "cancelled": TransferCancelled,
    "failed": TransferFailed,
}


def error_body(code: str, message: str) -> bytes:
    return encode({"code": code, "message": message[:4000]})


def error_from_body(body: bytes) -> KvlinkError:
    """The typed exception an ERROR body stands for."""
    try:
        obj = decode(body, {"code": str, "message": str})
    except HandshakeError as exc:
        return HandshakeError(f"malformed ERROR frame: {exc}")
    kind = ERROR_TYPES.get(obj["code"], TransportError)
    if kind is FingerprintMismatch:
        error = FingerprintMismatch(b"", b"")
        error.args = (f"peer refused the layout: {obj['message']}",)
        return error
    return kind(f"peer: {obj['message']}")
