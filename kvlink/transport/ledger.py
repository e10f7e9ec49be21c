"""A receiver's memory ledger: bytes reserved in total and per peer, against the budget and each
peer's share (split from receiver.py)."""

from __future__ import annotations

import collections
import threading

from kvlink.config import TransportConfig
from kvlink.errors import TransferRejected


class Ledger:
    """Reserved bytes, in total and per peer id. Bytes are given back from reader threads too
    (a transfer freed by its last write), so every update holds one lock."""

    def __init__(self, config: TransportConfig):
        self.config = config
        self._lock = threading.Lock()
        self.reserved = 0
        self.by_peer: collections.Counter[str] = collections.Counter()  # peer id -> bytes (no entry for 0)

    def charge(self, peer: str, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``peer``; raises :class:`~kvlink.errors.TransferRejected` beyond
        its share (``peer_share_bytes``) or the budget (``receive_budget_bytes``)."""
        cfg = self.config
        with self._lock:
            if self.by_peer[peer] + nbytes > cfg.peer_share:
                raise TransferRejected(f"peer {peer} would hold more than its {cfg.peer_share}-byte share "
                                       "(peer_share_bytes); retry later")
            if self.reserved + nbytes > cfg.receive_budget_bytes:
                raise TransferRejected("receiver memory budget exhausted (receive_budget_bytes); retry later")
            self.reserved += nbytes
            self.by_peer[peer] += nbytes

    def give_back(self, peer: str, nbytes: int) -> None:
        """Return bytes ``peer`` reserved (any thread)."""
        with self._lock:
            self.reserved -= nbytes
            self.by_peer[peer] -= nbytes
            if self.by_peer[peer] <= 0:
                del self.by_peer[peer]  # no entry kept per peer that holds nothing
