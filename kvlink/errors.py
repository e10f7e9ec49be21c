"""The one exception tree of kvlink.

Every error kvlink raises on purpose derives from :class:`KvlinkError`::

    KvlinkError
    ├── ConfigError                 bad configuration or arguments
    ├── SpecError                   malformed or unknown cache layout
    │   └── IncompatibleLayoutError  tensors/payload do not fit the destination layout
    │       └── FingerprintMismatch  peers or payloads built for a different layout
    ├── WireFormatError             a payload or frame failed validation
    │   ├── BadMagic
    │   ├── UnsupportedVersion
    │   ├── LengthError             a length is beyond its limit or beyond the buffer
    │   ├── UnknownCodec
    │   └── ChecksumMismatch        names the failing segment
    ├── CodecError                  a codec failed to encode or decode
    ├── StagingExhausted            the staging area has no room for this payload
    ├── BackendUnavailable          a requested kernel backend cannot run here
    ├── TransportError              network transfer failures
    │   ├── HandshakeError          the peer speaks another protocol or layout
    │   │   └── AuthenticationError  shared-secret (HMAC) check failed
    │   ├── PeerUnreachable         cannot (re)connect within the retry budget
    │   ├── TransferRejected        the receiver refused the transfer (unknown, too large, bad range)
    │   │   └── PartIndexError      a part index outside the transfer (also an IndexError)
    │   ├── TransferTimeout         no progress within the configured timeout
    │   ├── TransferCancelled       cancelled by either side
    │   └── TransferFailed          retries exhausted (e.g. a chunk kept failing its checksum)
    ├── ResourceLimit               a configured limit refused the request (connections, memory share, quota)
    ├── PoolError                   prefix cache pool failures (pool issue)
    │   ├── TierUnavailable         a tier (e.g. SSD) could not open or failed; the others keep serving
    │   ├── EntryMissing            an entry was evicted between lookup and fetch
    │   └── AccessDenied            the credential does not allow this call (wrong or missing tenant secret)
    └── EngineError                 engine API misuse (unknown request, wrong order)
        └── LoadFailed              a load did not complete: names the invalid layers and blocks

Decoders raise before writing anything, so a caught error means the destination is untouched.
"""

from __future__ import annotations


class KvlinkError(Exception):
    """Base class of every error kvlink raises on purpose."""


class ConfigError(KvlinkError, ValueError):
    """Invalid configuration value or argument."""


class SpecError(KvlinkError, ValueError):
    """A cache layout is malformed or unknown."""


class IncompatibleLayoutError(SpecError):
    """Tensors or a payload do not match the destination's layout (shape, dtype, kind)."""


class FingerprintMismatch(IncompatibleLayoutError):
    """The payload or peer was built for a different cache layout."""

    def __init__(self, expected: bytes, got: bytes):
        super().__init__(f"spec fingerprint mismatch: expected {expected.hex()}, got {got.hex()}")
        self.expected = expected
        self.got = got


class WireFormatError(KvlinkError, ValueError):
    """A payload or frame failed validation."""


class BadMagic(WireFormatError):
    """The first bytes are not a kvlink magic."""


class UnsupportedVersion(WireFormatError):
    """The format version is not one this build reads."""


class LengthError(WireFormatError):
    """A declared length exceeds its limit or the buffer that holds it."""


class UnknownCodec(WireFormatError):
    """A segment names a codec this build does not know."""


class ChecksumMismatch(WireFormatError):
    """A segment's bytes do not match its checksum."""

    def __init__(self, segment: str, expected: int, got: int):
        super().__init__(f"checksum mismatch in segment {segment}: expected {expected:#018x}, got {got:#018x}")
        self.segment = segment
        self.expected = expected
        self.got = got


class CodecError(KvlinkError):
    """A codec could not encode or decode its input."""


class StagingExhausted(KvlinkError):
    """The staging area cannot hold the requested bytes right now."""


class BackendUnavailable(KvlinkError):
    """A requested kernel backend (triton, cuda, native) cannot run on this machine."""


class TransportError(KvlinkError):
    """A network transfer failed."""


class HandshakeError(TransportError):
    """The peer's handshake was malformed, or it speaks another version or layout."""


class AuthenticationError(HandshakeError):
    """The shared-secret challenge failed (wrong or missing secret)."""


class PeerUnreachable(TransportError):
    """The peer could not be (re)connected within the retry budget."""


class TransferRejected(TransportError):
    """The receiver refused the transfer or one of its frames (unknown id, too large, out of range)."""


class PartIndexError(TransferRejected, IndexError):
    """A part index outside the transfer (an ``IndexError`` too, for callers that catch that)."""


class TransferTimeout(TransportError):
    """A transfer made no progress within its timeout."""


class TransferCancelled(TransportError):
    """The transfer was cancelled by this side or the peer."""


class TransferFailed(TransportError):
    """The transfer gave up after bounded retries."""


class ResourceLimit(KvlinkError):
    """A configured limit refused the request (connections per peer or in total, a peer's memory
    share, a tenant's quota). Names the limit and its config field."""


class PoolError(KvlinkError):
    """The prefix cache pool failed an operation."""


class TierUnavailable(PoolError):
    """A pool tier (e.g. the SSD tier: damaged index, full or read-only disk) could not be opened or
    has failed; the pool keeps serving its other tiers."""


class EntryMissing(PoolError, LookupError):
    """A pool entry named by a lookup is gone (evicted since); look up again."""


class AccessDenied(PoolError):
    """The caller's credential does not allow this call (missing, wrong, or another tenant's)."""


class EngineError(KvlinkError):
    """The engine API was used out of order (unknown or duplicate request id)."""


class LoadFailed(EngineError):
    """A request's load did not complete. Recompute ``invalid_blocks`` (every block holding
    tokens the load was to write); ``invalid_layers`` names the layers that did not land,
    ``causes`` the typed error behind each (layer -> error; -1 for the whole transfer)."""

    def __init__(self, request_id: str, invalid_layers: list[int], invalid_blocks: list[int],
                 causes: dict[int, KvlinkError]):
        first = next(iter(causes.values()), None)
        super().__init__(f"request {request_id}: layers {invalid_layers} did not load "
                         f"({len(invalid_blocks)} blocks to recompute): {first!r}")
        self.request_id = request_id
        self.invalid_layers = invalid_layers
        self.invalid_blocks = invalid_blocks
        self.causes = causes
