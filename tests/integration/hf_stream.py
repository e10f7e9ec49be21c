"""Prefill streamed from a transformers model: forward hooks export each decoder layer into the
prefill side's paged cache and save it (pack and queue it on the transport) as soon as it is done."""

from __future__ import annotations

import asyncio

import torch

from kvlink.engine import PrefillSide
from kvlink.engine.hf.layers import decoder_layers


async def stream_prefill(model, adapter, cache, prompt, src, src_ref, address, request_id, layers):
    """Run ``model`` on ``prompt`` (filling ``cache``) in a worker thread, sending ``layers`` to
    ``address`` as their hooks fire; ``(logits, the prefill side's report)``."""
    prefill = PrefillSide(src)
    await prefill.begin(request_id, src_ref, address, layers=layers)

    def hook(i):
        def on_layer_done(module, args, output):
            adapter.export_layer(cache, i, src, src_ref)
            if i in layers:
                prefill.save_layer(request_id, i)
        return on_layer_done

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            logits = await asyncio.to_thread(lambda: model(prompt, cache=cache, use_cache=True).logits)
    finally:
        for h in handles:
            h.remove()
    report = await prefill.finish(request_id, timeout=60)
    await prefill.close()
    return logits, report
