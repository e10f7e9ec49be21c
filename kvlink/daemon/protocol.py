"""What the pool daemon and its clients exchange (JSON over HTTP, binary request parts and meta of
kvlink transfers).

Every HTTP call but ``/health`` carries ``Authorization: Bearer <tenant secret>`` (or the admin
secret, for ``/stats`` and ``/metrics``); the caller's tenant is the one whose secret it holds.
HTTP control API (``127.0.0.1:7480`` by default)::

    GET  /health                 {"ok": bool, "pools": N, "models": [...], "tiers": {...}}  (no credential)
    GET  /stats                  {"tenant": name, "pools": {"<model>/<tenant>": summary}}  (admin: all tenants)
    GET  /metrics                Prometheus text, the caller's tenant's pools (admin: all)
    POST /lookup   {model, tokens}          -> hit (keys in hex)
    POST /lookup?model=M  (application/octet-stream: u32 little-endian tokens)  -> hit
    POST /evict    {model, bytes}           -> {"freed": n}

Errors are ``{"error": type, "message": text}`` with 400 (bad request), 401 (no or wrong
credential), 403 (admin calling a tenant's API), 404 (unknown model or path), 405, 413 (body
over ``DaemonConfig.max_request_bytes``) or 429 (a daemon limit, e.g. ``max_pools``: retry later).

Data path: kvlink transfers to the daemon's transport port, authenticated by the handshake with
the tenant's secret and its name as key id. Meta is small and fixed: ``{"op", "model",
"reply_port", "reply_id"}``; what can be long travels as part 0, in binary (little-endian):

- put: ``b"KVP1", u32 n_tokens, u32 n_pieces, u32 tokens[n_tokens], u8 kinds[n_pieces],
  u32 blocks[n_pieces], u64 xxh3``; parts 1.. are the pieces' bytes in that order.
- get: ``b"KVG1", u32 n_keys, u8 kinds[n_keys], n_keys keys of KEY_BYTES bytes, u64 xxh3``.

The trailing xxh3-64 covers the bytes before it, so the daemon's part verifier judges request
parts as it judges payloads, and a put of payloads still travels without chunk hashes.

Kinds are indices into :data:`KINDS`. The daemon answers with a transfer to ``reply_port`` on
the client's host, id ``reply_id``: for a put one empty part and meta ``{"stored", "on_ssd",
"failed", "errors"}``; for a get one part per key, empty for a key it no longer has (entries are
never empty, so part lengths say what is missing, however many), and empty meta; on failure
``{"error": type, "message": text}`` (a public :mod:`kvlink.errors` class name).
"""

from __future__ import annotations

import struct

import numpy as np

from kvlink.codec.checksum import checksum
from kvlink.config import check_name
from kvlink.errors import ConfigError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit
from kvlink.serde.payload import PayloadScan, payload_intact

KINDS = (FULL, SLIDING, STATE)
MAX_TOKENS = 1 << 22   # tokens of one prompt (lookup or put)
MAX_KEYS = 1 << 20     # entries of one get
KEY_BYTES = 16         # a prefix key (PrefixIndex hashes)
PUT_MAGIC, GET_MAGIC = b"KVP1", b"KVG1"
_HEAD = struct.Struct("<4sII")
_GET_HEAD = struct.Struct("<4sI")
_SUM = 8  # the xxh3 trailer


def error_name(exc: BaseException) -> str:
    """The public class name an error is reported under (``_Forbidden`` -> ``AccessDenied``):
    private subclasses stay private, and clients map the name back to a :mod:`kvlink.errors` type."""
    return next(k.__name__ for k in type(exc).__mro__ if not k.__name__.startswith("_"))


def pool_name(model: str, tenant: str) -> str:
    return f"{model}/{tenant}"


def field(obj: dict, name: str, kind: type, default=None):
    """``obj[name]`` checked to be a ``kind`` (bool is not an int); raises :class:`ConfigError`."""
    value = obj.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"field {name!r} must be {kind.__name__}")
    return value


