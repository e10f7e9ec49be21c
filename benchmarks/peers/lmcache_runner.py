"""LMCache 0.5.6 side of benchmarks/peers.py: runs inside .peers/lmcache/bin/python (never imports kvlink).

LMCache's own engine (``LMCacheEngine.store`` / ``retrieve``, its chunked token database, its
storage manager with the LocalCPUBackend or the LocalDiskBackend) on a CPU KV cache in vLLM's
paged layout (per layer ``[2, num_blocks, block_size, kv_heads, head_dim]``). LMCache ships only
device connectors, so :class:`CpuPagedConnector` is ours: it gathers a chunk's blocks into the
memory object (LMCache's ``KV_2LTD`` format, ``[2, layers, tokens, heads * head_dim]``) with one
``index_select`` per layer and K/V, and scatters them back with numpy's row assignment (torch's
``index_copy_`` is ~7x slower on CPU), at block granularity when the slots are whole blocks
(they are here): the fastest CPU copies we found for LMCache's side, one copy each way.

Protocol: one JSON object per line on stdin (a command), one JSON line per reply on stdout
(``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``). LMCache's logs go to stderr.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage reports (and no network here)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch  # noqa: E402

from runner_io import serve  # noqa: E402  (before LMCache: what it prints stays off the reply channel)


from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.gpu_connector import GPUConnectorInterface  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402


class CpuPagedConnector(GPUConnectorInterface):
    """LMCache's connector interface over CPU tensors (kwargs ``kvcaches``, ``slot_mapping``)."""

    def __init__(self, num_layers: int, heads: int, head_dim: int, block_size: int):
        self.num_layers, self.hidden, self.block_size = num_layers, heads * head_dim, block_size
        self.kvcaches = None

    def _blocks(self, slots: torch.Tensor):
        """Block ids when ``slots`` are whole blocks in order, else None (token rows then)."""
        bs = self.block_size
        if slots.numel() % bs:
            return None
        rows = slots.view(-1, bs)
        first = rows[:, 0]
        if bool((first % bs).any()) or not torch.equal(rows - first[:, None], torch.arange(bs).expand_as(rows)):
            return None
        return first // bs

    def _planes(self, kvcaches, layer: int, kv: int, blocks: bool) -> torch.Tensor:
        t = kvcaches[layer][kv]  # [num_blocks, block_size, heads, head_dim]
        return t.view(t.shape[0], -1) if blocks else t.view(-1, self.hidden)

    def from_gpu(self, memory_obj, start: int, end: int, **kwargs):
        self.batched_from_gpu([memory_obj], [start], [end], **kwargs)

    def to_gpu(self, memory_obj, start: int, end: int, **kwargs):
        self.batched_to_gpu([memory_obj], [start], [end], **kwargs)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        kvcaches, slots = kwargs["kvcaches"], kwargs["slot_mapping"]
        for obj, start, end in zip(memory_objs, starts, ends):
            idx = slots[start:end]
            blocks = self._blocks(idx)
            dst = obj.tensor  # [2, L, T, hidden]
            for layer in range(self.num_layers):
                for kv in range(2):
                    if blocks is not None:
                        torch.index_select(self._planes(kvcaches, layer, kv, True), 0, blocks,
                                           out=dst[kv, layer].view(blocks.numel(), -1))
                    else:
                        torch.index_select(self._planes(kvcaches, layer, kv, False), 0, idx, out=dst[kv, layer])

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        kvcaches, slots = kwargs["kvcaches"], kwargs["slot_mapping"]
        for obj, start, end in zip(memory_objs, starts, ends):
            idx = slots[start:end]
            blocks = self._blocks(idx)
            rows = (blocks if blocks is not None else idx).numpy()
            src = obj.tensor
            for layer in range(self.num_layers):
                for kv in range(2):
                    # numpy's row scatter: one memcpy per row, ~7x torch's index_copy_ on CPU
                    dst = self._planes(kvcaches, layer, kv, blocks is not None).view(torch.uint8).numpy()
                    dst[rows] = src[kv, layer].reshape(len(rows), -1).view(torch.uint8).numpy()

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.num_layers, num_tokens, self.hidden])


