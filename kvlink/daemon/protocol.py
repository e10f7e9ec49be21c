"""What the pool daemon and its clients exchange (JSON over HTTP, meta of kvlink transfers).

HTTP control API (``127.0.0.1:7480`` by default)::

    GET  /health                 {"ok": true, "pools": N}
    GET  /stats                  {"pools": {"<model>/<namespace>": summary}}
    GET  /metrics                Prometheus text
    POST /lookup   {model, namespace?, tokens}      -> hit (keys in hex)
    POST /evict    {model, namespace?, bytes}       -> {"freed": n}

Data path: kvlink transfers to the daemon's transport port. A put is a transfer whose meta is
``{"op": "put", model, namespace, tokens, pieces: [[kind, block], ...]}`` and whose parts are
the pieces' bytes in that order. A get is a transfer with meta ``{"op": "get", model,
namespace, keys: [[kind, hex], ...], reply_port, reply_id}`` and no bytes; the daemon answers
with a transfer to ``reply_port`` on the client's host, id ``reply_id``, one part per key (an
empty part for a key it no longer has) and meta ``{"missing": [indices]}``.
"""

from __future__ import annotations

from kvlink.errors import ConfigError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit

KINDS = (FULL, SLIDING, STATE)
MAX_TOKENS = 1 << 22


def pool_name(model: str, namespace: str) -> str:
    return f"{model}/{namespace}"


def field(obj: dict, name: str, kind: type, default=None):
    value = obj.get(name, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"field {name!r} must be {kind.__name__}")
    return value


def tokens_of(obj: dict) -> list[int]:
    tokens = field(obj, "tokens", list)
    if len(tokens) > MAX_TOKENS or not all(isinstance(t, int) and 0 <= t < 1 << 32 for t in tokens):
        raise ConfigError(f"tokens must be at most {MAX_TOKENS} ids in [0, 2**32)")
    return tokens


def hit_to_json(hit: PrefixHit) -> dict:
    return {"tokens": hit.tokens, "kv_tokens": hit.kv_tokens, "stopped": hit.stopped,
            "full": [k.hex() for k in hit.full], "sliding": [k.hex() for k in hit.sliding],
            "state": None if hit.state is None else hit.state.hex()}


def hit_from_json(obj: dict) -> PrefixHit:
    try:
        return PrefixHit(int(obj["tokens"]), tuple(bytes.fromhex(k) for k in obj["full"]),
                         tuple(bytes.fromhex(k) for k in obj["sliding"]),
                         None if obj["state"] is None else bytes.fromhex(obj["state"]),
                         int(obj["kv_tokens"]), str(obj["stopped"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed hit: {exc}") from None


def hit_keys(hit: PrefixHit) -> list[tuple[str, bytes]]:
    keys = [(FULL, k) for k in hit.full] + [(SLIDING, k) for k in hit.sliding]
    if hit.state is not None:
        keys.append((STATE, hit.state))
    return keys


def keys_of(obj: dict) -> list[tuple[str, bytes]]:
    out = []
    for item in field(obj, "keys", list):
        if not (isinstance(item, list) and len(item) == 2 and item[0] in KINDS and isinstance(item[1], str)):
            raise ConfigError("keys are [kind, hex] pairs")
        try:
            out.append((item[0], bytes.fromhex(item[1])))
        except ValueError:
            raise ConfigError("key is not hex") from None
    return out


def prometheus(summaries: dict[str, dict]) -> str:
    """Prometheus exposition text of every pool's summary."""
    lines = ["# TYPE kvlink_pool_tier_bytes gauge", "# TYPE kvlink_pool_tier_entries gauge",
             "# TYPE kvlink_pool_events_total counter"]
    for name, summary in sorted(summaries.items()):
        model, namespace = name.split("/", 1)
        labels = f'model="{model}",namespace="{namespace}"'
        for tier, t in summary["tiers"].items():
            lines.append(f'kvlink_pool_tier_bytes{{{labels},tier="{tier}",kind="used"}} {t["used"]}')
            lines.append(f'kvlink_pool_tier_bytes{{{labels},tier="{tier}",kind="capacity"}} {t["capacity"]}')
            if "disk" in t:
                lines.append(f'kvlink_pool_tier_bytes{{{labels},tier="{tier}",kind="disk"}} {t["disk"]}')
            lines.append(f'kvlink_pool_tier_entries{{{labels},tier="{tier}"}} {t["entries"]}')
        for event, count in sorted(summary["counters"].items()):
            lines.append(f'kvlink_pool_events_total{{{labels},event="{event}"}} {count}')
    return "\n".join(lines) + "\n"
