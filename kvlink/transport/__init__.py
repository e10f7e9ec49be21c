"""Chunked, paced, resumable KV-cache transfer over TCP. See docs/transport.md.

- :class:`TransferClient` (sender): N connections to one receiver; :meth:`~TransferClient.open`
  a transfer, feed its parts as they are produced, ``await transfer.done()``.
- :class:`TransferServer` (receiver): authenticates peers, lands chunks in place,
  ``await incoming.part(i)`` per part.
- :class:`RateController` / :class:`LinkSnapshot`: congestion-aware pacing and what it knows.
"""

from kvlink.transport.congestion import LinkSnapshot, RateController
from kvlink.transport.incoming import IncomingTransfer
from kvlink.transport.parts import arena_allocator, default_allocator
from kvlink.transport.loop import run
from kvlink.transport.outgoing import OutgoingTransfer
from kvlink.transport.receiver import TransferServer
from kvlink.transport.sender import TransferClient

__all__ = ["IncomingTransfer", "LinkSnapshot", "OutgoingTransfer", "RateController", "TransferClient",
           "TransferServer", "arena_allocator", "default_allocator", "run"]
