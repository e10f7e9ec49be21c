"""Hugging Face transformers adapter: a model's ``past_key_values`` <-> kvlink's paged layout.

Works with transformers' ``DynamicCache(config=...)`` (5.x), whose ``layers[i]`` follow
``config.layer_types``:

- attention layers hold ``keys``/``values`` ``[batch, kv_heads, tokens, head_dim]``; sliding
  layers keep their last ``sliding_window - 1`` tokens plus a ``cumulative_length``;
- MLA layers (Kimi Linear) keep the latent in ``keys`` and the rotary key in ``values``
  (``[batch, 1, tokens, kv_lora_rank]`` / ``[..., rope_dim]``); kvlink stores them side by side;
- linear-attention layers hold ``conv_states[0]`` ``[batch, channels, kernel]`` and
  ``recurrent_states[0]``, each in its own dtype (the recurrent state is fp32 here).

Batch size 1 (one request per cache), as engines hand requests to kvlink one by one.
"""

from __future__ import annotations

import torch

from kvlink.errors import IncompatibleLayoutError, SpecError
from kvlink.serde.layout import TORCH_DTYPES
from kvlink.serde.paged import CacheRef, PagedCache
from kvlink.serde.tokens import copy_tokens
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def _layer_types(config) -> tuple[object, list[str], list[dict]]:
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text)
    return text, list(types), list(kwargs)


def spec_from_config(config, dtype: torch.dtype = torch.float32, name: str | None = None) -> CacheSpec:
    """The cache layout of a transformers model, from its config alone.

    Attention layers: GQA from ``num_key_value_heads``/``head_dim``, MLA when the config has a
    ``kv_lora_rank``, sliding windows of ``sliding_window - 1`` tokens (what the cache keeps).
    Linear layers: Qwen3-Next's Gated DeltaNet and Kimi Linear's KDA (others: use
    :func:`spec_from_cache`). ``dtype`` is the model's dtype; recurrent states are fp32.
    Raises :class:`SpecError` for a layer type it does not know.
    """
    text, types, kwargs = _layer_types(config)
    dname = _DTYPE_NAMES[dtype]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = []
    for i, (kind, kw) in enumerate(zip(types, kwargs)):
        if kind in ATTENTION_TYPES:
            if getattr(text, "kv_lora_rank", None):
                layers.append(MLA(text.kv_lora_rank, text.qk_rope_head_dim, dname))
            elif kind == "full_attention":
                layers.append(FullAttention(kv_heads, head_dim, dtype=dname))
            else:
                layers.append(SlidingWindow(kv_heads, head_dim, dtype=dname, window=kw["sliding_window"] - 1))
        elif kind == "linear_attention":
            layers.append(_linear_layer(text, dname))
        else:
            raise SpecError(f"layer {i}: transformers layer type {kind!r} is not supported; try spec_from_cache")
    return CacheSpec(name or f"hf:{text.model_type}", tuple(layers))


def _linear_layer(text, dname: str) -> LinearAttention:
    kernel = text.linear_conv_kernel_dim
    if text.model_type == "qwen3_next":
        hk, hv = text.linear_num_key_heads, text.linear_num_value_heads
        dk, dv = text.linear_key_head_dim, text.linear_value_head_dim
        return LinearAttention((hv, dk, dv), "float32", (2 * hk * dk + hv * dv, kernel), dname, "gated_deltanet")
    if text.model_type == "kimi_linear":
        h, d = text.linear_num_heads, text.linear_head_dim
        return LinearAttention((h, d, d), "float32", (3 * h * d, kernel), dname, "kda")
    raise SpecError(f"linear layers of {text.model_type!r} are not described here; use spec_from_cache")


def spec_from_cache(cache, name: str, variant: str = "linear") -> CacheSpec:
    """The layout of a filled ``DynamicCache`` (any family transformers runs), read off its tensors.

    MLA layers cannot be told from GQA ones by their tensors: use :func:`spec_from_config` there."""
    layers = []
    for i, layer in enumerate(cache.layers):
        if _is_linear(layer):
            conv, rec = _states(layer, i)
            layers.append(LinearAttention(tuple(rec.shape[1:]), _DTYPE_NAMES[rec.dtype], tuple(conv.shape[1:]),
                                          _DTYPE_NAMES[conv.dtype], variant))
        elif getattr(layer, "keys", None) is None:
            raise SpecError(f"layer {i}: empty cache layer ({type(layer).__name__})")
        else:
            k, v = layer.keys, layer.values
            dname = _DTYPE_NAMES[k.dtype]
            vdim = None if v.shape[3] == k.shape[3] else v.shape[3]
            if getattr(layer, "is_sliding", False):
                layers.append(SlidingWindow(k.shape[1], k.shape[3], vdim, dname, window=layer.sliding_window - 1))
            else:
                layers.append(FullAttention(k.shape[1], k.shape[3], vdim, dname))
    return CacheSpec(name, tuple(layers))


def _is_linear(layer) -> bool:
    return hasattr(layer, "recurrent_states") and hasattr(layer, "conv_states")