def _fill(plane: torch.Tensor, seed: int) -> None:
    """The values kvlink's side holds (kvlink.bench.serde.realistic_kv over block rows, same torch
    and seeds): unit normals with a few outlier channels, bf16. The parent compares digests."""
    rows = plane.view(plane.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows.shape[0], rows.shape[1], generator=g)
    outliers = torch.randperm(rows.shape[1], generator=g)[: max(1, rows.shape[1] // 64)]
    x[:, outliers] *= 20.0
    rows.copy_(x.to(torch.bfloat16))


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.contiguous().view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


class Side:
    """One LMCache engine (CPU or disk backend) and the source and destination paged caches."""

    def __init__(self, a: dict):
        self.a = a
        torch.set_num_threads(a.get("threads", 1))
        L, H, D, bs = a["layers"], a["heads"], a["head_dim"], a["block_size"]
        self.tokens_n = a["tokens"]
        nblocks = self.tokens_n // bs
        self.src = [torch.empty(2, nblocks, bs, H, D, dtype=torch.bfloat16) for _ in range(L)]
        for i, t in enumerate(self.src):
            for kv in range(2):
                _fill(t[kv], i)
        self.dst = [torch.zeros_like(t) for t in self.src]
        # Block i of the request lives in block perm[i]: a paged cache is not in token order.
        perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(7))
        self.slots = (perm[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
        self.bytes = sum(t.numel() * t.element_size() for t in self.src)
        self.engine = None
        self.generation = 0

    def open(self) -> None:
        a = self.a
        disk = a.get("disk_dir")
        # The CPU pool holds the request (CPU backend), or the chunks on their way to and from
        # disk (disk backend: a store allocates every chunk before the writes drain).
        cpu_gib = self.bytes * 1.25 / 2**30
        kw = dict(chunk_size=a["chunk"], local_cpu=not disk, max_local_cpu_size=max(cpu_gib, 0.25),
                  save_unfull_chunk=False)
        if disk:
            kw.update(local_disk=f"file://{disk}/", max_local_disk_size=self.bytes * 2.5 / 2**30)
        config = LMCacheEngineConfig.from_defaults(**kw)
        meta = LMCacheMetadata(model_name=a["model"], world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16,
                               kv_shape=(a["layers"], 2, a["chunk"], a["heads"], a["head_dim"]), chunk_size=a["chunk"])
        conn = CpuPagedConnector(a["layers"], a["heads"], a["head_dim"], a["block_size"])
        self.instance = f"peers-{os.getpid()}"
        self.engine = LMCacheEngineBuilder.get_or_create(self.instance, config, meta, conn, None, None)
        self.engine.post_init()
        self.disk = disk
        self._fault_in()

    def _fault_in(self) -> None:
        """Touch every page of LMCache's CPU buffer once: in an engine it is pinned (so resident)
        from the start, and first-touch page faults (0.1-0.5 s a round here, until the allocator
        has cycled through its buffer) are not what a store costs in steady state."""
        backend = self.engine.storage_manager.allocator_backend
        buffer = getattr(getattr(backend, "memory_allocator", None), "buffer", None)
        if not isinstance(buffer, torch.Tensor):
            raise RuntimeError(f"cannot find LMCache's CPU buffer behind {type(backend).__name__}")
        buffer.zero_()

    def tokens(self) -> torch.Tensor:
        # A new prompt per round: nothing of an earlier round is a hit.
        g = self.generation
        return (torch.arange(self.tokens_n, dtype=torch.long) * 31 + g * 100003) % 150000

    def store(self) -> dict:
        self.generation += 1
        tokens = self.tokens()
        t0 = time.perf_counter()
        self.engine.store(tokens, kvcaches=self.src, slot_mapping=self.slots)
        stored = time.perf_counter() - t0
        out = {"store_s": stored}
        if self.disk:
            # The disk backend writes in background threads: wait until every chunk is on disk
            # (its index has the key); then, for scale, until each of its files is fsynced.
            want = self.tokens_n // self.a["chunk"]
            deadline = time.monotonic() + 300
            backend = self._disk_backend()
            while len(backend.dict) < want:  # clear() empties it after every round
                if time.monotonic() > deadline:
                    raise TimeoutError("LMCache disk writes did not finish within 300 s")
                time.sleep(0.0005)  # polls a condition with a deadline
            out["written_s"] = time.perf_counter() - t0
            for path in glob.glob(os.path.join(self.disk, "**", "*"), recursive=True):
                if os.path.isfile(path):  # LMCache never syncs: its own files, fsynced one by one
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            out["synced_s"] = time.perf_counter() - t0
        return out

    def _disk_backend(self):
        sm = self.engine.storage_manager
        for name, backend in sm.storage_backends.items():
            if "Disk" in type(backend).__name__:
                return backend
        raise RuntimeError(f"no disk backend among {list(sm.storage_backends)}")

    def retrieve(self) -> dict:
        for t in self.dst:
            t.zero_()
        tokens = self.tokens()
        t0 = time.perf_counter()
        got = self.engine.retrieve(tokens, kvcaches=self.dst, slot_mapping=self.slots)
        seconds = time.perf_counter() - t0
        hit = int(got.sum())
        # Outside the clock: the destination blocks must hold exactly the source bytes.
        ok = hit == self.tokens_n and all(torch.equal(a, b) for a, b in zip(self.src, self.dst))
        return {"retrieve_s": seconds, "hit_tokens": hit, "equal": ok}

    def clear(self) -> None:
        self.engine.clear()
        if self.disk:
            for path in glob.glob(os.path.join(self.disk, "**", "*"), recursive=True):
                if os.path.isfile(path):
                    os.unlink(path)
            backend = self._disk_backend()
            with backend.disk_lock:
                backend.dict.clear()
                backend.current_cache_size = 0

    def close(self) -> None:
        if self.engine is not None:
            LMCacheEngineBuilder.destroy(self.instance)


def main() -> int:
    side = None

    def handle(cmd: dict) -> dict | None:
        nonlocal side
        op = cmd["op"]
        if op == "open":
            side = Side(cmd)
            side.open()
            import lmcache
            return dict(bytes=side.bytes, version=getattr(lmcache, "__version__", "?"),
                        torch_threads=torch.get_num_threads(),
                        digests=[digest(t[kv]) for t in side.src for kv in range(2)])
        if op in ("store", "retrieve"):
            return getattr(side, op)()
        if op == "clear":
            side.clear()
            return {}
        if op == "quit":
            if side is not None:
                side.close()
            return {}
        return None

    return serve(handle)


if __name__ == "__main__":
    sys.exit(main())
