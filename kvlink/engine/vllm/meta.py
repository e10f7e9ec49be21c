"""What kvlink's vLLM connector passes around: the scheduler's per-step jobs for the workers, the
``kv_transfer_params`` a proxy and the two servers exchange, and the connector's settings.

``kv_transfer_params`` (JSON, per request):

- to the prefill server (the proxy sets it): ``{"do_remote_decode": true, "kvlink_transfer": ID,
  "kvlink_decode": "host:port"}``: compute the prompt and push its cache to that decode server's
  kvlink receiver as transfer ``ID``;
- back from the prefill server, forwarded to the decode server: ``{"do_remote_prefill": true,
  "kvlink_transfer": ID, "kvlink_tokens": N, "kvlink_start": S}``: tokens ``[S, N)`` arrive as
  ``ID``; tokens ``[0, S)`` are in the shared pool (the prefill server loaded them from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvlink.config import TransportConfig
from kvlink.errors import ConfigError


def parse_address(text: object, what: str) -> tuple[str, int]:
    """``"host:port"`` as a pair; anything else is a :class:`ConfigError`."""
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"{what}: expected 'host:port', got {text!r}")
    host, _, port = text.rpartition(":")
    try:
        value = int(port)
    except ValueError:
        raise ConfigError(f"{what}: bad port in {text!r}") from None
    if not host or not 0 <= value < 65536:
        raise ConfigError(f"{what}: bad address {text!r}")
    return host.strip("[]"), value


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` keys (all optional):

    - ``listen``: ``host:port`` of the decode side's kvlink receiver (default ``127.0.0.1:0``,
      loopback; a consumer needs a fixed port for the proxy to name);
    - ``pool``: ``host:http_port:data_port`` of a ``kvlink pool serve`` daemon both servers share
      (prefix reuse across turns); ``pool_model`` is the model name the daemon serves this layout
      under (default ``vllm-<model_type>``); connected on first use, a pool that cannot be reached
      is a miss;
    - ``spec_file``: where the worker writes its spec JSON at start-up (for the daemon's ``--spec``);
    - ``begin_timeout``: seconds the decode side waits for a transfer to begin (default 30);
    - ``load_timeout``: seconds a whole load may take (default 120);
    - ``send_timeout``: seconds the prefill side waits for the receiver to verify a request (default 120).

    The shared secret comes from ``KVLINK_SECRET`` (:meth:`TransportConfig.secret_from_env`).
    Unknown keys are a :class:`ConfigError` (a typo must not silently do nothing).
    """

    listen: tuple[str, int] = ("127.0.0.1", 0)
    pool: tuple[str, int, int] | None = None
    pool_model: str | None = None
    spec_file: str | None = None
    begin_timeout: float = 30.0
    load_timeout: float = 120.0
    send_timeout: float = 120.0
    secret: bytes | None = None

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {"listen", "pool", "pool_model", "spec_file", "begin_timeout", "load_timeout", "send_timeout"}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"kv_connector_extra_config: unknown keys {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {"secret": TransportConfig.secret_from_env()}
        if "listen" in extra:
            kwargs["listen"] = parse_address(extra["listen"], "listen")
        if "pool" in extra:
            host, sep, ports = str(extra["pool"]).partition(":")
            http_port, sep2, data_port = ports.partition(":")
            try:
                kwargs["pool"] = (host, int(http_port), int(data_port))
            except ValueError:
                raise ConfigError(f"pool: expected 'host:http_port:data_port', got {extra['pool']!r}") from None
            if not (host and sep and sep2 and 0 < kwargs["pool"][1] < 65536 and 0 < kwargs["pool"][2] < 65536):
                raise ConfigError(f"pool: expected 'host:http_port:data_port', got {extra['pool']!r}")
        for key in ("pool_model", "spec_file"):
            if key in extra:
                if not isinstance(extra[key], str) or not extra[key]:
                    raise ConfigError(f"{key}: expected a non-empty string, got {extra[key]!r}")
                kwargs[key] = extra[key]
        for key in ("begin_timeout", "load_timeout", "send_timeout"):
            if key in extra:
                try:
                    value = float(extra[key])
                except (TypeError, ValueError):
                    raise ConfigError(f"{key}: expected seconds, got {extra[key]!r}") from None
                if not value > 0:
                    raise ConfigError(f"{key}: must be positive, got {value}")
                kwargs[key] = value
        return cls(**kwargs)


@dataclass
class SendJob:
    """Prefill side: push tokens ``[token_start, num_tokens)`` of a request to ``destination``."""

    req_id: str
    transfer: str
    destination: tuple[str, int]
    blocks: tuple[list[int], ...]
    num_tokens: int
    token_start: int = 0


@dataclass
class LoadJob:
    """Restore ``[0, token_start)`` from the pool (when ``token_start`` > 0), then receive
    ``[token_start, num_tokens)`` as ``transfer`` (decode side). A prefill server's pool hit has no
    transfer: ``token_start == num_tokens``."""

    req_id: str
    transfer: str | None
    blocks: tuple[list[int], ...]
    num_tokens: int
    token_start: int = 0
    tokens: list[int] = field(default_factory=list)


@dataclass
class StoreJob:
    """Keep a finished request's computed tokens (their full pool blocks) in the pool."""

    req_id: str
    blocks: tuple[list[int], ...]
    tokens: list[int]


@dataclass
class StepJobs:
    """The scheduler connector's jobs for one step (vLLM's ``KVConnectorMetadata``)."""

    sends: list[SendJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    stores: list[StoreJob] = field(default_factory=list)
