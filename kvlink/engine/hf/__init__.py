"""Hugging Face transformers adapter: every cache transformers builds <-> kvlink's paged layout.

The documented flow::

    spec = spec_from_config(model.config)            # before any prefill, from the config alone
    adapter = HFCacheAdapter(spec, model.config)
    adapter.export(cache, paged, ref)                # after prefill (or export_layer from a hook)
    cache = adapter.build_cache(paged, ref)          # on the decode side; generation continues

Every tensor the cache holds is carried bit-exact, or the call raises a typed error naming it.
"""

from kvlink.engine.hf.adapter import HFCacheAdapter
from kvlink.engine.hf.spec import default_dtype, spec_from_cache, spec_from_config, trace_cache

__all__ = ["HFCacheAdapter", "default_dtype", "spec_from_cache", "spec_from_config", "trace_cache"]
