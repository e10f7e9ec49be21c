"""Length-threshold routing on the incremental length (PrfaaS section 4.3).

The incremental length is the prompt minus its cached prefix. With bandwidth scarce, only the
local cluster's cache counts (a remote prefix would have to cross the link first). With
bandwidth abundant, the longest prefix cached anywhere counts, and when the cluster that holds it
is not the one chosen, the router orders a cross-cluster cache transfer of that prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from kvlink.errors import ConfigError


@dataclass(frozen=True)
class CacheTransfer:
    """Move prefix tokens ``[start, end)`` from ``source``'s pool to ``dest``'s before prefill."""

    source: str
    dest: str
    start: int
    end: int


@dataclass(frozen=True)
class Decision:
    cluster: str                      # where to prefill
    incremental: int                  # tokens to compute there
    prefix: int                       # cached tokens the prefill starts from
    transfer: CacheTransfer | None    # cross-cluster cache transfer to do first


class Router:
    """Routes a request to ``local`` or ``remote`` (the PrfaaS cluster) by its incremental length.

    ``threshold``: requests whose incremental length exceeds it go remote (the scheduler updates it).
    """

    def __init__(self, threshold: float, local: str = "local", remote: str = "remote"):
        self.threshold = threshold
        self.local, self.remote = local, remote

    def route(self, prompt_tokens: int, cached: Mapping[str, int], bandwidth_abundant: bool) -> Decision:
        """``cached``: prefix tokens each cluster's pool holds for this prompt (``PrefixHit.tokens``).
        Raises :class:`ConfigError` for a cached length beyond the prompt or an unknown cluster."""
        for name, tokens in cached.items():
            if name not in (self.local, self.remote):
                raise ConfigError(f"unknown cluster {name!r}")
            if not 0 <= tokens <= prompt_tokens:
                raise ConfigError(f"{name} caches {tokens} tokens of a {prompt_tokens}-token prompt")
        own = {name: cached.get(name, 0) for name in (self.local, self.remote)}
        if not bandwidth_abundant:
            incremental = prompt_tokens - own[self.local]
            target = self.remote if incremental > self.threshold else self.local
            # Scarce: the remote cluster starts from whatever it holds itself, no transfer.
            return Decision(target, prompt_tokens - own[target], own[target], None)
        holder = max(own, key=lambda name: (own[name], name == self.local))
        best = own[holder]
        incremental = prompt_tokens - best
        target = self.remote if incremental > self.threshold else self.local
        transfer = None
        if holder != target and best > own[target]:
            transfer = CacheTransfer(holder, target, own[target], best)
        return Decision(target, incremental, best, transfer)
