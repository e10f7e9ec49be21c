"""What ``kvlink cluster up`` replays: requests of the Mooncake conversation trace as token ids,
and size-faithful synthetic cache entries for them.

- Trace (``../shared/traces/mooncake-conversation.jsonl``): one request per line, ``hash_ids`` one
  id per 512-token block; equal ids at equal positions are the same prefix. A replay takes whole
  conversations (requests sharing their first two block ids, i.e. the system prompt and the first
  turn), so the prefix reuse between turns is in the sample, in trace order.
- Tokens: each hash id is a fixed pseudo-random block of 512 ids seeded by the id, so equal hash ids
  give equal tokens and the pool's chained block hashes reproduce the trace's sharing.
- Entries: a block's full-attention KV has the layout's real size (``kv_bytes_per_token`` x block,
  times ``size_scale``) and a state checkpoint the layout's ``state_bytes``; the bytes are a
  pattern derived from the entry's key, so every node produces and can verify the same bytes.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvlink.errors import ConfigError
from kvlink.pool.index import FULL, STATE

TRACE_BLOCK = 512


@dataclass(frozen=True)
class TraceRequest:
    index: int            # line number in the trace
    timestamp_ms: int
    input_length: int
    hash_ids: tuple[int, ...]


def load_conversations(path: str | Path, conversations: int, max_input: int) -> list[TraceRequest]:
    """Every request of the first ``conversations`` conversations with more than one turn, in trace
    order, prompts cut to ``max_input`` tokens. Raises :class:`ConfigError` for an unreadable trace."""
    if conversations <= 0 or max_input < TRACE_BLOCK:
        raise ConfigError("need conversations > 0 and max_input >= 512")
    groups: dict[tuple, list[TraceRequest]] = collections.OrderedDict()
    try:
        with open(path) as f:
            for i, line in enumerate(f):
                rec = json.loads(line)
                ids = tuple(int(h) for h in rec["hash_ids"])
                length = min(int(rec["input_length"]), max_input, len(ids) * TRACE_BLOCK)
                req = TraceRequest(i, int(rec["timestamp"]), length, ids[: -(-length // TRACE_BLOCK)])
                groups.setdefault(ids[:2], []).append(req)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from None
    chosen = [reqs for reqs in groups.values() if len(reqs) > 1][:conversations]
    return sorted((r for reqs in chosen for r in reqs), key=lambda r: r.index)


def tokens_for(hash_ids, length: int) -> list[int]:
    """The prompt: each hash id's 512 fixed token ids, cut to ``length``."""
    out: list[int] = []
    for h in hash_ids:
        out.extend(np.random.default_rng(int(h)).integers(3, 32000, TRACE_BLOCK).tolist())
    return out[:length]


def entry_sizes(spec, block_size: int, size_scale: float) -> dict[str, int]:
    """Bytes of one full-attention block and of one state checkpoint."""
    full = int(spec.kv_bytes_per_token * block_size * size_scale)
    state = int(spec.state_bytes * size_scale)
    return {FULL: max(full, 64) if spec.kv_bytes_per_token else 0, STATE: max(state, 64) if spec.state_bytes else 0}


def entry_bytes(kind: str, key: bytes, nbytes: int) -> np.ndarray:
    """The synthetic entry for ``(kind, key)``: its key and kind, tiled to ``nbytes``."""
    unit = np.frombuffer(key + kind.encode().ljust(16, b"."), np.uint8)
    return np.resize(unit, nbytes)


def entry_matches(kind: str, key: bytes, buf) -> bool:
    """Whether ``buf`` holds exactly the synthetic entry for ``(kind, key)``."""
    got = np.frombuffer(buf, np.uint8)
    return bool(np.array_equal(got, entry_bytes(kind, key, got.size)))
