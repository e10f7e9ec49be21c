"""The scheduler-side half of kvlink's vLLM connector: which requests load, send or store, when.

Runs in vLLM's engine-core process. It never touches a tensor: it decides per request and hands
the worker-side half (:mod:`kvlink.engine.vllm.worker`) one :class:`StepJobs` per step.

- Prefill server (``do_remote_decode``): a hybrid model's prompt loses its last token here (vLLM's
  own rule for recurrent state: the decode server computes that token on the state after N-1), and
  once the last prompt chunk is scheduled the worker streams each layer to the decode server as it
  is computed. The request's blocks stay held until the receiver verified every layer
  (``request_finished`` returns True).
- Decode server (``do_remote_prefill``): the pushed tokens load asynchronously; vLLM computes the
  prompt's last token and decodes.
- With a shared pool daemon: the decode server keeps each finished request's computed tokens in
  it; a prefill server whose prompt starts with such tokens loads them instead of recomputing and
  pushes only the rest, and the decode server takes the same prefix from the pool.
"""

from __future__ import annotations

import logging
from typing import Any

import time

from kvlink.engine.vllm.meta import ConnectorConfig, LoadJob, SendJob, StepJobs, StoreJob, parse_address
from kvlink.errors import ConfigError, KvlinkError

log = logging.getLogger("kvlink.vllm")


def _ours(params: dict | None) -> bool:
    return isinstance(params, dict) and "kvlink_transfer" in params


