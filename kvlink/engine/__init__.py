"""Engine API: the prefill side streams a request's cache layer by layer, the decode side finds
what its pool holds and loads the rest; adapters for engines' own caches (transformers)."""

from kvlink.engine.decode import DecodeSide, LoadReport, SyncDecodeSide
from kvlink.engine.prefill import PrefillSide, SendReport, SyncPrefillSide, transfer_id_for

__all__ = ["DecodeSide", "LoadReport", "PrefillSide", "SendReport", "SyncDecodeSide", "SyncPrefillSide",
           "transfer_id_for"]
