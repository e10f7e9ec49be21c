"""Serializers: engine-native paged caches <-> self-describing, checksummed payloads."""

from kvlink.serde.layout import SegmentLayout, layer_segments, payload_segments
from kvlink.serde.pack import Packer
from kvlink.serde.paged import CacheRef, KVLayout, PagedCache
from kvlink.serde.payload import Payload
from kvlink.serde.staging import StagingArena, StagingLease
from kvlink.serde.unpack import Unpacker, check_compatible

__all__ = ["CacheRef", "KVLayout", "Packer", "PagedCache", "Payload", "SegmentLayout",
           "StagingArena", "StagingLease", "Unpacker", "check_compatible", "layer_segments", "payload_segments"]