def _states(layer, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(layer, "number_of_states", 1) != 1:
        raise IncompatibleLayoutError(f"layer {i}: {layer.number_of_states} states per layer are not supported")
    conv, rec = layer.conv_states.get(0), layer.recurrent_states.get(0)
    if conv is None or rec is None:
        raise IncompatibleLayoutError(f"layer {i}: linear-attention state not initialised (no prefill yet?)")
    return conv, rec


class HFCacheAdapter:
    """Copies layers between a transformers ``DynamicCache`` and a :class:`PagedCache` of ``spec``.

    ``export_layer`` is cheap enough to call from a forward hook as each layer finishes, which is
    how the prefill side streams layer by layer.
    """

    def __init__(self, spec: CacheSpec, config):
        self.spec = spec
        self.config = config
        _, types, _ = _layer_types(config)
        if len(types) != spec.num_layers:
            raise IncompatibleLayoutError(f"config has {len(types)} layers, spec {spec.num_layers}")

    def export_layer(self, cache, layer: int, paged: PagedCache, ref: CacheRef) -> None:
        """Write tokens [ref.token_start, ref.num_tokens) of ``layer`` (or its state) into ``paged``.

        Raises :class:`IncompatibleLayoutError` when the cache does not hold what the spec says.
        """
        spec_layer = self.spec.layers[layer]
        hf = cache.layers[layer]
        if spec_layer.kind == "linear":
            conv, rec = _states(hf, layer)
            slot = ref.slot(paged)
            for kind, pool in paged.states(layer):
                src = conv if kind.name == "CONV" else rec
                _check(src.shape[1:], src.dtype, tuple(pool.shape[1:]), pool.dtype, layer, kind.name.lower())
                pool[slot].copy_(src[0])
            return
        rows = self._token_rows(hf, layer, spec_layer, ref.num_tokens)
        base = ref.num_tokens - rows[0].shape[0]  # the first token the layer holds (sliding: > 0)
        start = max(ref.token_start, base)
        ids, ids_host = ref.block_ids_checked(paged)
        for (kind, plane), src in zip(paged.planes(layer), rows):
            part = src[start - base:].contiguous()  # rows are contiguous already: a view
            copy_tokens(plane, ids, ids_host, start, ref.num_tokens, paged.block_size, part, False)

    def _token_rows(self, hf, layer: int, spec_layer, num_tokens: int) -> list[torch.Tensor]:
        """Per-token rows ``[tokens, elems]`` the layer holds (its last tokens for sliding layers)."""
        k, v = hf.keys, hf.values
        if k is None or k.shape[0] != 1:
            raise IncompatibleLayoutError(f"layer {layer}: expected one request's cache (batch 1)")
        held = k.shape[2]
        expect = min(num_tokens, spec_layer.window) if spec_layer.kind == "sliding" else num_tokens
        if held != expect:
            raise IncompatibleLayoutError(f"layer {layer}: cache holds {held} tokens, expected {expect}")
        if spec_layer.kind == "mla":
            latent = torch.cat([k[0, 0], v[0, 0]], dim=-1)
            _check(latent.shape[1:], latent.dtype, (spec_layer.latent_dim,), TORCH_DTYPES[spec_layer.dtype], layer, "latent")
            return [latent]
        out = []
        for t, d, name in ((k, spec_layer.head_dim, "k"), (v, spec_layer.v_dim, "v")):
            rows = t[0].transpose(0, 1)  # [tokens, heads, dim]
            _check(rows.shape[1:], rows.dtype, (spec_layer.kv_heads, d), TORCH_DTYPES[spec_layer.dtype], layer, name)
            out.append(rows.reshape(held, -1))
        return out

    def build_cache(self, paged: PagedCache, ref: CacheRef):
        """A new ``DynamicCache(config=...)`` holding tokens [0, ref.num_tokens) and the slot's state.

        Linear layers get ``has_previous_state`` and sliding layers their ``cumulative_length``,
        so the model continues where the prefill stopped instead of re-prefilling.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        n = ref.num_tokens
        ids, ids_host = ref.block_ids_checked(paged)
        for i, spec_layer in enumerate(self.spec.layers):
            hf = cache.layers[i]
            if spec_layer.kind == "linear":
                slot = ref.slot(paged)
                pools = {kind.name: pool for kind, pool in paged.states(i)}
                conv, rec = pools["CONV"][slot][None].clone(), pools["RECURRENT"][slot][None].clone()
                hf.lazy_initialization(conv_states=conv, recurrent_states=rec)
                hf.conv_states[0].copy_(conv)
                hf.recurrent_states[0].copy_(rec)
                hf.has_previous_state[0] = True
                continue
            start = max(0, n - spec_layer.window) if spec_layer.kind == "sliding" else 0
            rows = []
            for kind, plane in paged.planes(i):
                elems = plane.shape[1] // paged.block_size
                out = torch.empty(n - start, elems, dtype=plane.dtype, device=plane.device)
                copy_tokens(plane, ids, ids_host, start, n, paged.block_size, out, True)
                rows.append(out)
            if spec_layer.kind == "mla":
                latent = rows[0]
                k = latent[:, : spec_layer.kv_lora_rank][None, None].contiguous()
                v = latent[:, spec_layer.kv_lora_rank:][None, None].contiguous()
            else:
                k = rows[0].view(n - start, spec_layer.kv_heads, spec_layer.head_dim).transpose(0, 1)[None].contiguous()
                v = rows[1].view(n - start, spec_layer.kv_heads, spec_layer.v_dim).transpose(0, 1)[None].contiguous()
            hf.lazy_initialization(k, v)
            hf.keys, hf.values = k, v
            if spec_layer.kind == "sliding":
                hf.cumulative_length = n
        return cache


def _check(got_shape, got_dtype: torch.dtype, shape: tuple, dtype: torch.dtype, layer: int, what: str) -> None:
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype:
        raise IncompatibleLayoutError(f"layer {layer} {what}: cache has {tuple(got_shape)} {got_dtype}, "
                                      f"spec expects {tuple(shape)} {dtype}")
