"""kvlink: move and store the KV cache (and recurrent state) of LLM inference over plain Ethernet.

Public API::

    from kvlink import get_preset, PagedCache, CacheRef, Packer, Unpacker, Payload, CodecConfig
"""

from kvlink.config import CodecConfig, OpsConfig
from kvlink.errors import KvlinkError
from kvlink.presets import PRESETS, get_preset
from kvlink.serde import CacheRef, KVLayout, Packer, PagedCache, Payload, StagingArena, Unpacker
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow

__version__ = "0.1.0"

__all__ = [
    "CacheRef", "CacheSpec", "CodecConfig", "FullAttention", "KVLayout", "KvlinkError", "LinearAttention", "MLA",
    "OpsConfig", "PRESETS", "Packer", "PagedCache", "Payload", "SlidingWindow", "StagingArena", "Unpacker",
    "get_preset", "__version__",
]
