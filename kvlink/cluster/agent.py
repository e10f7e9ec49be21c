"""A node of ``kvlink cluster up``: stands in for an engine instance on one host, next to its pool daemon.

``python -m kvlink.cluster.agent '<json settings>'`` reads one JSON command per line on stdin and
answers one JSON line on stdout. It moves real bytes through kvlink (the cluster pool client, the
daemons, the transport); only the model's compute is replaced by synthetic entries
(:mod:`kvlink.cluster.replay`), whose bytes it checks on every fetch.

Commands:

- ``{"op": "prefill", "hash_ids", "length", "use_pool", "ship_to": [host, http, data] | null,
  "ship_from": tokens}``: restore the longest prefix the node's cluster holds (when ``use_pool``),
  "compute" the rest, store it in the local daemon, and when ``ship_to`` is set put the blocks from
  ``ship_from`` on (plus the final state) into that decode node's daemon.
- ``{"op": "copy", "hash_ids", "length", "from_cluster", "end"}``: fetch the first ``end`` tokens
  from daemons of another cluster and store them in the local daemon (a cross-cluster transfer).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from kvlink.config import ClusterConfig, TransportConfig
from kvlink.errors import KvlinkError
from kvlink.pool.index import FULL, STATE, PrefixHit

from kvlink.cluster.client import ClusterPoolClient, hit_pieces
from kvlink.cluster.index import ClusterHit
from kvlink.cluster.replay import entry_bytes, entry_matches, entry_sizes, tokens_for


class Agent:
    def __init__(self, settings: dict):
        from kvlink.daemon.client import PoolClient
        from kvlink.presets import get_preset

        self.s = settings
        self.spec = get_preset(settings["model"])
        self.secret = settings["secret"].encode()
        self.tenant = settings["tenant"]
        self.block = settings["block_size"]
        self.transport = TransportConfig(connections=settings.get("connections", 2))
        self.sizes = entry_sizes(self.spec, self.block, settings["size_scale"])
        self.cluster = ClusterConfig(**settings["cluster"])
        self.PoolClient = PoolClient
        host, http, data = settings["daemon"]
        self.local = self._client(host, http, data)
        self.pool = ClusterPoolClient(settings["model"], self.cluster, local=self.local, secret=self.secret,
                                      tenant=self.tenant, transport=self.transport, timeout=120,
                                      block_size=self.block, checkpoint_every=None,
                                      reply_arena=settings["arena"])
        self.remote: dict[tuple, object] = {}

    def _client(self, host, http, data):
        return self.PoolClient(self.s["model"], host, http, data, secret=self.secret, tenant=self.tenant,
                               transport=self.transport, timeout=120, reply_arena=self.s["arena"])

    async def start(self) -> None:
        await self.pool.connect()

    async def close(self) -> None:
        for c in self.remote.values():
            await c.close()
        await self.pool.close()

    def _pieces(self, keys: list[bytes], first: int, last: int, state: bool) -> dict:
        out = {}
        if self.sizes[FULL]:
            for b in range(first, last):
                out[(FULL, b)] = entry_bytes(FULL, keys[b], self.sizes[FULL])
        if state and self.sizes[STATE] and last:
            out[(STATE, last - 1)] = entry_bytes(STATE, keys[last - 1], self.sizes[STATE])
        return out

    async def _restore(self, hit: PrefixHit) -> tuple[int, int, bool]:
        """Fetch ``hit`` (bytes, holders, all bytes as expected)."""
        fetched = await self.pool.get(hit)
        with fetched:
            ok = all(entry_matches(kind, key, buf) for (kind, key), buf in fetched.items())
            holders = len(hit.plan) if isinstance(hit, ClusterHit) else 1  # a local-daemon fallback hit
            return sum(len(b) for b in fetched.values()), holders, ok

    async def prefill(self, cmd: dict) -> dict:
        t0 = time.perf_counter()
        tokens = tokens_for(cmd["hash_ids"], cmd["length"])
        keys = self.pool.layout.hashes(tokens)
        n = len(keys)
        out = {"blocks": n, "hit_tokens": 0, "fetched_bytes": 0, "holders": 0, "verified": True}
        start = 0
        if cmd["use_pool"] and n:
            hit = await self.pool.lookup(tokens)
            for attempt in range(2):  # a record gone stale since the lookup costs one more lookup
                try:
                    if hit.tokens:
                        out["fetched_bytes"], out["holders"], out["verified"] = await self._restore(hit)
                    break
                except KvlinkError as exc:
                    out["fetch_error"] = f"{type(exc).__name__}: {exc}"
                    hit = await self.pool.lookup(tokens) if attempt == 0 else PrefixHit(0, (), (), None, 0, "")
            start = hit.tokens // self.block
            out["hit_tokens"] = hit.tokens
        t1 = time.perf_counter()
        prompt = tokens[: n * self.block]
        if n and cmd["use_pool"]:
            report = await self.pool.put(prompt, self._pieces(keys, start, n, True))
            out["stored"] = report.stored
        shipped = 0
        if cmd.get("ship_to") and n:
            host, http, data = cmd["ship_to"]
            dest = self.remote.get((host, data))
            if dest is None:
                dest = self.remote[(host, data)] = await self._client(host, http, data).connect()
            pieces = self._pieces(keys, cmd.get("ship_from", 0) // self.block, n, True)
            report = await dest.put(prompt, pieces)
            shipped = sum(p.nbytes for p in pieces.values())
            out["ship_stored"] = report.stored
        out.update(shipped_bytes=shipped, computed_tokens=cmd["length"] - start * self.block,
                   restore_ms=(t1 - t0) * 1e3, total_ms=(time.perf_counter() - t0) * 1e3)
        return out

    async def copy(self, cmd: dict) -> dict:
        tokens = tokens_for(cmd["hash_ids"], cmd["length"])
        hits = await self.pool.lookup_clusters(tokens[: cmd["end"]])
        hit = hits.get(cmd["from_cluster"])
        if hit is None or not hit.tokens:
            return {"copied_bytes": 0}
        fetched = await self.pool.get(hit)
        with fetched:  # put straight from the landed views, before they are released
            ok = all(entry_matches(kind, key, buf) for (kind, key), buf in fetched.items())
            pieces = hit_pieces(hit, fetched, self.block)
            await self.pool.put(tokens[: hit.tokens], pieces)
            copied = sum(len(p) for p in pieces.values())
        return {"copied_bytes": copied, "verified": ok, "copied_tokens": hit.tokens}


async def _main(settings: dict) -> None:
    agent = Agent(settings)
    await agent.start()
    print(json.dumps({"event": "ready"}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            try:
                reply = await getattr(agent, cmd["op"])(cmd)
                reply["ok"] = True
            except KvlinkError as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            reply["id"] = cmd.get("id")
            print(json.dumps(reply), flush=True)
    finally:
        await agent.close()


if __name__ == "__main__":
    asyncio.run(_main(json.loads(sys.argv[1])))