class SchedulerSide:
    """Per-request decisions; ``has_state`` says the model keeps recurrent state (hybrid)."""

    RECONNECT_AFTER = 5.0  # seconds between attempts to reach a pool that did not answer

    def __init__(self, config: ConnectorConfig, has_state: bool, pool_model: str | None = None):
        self.config = config
        self.backoff = 1 if has_state else 0
        self.pool_model = pool_model
        self._pool = None  # a SyncPoolClient, connected on first use
        self._pool_retry = 0.0
        self._jobs = StepJobs()
        self._sending: set[str] = set()  # prefill side: send jobs issued
        self._pool_hits: dict[str, int] = {}  # prefill side: tokens the pool restores, per request

    def _client(self):
        """The daemon's (lookup-only) client, connected once. Raises what connecting raises."""
        if self._pool is None:
            from kvlink.daemon.client import SyncPoolClient

            host, http_port, data_port = self.config.pool
            self._pool = SyncPoolClient(self.pool_model, host, http_port, data_port, secret=self.config.secret,
                                        lookup_only=True)
        return self._pool

    def connect_pool(self) -> None:
        """Connect now rather than at the first lookup (a daemon not up yet is tried again then)."""
        if self.config.pool is not None:
            try:
                self._client()
            except KvlinkError as exc:
                log.info("pool %s not reachable yet (%s); connecting at first use", self.config.pool, exc)

    def _pool_tokens(self, tokens: list[int]) -> int:
        """Tokens of ``tokens`` the pool restores, leaving at least one to compute (0 without a
        pool, or when it cannot be reached: a miss, never an error)."""
        if self.config.pool is None or time.monotonic() < self._pool_retry:
            return 0
        try:
            hit = self._client().lookup(tokens).tokens
        except KvlinkError as exc:
            log.warning("pool %s: %s; computing (retry in %.0f s)", self.config.pool, exc, self.RECONNECT_AFTER)
            self._pool_retry = time.monotonic() + self.RECONNECT_AFTER
            return 0
        return hit if hit < len(tokens) else 0

    # -- arrival -------------------------------------------------------------------------
    def on_new_request(self, request) -> None:
        """Prefill server: drop a hybrid prompt's last token (once), so the state sent is h(N-1)."""
        params = request.kv_transfer_params
        if not _ours(params) or not params.get("do_remote_decode"):
            return
        if request.prompt_token_ids is None:  # prompt embeddings: not a kvlink prefill (the decode side refuses it)
            params.pop("do_remote_decode", None)
            return
        if self.backoff and not params.get("kvlink_truncated") and request.num_prompt_tokens > self.backoff:
            del request.prompt_token_ids[-self.backoff:]
            del request._all_token_ids[-self.backoff:]
            request.num_prompt_tokens -= self.backoff
            params["kvlink_truncated"] = True
        request.max_tokens = 1

    # -- matching ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if _ours(params) and params.get("do_remote_prefill"):
            return self._decode_match(request, params, num_computed)
        if _ours(params) and params.get("do_remote_decode") and self.config.pool is not None and num_computed == 0:
            hit = self._pool_hits.get(request.request_id)
            if hit is None:  # called again for the same request: one lookup, one answer
                hit = self._pool_hits[request.request_id] = self._pool_tokens(list(request.prompt_token_ids))
            return hit, False
        return 0, False

    def _decode_match(self, request, params: dict, num_computed: int) -> tuple[int, bool]:
        try:
            end, start = int(params["kvlink_tokens"]), int(params.get("kvlink_start", 0))
        except (KeyError, TypeError, ValueError):
            log.warning("request %s: malformed kvlink params %r; computing locally", request.request_id, params)
            return 0, False
        expected = len(request.prompt_token_ids) - self.backoff
        if end != expected or not 0 <= start <= end:
            log.warning("request %s: the prefill server sent tokens [%d, %d), expected [.., %d); computing locally",
                        request.request_id, start, end, expected)
            return 0, False
        if num_computed > 0 or (start > 0 and self.config.pool is None):
            # vLLM's own prefix hit: compute the rest here rather than write pushed tokens over
            # blocks other requests share (and a payload not from token 0 needs the pool).
            return 0, False
        return (end, True) if end > 0 else (0, False)

    # -- allocation ----------------------------------------------------------------------
    def update_state_after_alloc(self, request, blocks, num_external: int) -> None:
        if num_external <= 0:
            return
        params = request.kv_transfer_params or {}
        if not _ours(params):
            return
        groups = tuple(list(g) for g in blocks.get_block_ids())
        if params.get("do_remote_prefill"):
            start = int(params.get("kvlink_start", 0))
            self._jobs.loads.append(LoadJob(request.request_id, str(params["kvlink_transfer"]), groups,
                                            int(params["kvlink_tokens"]), start,
                                            list(request.prompt_token_ids[:start])))
            # One load per request: if it fails, vLLM recomputes the request from scratch and must
            # not wait for the same transfer again (a retry would wait and fail forever).
            params["do_remote_prefill"] = False
        elif params.get("do_remote_decode") and self._pool_hits.get(request.request_id):
            hit = self._pool_hits[request.request_id]
            self._jobs.loads.append(LoadJob(request.request_id, None, groups, hit, hit,
                                            list(request.prompt_token_ids[:hit])))

    # -- per step ------------------------------------------------------------------------
    def build_meta(self, scheduler_output, requests: dict[str, Any]) -> StepJobs:
        """This step's jobs: the loads and stores decided since the last step, and a send for
        every kvlink prefill whose last prompt chunk runs in this step."""
        jobs, self._jobs = self._jobs, StepJobs()
        state = getattr(scheduler_output, "kv_connector_block_state", None)
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            params = getattr(request, "kv_transfer_params", None)
            if request is None or not _ours(params) or not params.get("do_remote_decode") or req_id in self._sending:
                continue
            if request.num_computed_tokens + n < request.num_prompt_tokens:
                continue  # not the last chunk yet
            try:
                destination = parse_address(params.get("kvlink_decode"), "kvlink_decode")
            except ConfigError as exc:
                log.warning("request %s: %s; not sending", req_id, exc)
                continue
            groups = tuple(list(g) for g in state.get_block_ids(req_id))
            start = self._pool_hits.get(req_id, 0)
            jobs.sends.append(SendJob(req_id, str(params["kvlink_transfer"]), destination, groups,
                                      request.num_prompt_tokens, start))
            params["kvlink_tokens"], params["kvlink_start"] = request.num_prompt_tokens, start
            self._sending.add(req_id)
        return jobs

    def request_finished(self, request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict | None]:
        """Prefill side: hold the blocks until the receiver verified them, and tell the decode
        server what arrives. Other requests, with a pool: hold them until their computed tokens
        are stored."""
        req_id = request.request_id
        self._pool_hits.pop(req_id, None)
        params = request.kv_transfer_params
        if req_id in self._sending:
            self._sending.discard(req_id)
            out = {"do_remote_prefill": True, "do_remote_decode": False,
                   "kvlink_transfer": params["kvlink_transfer"], "kvlink_tokens": params["kvlink_tokens"],
                   "kvlink_start": params["kvlink_start"]}
            return True, out
        if self.config.pool is not None and not (params or {}).get("do_remote_decode") and request.num_computed_tokens:
            tokens = list(request.all_token_ids[: request.num_computed_tokens])
            self._jobs.stores.append(StoreJob(req_id, tuple(list(g) for g in block_ids), tokens))
            return True, None
        return False, None
