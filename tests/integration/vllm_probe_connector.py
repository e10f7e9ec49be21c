"""A do-nothing vLLM KV connector that records what vLLM hands a connector (probe for tests).

Worker side: ``register_kv_caches`` writes ``extra_config["probe_path"]`` (JSON: per-layer tensor
shapes/strides/dtypes/offsets plus the KV-cache config). Scheduler side: every hook appends one JSON
line to ``extra_config["calls_path"]``. Loaded by vLLM via ``kv_connector_module_path``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)


class ProbeMetadata(KVConnectorMetadata):
    pass


def _plain(v: Any) -> Any:
    """JSON-friendly form of spec field values (dtypes, enums, tuples, nested dataclasses)."""
    if isinstance(v, torch.dtype):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"class": type(v).__name__,
                **{f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


def _tensor(t: torch.Tensor, base_ptr: int) -> dict:
    storage = t.untyped_storage()
    return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype),
            "device": str(t.device), "storage_offset": t.storage_offset(),
            "data_ptr_rel": t.data_ptr() - base_ptr,
            "storage_ptr_rel": storage.data_ptr() - base_ptr, "storage_nbytes": storage.nbytes()}


def _cache_config(cfg: Any) -> dict:
    if cfg is None:
        return {}
    return {
        "num_blocks": cfg.num_blocks,
        "groups": [{"layer_names": list(g.layer_names), "spec_class": type(g.kv_cache_spec).__name__,
                    "block_size": g.kv_cache_spec.block_size,
                    "page_size_bytes": getattr(g.kv_cache_spec, "page_size_bytes", None),
                    "spec": _plain(g.kv_cache_spec)} for g in cfg.kv_cache_groups],
        "tensors": [_plain(t) for t in cfg.kv_cache_tensors],
    }


def _blocks(b: Any) -> Any:
    return [list(g) for g in b] if b is not None else None


class ProbeConnector(KVConnectorBase_V1, SupportsHMA):
    """Records calls; transfers nothing."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._probe_path = extra.get("probe_path")
        self._calls_path = extra.get("calls_path")

    def _log(self, call: str, **fields: Any) -> None:
        if self._calls_path:
            with open(self._calls_path, "a") as fh:
                fh.write(json.dumps({"call": call, **fields}) + "\n")

    # ---- worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not self._probe_path:
            return
        first = next(iter(kv_caches.values()))
        first_t = first[0] if isinstance(first, (list, tuple)) else first
        base = first_t.untyped_storage().data_ptr()
        layers = {}
        for name, v in kv_caches.items():
            if isinstance(v, (list, tuple)):
                layers[name] = {"type": type(v).__name__, "items": [_tensor(t, base) for t in v]}
            else:
                layers[name] = {"type": "tensor", **_tensor(v, base)}
        out = {"layers": layers, "kv_cache_config": _cache_config(self._kv_cache_config),
               "cache_config_block_size": self._vllm_config.cache_config.block_size}
        with open(self._probe_path, "w") as fh:
            json.dump(out, fh, indent=1)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    # ---- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        self._log("get_num_new_matched_tokens", req_id=request.request_id,
                  num_tokens=request.num_tokens, num_prompt_tokens=request.num_prompt_tokens,
                  num_computed_tokens=num_computed_tokens)
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._log("update_state_after_alloc", req_id=request.request_id,
                  block_ids=_blocks(blocks.get_block_ids()), num_external_tokens=num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        so = scheduler_output
        cached = so.scheduled_cached_reqs
        self._log(
            "build_connector_meta",
            new=[{"req_id": r.req_id, "block_ids": _blocks(r.block_ids),
                  "num_computed_tokens": r.num_computed_tokens,
                  "num_prompt_tokens": len(r.prompt_token_ids or []),
                  "num_scheduled_tokens": so.num_scheduled_tokens.get(r.req_id)}
                 for r in so.scheduled_new_reqs],
            cached=[{"req_id": rid, "new_block_ids": _blocks(cached.new_block_ids[i]),
                     "num_computed_tokens": cached.num_computed_tokens[i],
                     "num_scheduled_tokens": so.num_scheduled_tokens.get(rid)}
                    for i, rid in enumerate(cached.req_ids)],
            finished=sorted(so.finished_req_ids),
        )
        return ProbeMetadata()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        self._log("request_finished", req_id=request.request_id, block_ids=list(block_ids))
        return False, None

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict | None]:
        self._log("request_finished_all_groups", req_id=request.request_id,
                  block_ids=_blocks(block_ids))
        return False, None