def model_of(obj: dict) -> str:
    return check_name("model", field(obj, "model", str))


def tokens_of(obj: dict) -> list[int]:
    tokens = field(obj, "tokens", list)
    if len(tokens) > MAX_TOKENS or not all(type(t) is int and 0 <= t < 1 << 32 for t in tokens):
        raise ConfigError(f"tokens must be at most {MAX_TOKENS} ids in [0, 2**32)")
    return tokens


def decode_tokens(buf) -> np.ndarray:
    """A binary /lookup body: u32 little-endian token ids; raises :class:`ConfigError`."""
    if len(buf) % 4 or len(buf) > 4 * MAX_TOKENS:
        raise ConfigError(f"a binary token list is at most {MAX_TOKENS} u32 ids")
    return np.frombuffer(buf, "<u4")


def encode_tokens(tokens) -> bytes:
    """u32 little-endian ids; raises :class:`ConfigError`. Converted in slices: one numpy call
    over millions of Python ints would hold the GIL (and any event loop) for a third of a second."""
    if len(tokens) > MAX_TOKENS:
        raise ConfigError(f"tokens must be at most {MAX_TOKENS} ids in [0, 2**32)")
    out = []
    for i in range(0, len(tokens), 1 << 15):
        try:
            toks = np.asarray(tokens[i:i + (1 << 15)])
        except (OverflowError, TypeError, ValueError):
            toks = np.zeros(1, dtype=object)  # refused below
        if toks.ndim != 1 or toks.dtype.kind not in "iu" or toks.min() < 0 or toks.max() >= 1 << 32:
            raise ConfigError(f"tokens must be at most {MAX_TOKENS} ids in [0, 2**32)")
        out.append(toks.astype("<u4").tobytes())  # in range: exact
    return b"".join(out)


# -- binary request parts ---------------------------------------------------------------------
def encode_put(tokens, names: list[tuple[str, int]]) -> bytes:
    """Part 0 of a put: the prompt's tokens and the (kind, block) of each following part."""
    toks = np.frombuffer(encode_tokens(tokens), "<u4")
    try:
        kinds = np.array([KINDS.index(kind) for kind, _ in names], dtype=np.uint8)
    except ValueError:
        raise ConfigError(f"piece kinds must be in {KINDS}") from None
    blocks = np.array([block for _, block in names], dtype=np.int64)
    if len(blocks) and (blocks.min() < 0 or blocks.max() >= 1 << 32):
        raise ConfigError("block indices must be in [0, 2**32)")
    return _sealed(b"".join((_HEAD.pack(PUT_MAGIC, len(toks), len(names)), toks.tobytes(),
                             kinds.tobytes(), blocks.astype("<u4").tobytes())))


def decode_put(buf, num_pieces: int) -> tuple[list[int], list[tuple[str, int]]]:
    """Tokens and piece names of a put's part 0, which must name exactly ``num_pieces`` pieces."""
    buf = memoryview(buf).cast("B")
    if len(buf) < _HEAD.size:
        raise ConfigError("put request part is too short")
    magic, ntok, npieces = _HEAD.unpack_from(buf)
    if magic != PUT_MAGIC or ntok > MAX_TOKENS or npieces != num_pieces:
        raise ConfigError(f"put request part: bad magic, over {MAX_TOKENS} tokens, or not one name per piece")
    if len(buf) != _HEAD.size + 4 * ntok + 5 * npieces + _SUM or not request_intact(buf):
        raise ConfigError("put request part has the wrong length or checksum")
    at = _HEAD.size
    tokens = np.frombuffer(buf, "<u4", ntok, at).copy()  # hashed as is, no list of 4M ints
    kinds = np.frombuffer(buf, np.uint8, npieces, at + 4 * ntok)
    if npieces and kinds.max() >= len(KINDS):
        raise ConfigError("put request part names an unknown kind")
    blocks = np.frombuffer(buf, "<u4", npieces, at + 4 * ntok + npieces).tolist()
    return tokens, [(KINDS[k], b) for k, b in zip(kinds.tolist(), blocks)]


