"""``KvlinkConnector``: kvlink as a vLLM v1 KV connector (``KVConnectorBase_V1`` + ``SupportsHMA``).

Load it with::

    --kv-transfer-config '{"kv_connector": "KvlinkConnector",
                           "kv_connector_module_path": "kvlink.engine.vllm.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"listen": "127.0.0.1:7200", "pool": "127.0.0.1:7480:7481"}}'

A producer (prefill server) pushes each request it is asked to (``kv_transfer_params``, see
:mod:`kvlink.engine.vllm.meta`) to the named decode server; a consumer (decode server) receives
them on ``listen``. ``kvlink proxy`` routes requests that way. Scheduler-side duties live in
:mod:`~kvlink.engine.vllm.scheduler`, worker-side ones in :mod:`~kvlink.engine.vllm.worker`; this
class only dispatches. vLLM's compatibility check is kvlink's: both servers' specs (built from the
caches vLLM registers) must have one fingerprint, checked at the transport handshake.

With ``kv_load_failure_policy: "recompute"`` a load that fails (the prefill server died, a
corrupt or missing transfer) is recomputed by the decode server; with
vLLM's default ``"fail"`` the request ends with an error.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvlink.engine.vllm.layout import build_layout
from kvlink.engine.vllm.meta import ConnectorConfig, StepJobs
from kvlink.engine.vllm.scheduler import SchedulerSide
from kvlink.engine.vllm.worker import WorkerSide

log = logging.getLogger("kvlink.vllm")


def write_spec(spec, path: str) -> None:
    """The spec as JSON at ``path`` (written whole, then renamed: a reader never sees half)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(spec.to_dict(), f)
    os.replace(tmp, path)


def _log_like_vllm() -> None:
    """kvlink's log lines go where vLLM's go (its handlers sit on the ``vllm`` logger only)."""
    ours = logging.getLogger("kvlink")
    if not ours.handlers:
        for handler in logging.getLogger("vllm").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


class KvlinkMetadata(KVConnectorMetadata):
    """One step's :class:`StepJobs`, from the scheduler-side connector to the workers."""

    def __init__(self, jobs: StepJobs):
        self.jobs = jobs


class KvlinkConnector(KVConnectorBase_V1, SupportsHMA):
    """kvlink's connector. Raises :class:`~kvlink.errors.ConfigError` at construction for bad
    ``kv_connector_extra_config``, and :class:`~kvlink.errors.IncompatibleLayoutError` at
    ``register_kv_caches`` for a cache kvlink cannot carry (vLLM then does not start)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        _log_like_vllm()
        self.config = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.pool_model = self.config.pool_model or f"vllm-{vllm_config.model_config.hf_config.model_type}"
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._requests: dict[str, Any] = {}
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                log.warning("kv_load_failure_policy is %r: a failed kvlink load ends its request with an error; "
                            "set it to 'recompute' to have it recomputed", self._kv_transfer_config.kv_load_failure_policy)
            self._scheduler = SchedulerSide(self.config, kv_cache_config.has_mamba_layers, self.pool_model)
            self._scheduler.connect_pool()
            if self.config.secret is None and self._kv_transfer_config.kv_role in ("kv_producer", "kv_both"):
                log.warning("KVLINK_SECRET is not set: a client that reaches this prefill server directly can have "
                            "it push a request's cache to any address it names; set the secret on both servers")

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build the kvlink view of vLLM's caches and start the transport (a consumer listens on
        ``listen``). Raises :class:`IncompatibleLayoutError` for caches kvlink cannot carry."""
        groups = [(list(g.layer_names), g.kv_cache_spec) for g in self._kv_cache_config.transfer_groups]
        layout = build_layout(kv_caches, groups, self._vllm_config.model_config.hf_config.model_type)
        listen = self._kv_transfer_config.kv_role in ("kv_consumer", "kv_both")
        if self.config.spec_file:
            write_spec(layout.spec, self.config.spec_file)
        self._worker = WorkerSide(layout, self.config, listen, self.pool_model)
        log.info("kvlink: %s, %d layers, fingerprint %s, listening on %s", layout.spec.name, layout.spec.num_layers,
                 layout.spec.fingerprint.hex()[:16], self._worker.address)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, KvlinkMetadata):
            self._worker.bind(connector_metadata.jobs)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        """Nothing: loads start when the step's metadata is bound (before the forward)."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing: an async load is complete before vLLM schedules its request."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        """Send this layer of every request whose prompt completes in this step."""
        if self._worker is not None:
            self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        """Send the state layers, then let the transfers finish in the background."""
        if self._worker is not None:
            self._worker.finish_step()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self._worker is None:
            return KVConnectorTransferResults()
        sending, recving, failed = self._worker.transfer_results(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # ---------------------------------------------------------------- scheduler side
    def on_new_request(self, request) -> None:
        self._requests[request.request_id] = request
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KvlinkMetadata(self._scheduler.build_meta(scheduler_output, self._requests))

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        return tuple(self._kv_cache_config.transfer_group_ids)  # the request's own blocks, every group

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(self, request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return self._scheduler.request_finished(request, block_ids)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None
