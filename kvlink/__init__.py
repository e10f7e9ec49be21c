"""kvlink: move and store the KV cache (and recurrent state) of LLM inference over plain Ethernet.

Public API::

    from kvlink import get_preset, PagedCache, CacheRef, Packer, Unpacker, Payload, CodecConfig
    from kvlink import TransferClient, TransferServer, TransportConfig, LinkSnapshot, CodecAdvisor
"""

from kvlink.config import CodecConfig, OpsConfig, TransportConfig
from kvlink.errors import KvlinkError
from kvlink.presets import PRESETS, get_preset
from kvlink.serde import CacheRef, KVLayout, Packer, PagedCache, Payload, StagingArena, Unpacker
from kvlink.spec import MLA, CacheSpec, FullAttention, LinearAttention, SlidingWindow
from kvlink.transport import (IncomingTransfer, LinkSnapshot, OutgoingTransfer, TransferClient, TransferServer,
                              arena_allocator)
from kvlink.transport.adaptive import CodecAdvisor

__version__ = "0.1.0"

__all__ = [
    "CacheRef", "CacheSpec", "CodecAdvisor", "CodecConfig", "FullAttention", "IncomingTransfer", "KVLayout",
    "KvlinkError", "LinearAttention", "LinkSnapshot", "MLA", "OpsConfig", "OutgoingTransfer", "PRESETS", "Packer",
    "PagedCache", "Payload", "SlidingWindow", "StagingArena", "TransferClient", "TransferServer", "TransportConfig",
    "Unpacker", "arena_allocator", "get_preset", "__version__",
]