def encode_get(keys: list[tuple[str, bytes]]) -> bytes:
    """Part 0 of a get: the (kind, key) of each entry wanted."""
    if len(keys) > MAX_KEYS or any(len(key) != KEY_BYTES or kind not in KINDS for kind, key in keys):
        raise ConfigError(f"at most {MAX_KEYS} keys of {KEY_BYTES} bytes, kinds in {KINDS}")
    kinds = bytes(KINDS.index(kind) for kind, _ in keys)
    return _sealed(_GET_HEAD.pack(GET_MAGIC, len(keys)) + kinds + b"".join(key for _, key in keys))


def decode_get(buf) -> list[tuple[str, bytes]]:
    buf = memoryview(buf).cast("B")
    if len(buf) < _GET_HEAD.size:
        raise ConfigError("get request part is too short")
    magic, n = _GET_HEAD.unpack_from(buf)
    if magic != GET_MAGIC or n > MAX_KEYS or len(buf) != _GET_HEAD.size + n * (1 + KEY_BYTES) + _SUM \
            or not request_intact(buf):
        raise ConfigError(f"get request part: bad magic, over {MAX_KEYS} keys, wrong length or checksum")
    at = _GET_HEAD.size
    kinds = bytes(buf[at:at + n])
    if any(k >= len(KINDS) for k in kinds):
        raise ConfigError("get request part names an unknown kind")
    keys = bytes(buf[at + n:len(buf) - _SUM])
    return [(KINDS[k], keys[i * KEY_BYTES:(i + 1) * KEY_BYTES]) for i, k in enumerate(kinds)]


def _sealed(body: bytes) -> bytes:
    return body + checksum(body).to_bytes(_SUM, "little")


def request_intact(buf) -> bool:
    """Whether ``buf`` is a request part (put or get) whose trailer matches its bytes."""
    buf = memoryview(buf).cast("B")
    return (len(buf) >= 4 + _SUM and bytes(buf[:4]) in (PUT_MAGIC, GET_MAGIC)
            and checksum(buf[:-_SUM]) == int.from_bytes(buf[-_SUM:], "little"))


def part_intact(buf) -> bool:
    """The daemon's part verifier: a kvlink payload (a piece) or a request part."""
    return payload_intact(buf) or request_intact(buf)


class PartScan:
    """:func:`part_intact` in streaming form: payloads are hashed as they land
    (:class:`~kvlink.serde.payload.PayloadScan`); a request part (small) is checked whole at the end."""

    def __init__(self, buf):
        self.buf = memoryview(buf).cast("B")
        self.payload = PayloadScan(self.buf)
        self._end = 0

    def advance(self, end: int) -> None:
        self._end = max(self._end, min(end, len(self.buf)))
        self.payload.advance(end)

    @property
    def scanned(self) -> int:
        return self._end

    def verdict(self) -> bool:
        return self.payload.verdict() or (self._end == len(self.buf) and request_intact(self.buf))


# -- hits ---------------------------------------------------------------------------------------
def hit_to_json(hit: PrefixHit) -> dict:
    return {"tokens": hit.tokens, "kv_tokens": hit.kv_tokens, "stopped": hit.stopped,
            "full": [k.hex() for k in hit.full], "sliding": [k.hex() for k in hit.sliding],
            "state": None if hit.state is None else hit.state.hex()}


def hit_from_json(obj: dict) -> PrefixHit:
    """Raises :class:`ConfigError` for a malformed hit."""
    try:
        return PrefixHit(int(obj["tokens"]), tuple(bytes.fromhex(k) for k in obj["full"]),
                         tuple(bytes.fromhex(k) for k in obj["sliding"]),
                         None if obj["state"] is None else bytes.fromhex(obj["state"]),
                         int(obj["kv_tokens"]), str(obj["stopped"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed hit: {exc}") from None
