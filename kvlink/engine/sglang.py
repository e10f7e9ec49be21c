"""SGLang HiCache storage (L3) backend over a kvlink pool: ``KvlinkHiCacheStorage``.

Plugs into SGLang 0.5.23 with ``--hicache-storage-backend dynamic`` and
``--hicache-storage-backend-extra-config '{"backend_name": "kvlink", "module_path":
"kvlink.engine.sglang", "class_name": "KvlinkHiCacheStorage", "model": "<kvlink preset>", ...}'``
(keys in docs/engine.md). Importing this module imports SGLang; ``import kvlink`` never does.

Each SGLang page key becomes one kvlink pool entry: the page's bytes (as the host pool's
``get_data_page`` gives them) wrapped in a one-segment kvlink payload, so its xxh3 checksum is
verified on every get (a page that fails, or is gone, is reported as a miss, never as wrong bytes).
The pool is keyed by chained token-block hashes, and SGLang gives only page hashes, so a page key
(with its rank's shard) is turned into one synthetic block of token ids; its pool key is that
block's hash. KV pages go in as ``full`` entries, the mamba pool's state as a ``state``
checkpoint of that block, the swa pool's window as a ``sliding`` entry: the pool's own hybrid
rule (state only at a checkpoint) then answers SGLang's TRAILING_PAGES hit policy.

SGLang expects bools and counts from its storage calls: kvlink errors there are logged and
reported as misses / failed writes. Construction raises :class:`~kvlink.errors.ConfigError` (bad
config) or the daemon client's typed errors (cannot connect, credential refused).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any
from urllib.parse import urlsplit

import torch
from sglang.srt.mem_cache.hicache_storage import (HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo,
                                                  PoolHitPolicy, PoolName, PoolTransfer, PoolTransferResult)

from kvlink.codec import Codec
from kvlink.codec.checksum import checksum
from kvlink.config import PoolConfig
from kvlink.errors import ConfigError, KvlinkError
from kvlink.pool.index import FULL, SLIDING, STATE, PrefixHit, block_hashes, prefix_root
from kvlink.presets import get_preset
from kvlink.serde.payload import Payload
from kvlink.serde.wire import PayloadHeader, SegmentHeader

log = logging.getLogger(__name__)

# SGLang pool -> (kvlink entry kind, payload layer code). Other pools are not stored (always a miss).
POOLS = {PoolName.KV.value: (FULL, 0), PoolName.MAMBA.value: (STATE, 1), PoolName.SWA.value: (SLIDING, 2)}
MIN_BLOCK_TOKENS = 4  # a synthetic block carries >= 128 bits of the page key's digest


class _LocalStore:
    """An in-process :class:`~kvlink.pool.Pool`."""

    def __init__(self, model: str, cfg: dict):
        from kvlink.pool import Pool

        fields = {k: cfg[k] for k in ("block_size", "host_bytes", "page_bytes", "ssd_bytes", "namespace",
                                      "write_mode", "verify_memory") if k in cfg}
        fields.setdefault("block_size", 16)
        fields.setdefault("checkpoint_every", None)
        try:
            config = PoolConfig(ssd_dir=cfg.get("pool_dir"), **fields)
        except TypeError as exc:
            raise ConfigError(f"kvlink pool settings: {exc}") from None
        self.spec = get_preset(model)
        self.pool = Pool(self.spec, config)
        self.block_size, self.namespace = config.block_size, config.namespace

    def lookup(self, tokens: list[int]) -> PrefixHit:
        return self.pool.lookup(tokens)

    def put(self, tokens: list[int], kind: str, buffers: list) -> bool:
        report = self.pool.store(tokens, {(kind, 0): buffers})
        if report.failed:
            log.warning("kvlink pool refused a page: %s", "; ".join(report.errors))
        return not report.failed

    def get(self, kind: str, key: bytes) -> bytes | None:
        found, release = self.pool.pin_views([(kind, key)])
        try:
            return None if found[0] is None else b"".join(bytes(v) for v in found[0])
        finally:
            release()

    def close(self) -> None:
        self.pool.close()


class _DaemonStore:
    """A ``kvlink pool serve`` daemon, through :class:`~kvlink.daemon.client.SyncPoolClient`."""

    def __init__(self, model: str, cfg: dict):
        from kvlink.daemon.auth import DEFAULT_TENANT
        from kvlink.daemon.client import SyncPoolClient

        url = urlsplit(cfg["pool_url"])
        if url.scheme != "http" or not url.hostname or not url.port:
            raise ConfigError(f"pool_url must be http://HOST:PORT, got {cfg['pool_url']!r}")
        secret = cfg.get("secret")
        tenant = cfg.get("tenant", DEFAULT_TENANT)
        self.client = SyncPoolClient(model, host=url.hostname, http_port=url.port,
                                     data_port=int(cfg.get("data_port", url.port + 1)),
                                     secret=secret.encode() if secret else None, tenant=tenant,
                                     timeout=float(cfg.get("timeout", 30.0)))
        self.spec = get_preset(model)
        self.block_size = self.client.health().get("block_size")
        if type(self.block_size) is not int:
            self.client.close()
            raise ConfigError(f"the daemon reported no block_size ({self.block_size!r})")
        self.namespace = tenant  # the daemon namespaces a tenant's pool by its name

    def lookup(self, tokens: list[int]) -> PrefixHit:
        return self.client.lookup(tokens)

    def put(self, tokens: list[int], kind: str, buffers: list) -> bool:
        report = self.client.put(tokens, {(kind, 0): buffers})
        if report.failed:
            log.warning("kvlink pool daemon refused a page: %s", "; ".join(report.errors))
        return not report.failed

    def get(self, kind: str, key: bytes) -> bytes | None:
        one = {FULL: "full", SLIDING: "sliding"}.get(kind)
        hit = PrefixHit(0, (key,) if one == "full" else (), (key,) if one == "sliding" else (),
                        key if kind == STATE else None, 0, "")
        with self.client.get(hit) as fetched:  # EntryMissing when it is gone: the caller's miss
            return bytes(fetched[(kind, key)])

    def close(self) -> None:
        self.client.close()


class KvlinkHiCacheStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` (v2 and v1 calls) over a kvlink pool; see the module docstring.

    ``storage_config.extra_config``: ``model`` (kvlink preset: namespaces the pool and says which
    entry kinds it has), then ``pool_url`` (+ ``data_port``, ``secret``, ``tenant``, ``timeout``)
    for a daemon, else an in-process pool (``pool_dir`` for its SSD tier, ``block_size``,
    ``host_bytes``, ``page_bytes``, ``ssd_bytes``, ``namespace``).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        cfg = dict(storage_config.extra_config or {})
        model = cfg.get("model")
        if not isinstance(model, str):
            raise ConfigError("extra_config needs 'model', the kvlink preset naming the pool's layout")
        self.storage_config = storage_config
        self.store = _DaemonStore(model, cfg) if cfg.get("pool_url") else _LocalStore(model, cfg)
        if self.store.block_size < MIN_BLOCK_TOKENS:
            self.store.close()
            raise ConfigError(f"the pool's block_size {self.store.block_size} is under {MIN_BLOCK_TOKENS} tokens")
        self._root = prefix_root(self.store.spec, self.store.namespace)
        # KV of MLA models is the same on every TP rank (one copy); otherwise each rank has its shard.
        c = storage_config
        tp = "" if c.is_mla_model else f"tp{c.tp_rank}/{c.tp_size}"
        self._shard = (f"{c.model_name}|{tp}|pp{c.pp_rank}/{c.pp_size}|cp{c.attn_cp_rank}/{c.attn_cp_size}"
                       f"|dcp{c.dcp_rank}/{c.dcp_size}").encode()
        self.registered_pools: dict[str, Any] = {}

    # -- registration -----------------------------------------------------------------------------
    def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
        name = str(host_pool_name)
        kind = POOLS.get(name, (None,))[0]
        groups = {FULL: "full", STATE: "state", SLIDING: "window"}
        if kind is not None and not self.store.spec.group(groups[kind]):
            raise ConfigError(f"SGLang pool {name!r} needs {groups[kind]} layers; kvlink preset "
                              f"{self.store.spec.name!r} has none (choose the model's preset)")
        others = {POOLS[n][0] for n in self.registered_pools if n in POOLS} | ({kind} - {None})
        if {STATE, SLIDING} <= others:
            raise ConfigError("a model with both mamba and swa pools is not supported by the kvlink backend")
        if name == PoolName.KV.value and self.storage_config.is_mla_model and STATE in others \
                and self.storage_config.tp_size > 1:
            raise ConfigError("MLA + mamba with tp_size > 1 is not supported (KV is shared, state is sharded)")
        super().register_mem_host_pool_v2(host_pool, name)

    def _host_pool(self, name: str):
        pool = self.registered_pools.get(name)
        if pool is None and name == PoolName.KV.value:
            pool = getattr(self, "mem_pool_host", None)
        return pool

    # -- keys -------------------------------------------------------------------------------------
    def _tokens(self, key: str) -> list[int]:
        """One synthetic block of token ids for a page key (kv, mamba and swa share it)."""
        digest = hashlib.sha256(b"kvlink-sglang|" + self._shard + b"|" + key.encode()).digest()
        words = [int.from_bytes(digest[i: i + 4], "little") for i in range(0, 32, 4)]
        bs = self.store.block_size
        return (words + [0] * bs)[:bs]

    def _pool_key(self, tokens: list[int]) -> bytes:
        return block_hashes(tokens, self.store.block_size, self._root)[0]

    # -- pages ------------------------------------------------------------------------------------
    def _wrap(self, code: int, kind: str, page: torch.Tensor) -> list:
        raw = page.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        data = memoryview(raw.numpy())
        seg = SegmentHeader(code, 0, kind == STATE, "uint8", Codec.NONE, 0, 0, (data.nbytes,), 0, data.nbytes,
                            data.nbytes, checksum(data))
        header = PayloadHeader(self.store.spec.fingerprint, 0, 0, self.store.block_size, (seg,))
        return Payload(header, [data]).buffers()

    def _unwrap(self, code: int, buf: bytes, into: torch.Tensor) -> bool:
        """Verify a stored page and copy it into ``into`` (flat); False when it does not check out."""
        try:
            payload = Payload.from_buffer(buf)
            payload.verify()
        except KvlinkError as exc:
            log.warning("kvlink: a stored page failed verification (%s): reported as a miss", exc)
            return False
        seg = payload.segments[0] if len(payload.segments) == 1 else None
        target = into.view(torch.uint8)
        if seg is None or seg.layer != code or seg.length != target.numel():
            log.warning("kvlink: a stored page has another layout (%s bytes, want %d)",
                        seg and seg.length, target.numel())
            return False
        target.copy_(torch.frombuffer(bytearray(payload.datas[0]), dtype=torch.uint8))
        return True

    def _read(self, name: str, key: str, host_pool, index: int) -> bool:
        code = POOLS[name][1]
        kind = POOLS[name][0]
        try:
            buf = self.store.get(kind, self._pool_key(self._tokens(key)))
        except KvlinkError as exc:
            log.debug("kvlink: %s page %s missing: %s", name, key, exc)
            return False
        if buf is None:
            return False
        page = host_pool.get_dummy_flat_data_page()
        if not self._unwrap(code, buf, page):
            return False
        host_pool.set_from_flat_data_page(index, page)
        return True

    def _write(self, name: str, key: str, host_pool, index: int) -> bool:
        kind, code = POOLS[name]
        try:
            return self.store.put(self._tokens(key), kind, self._wrap(code, kind, host_pool.get_data_page(index, flat=True)))
        except KvlinkError as exc:
            log.warning("kvlink: storing %s page %s failed: %s", name, key, exc)
            return False

    def _batch_io(self, transfers: list[PoolTransfer], op) -> dict[str, list[bool]]:
        results: dict[str, list[bool]] = {}
        for t in transfers:
            name, keys = str(t.name), t.keys or []
            host_pool = self._host_pool(name)
            page = getattr(host_pool, "page_size", 1) or 1
            idx = t.host_indices
            if name not in POOLS or host_pool is None or idx is None or idx.numel() != len(keys) * page:
                log.error("kvlink: cannot serve pool %s (%d keys, %s host indices)", name, len(keys),
                          None if idx is None else idx.numel())
                results[name] = [False] * len(keys)
                continue
            results[name] = [op(name, key, host_pool, int(idx[i * page].item())) for i, key in enumerate(keys)]
        return results

    # -- v2 ---------------------------------------------------------------------------------------
    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> PoolTransferResult:
        """Longest usable prefix: KV pages from the start, each extra pool by its hit policy."""
        bs, kv_pages, whole = self.store.block_size, 0, []  # whole[i]: page i's KV and its checkpoint
        for key in keys:
            try:
                hit = self.store.lookup(self._tokens(key))
            except KvlinkError as exc:
                log.warning("kvlink: lookup failed (%s): counted as a miss", exc)
                break
            if hit.kv_tokens < bs:
                break
            kv_pages += 1
            whole.append(hit.tokens >= bs)
        hits: dict[str, int] = {PoolName.KV.value: kv_pages} if kv_pages else {}
        restorable = set(range(1, kv_pages + 1))
        for t in pool_transfers or []:
            name = str(t.name)
            if name == PoolName.KV.value:
                continue
            ok = (lambda i: whole[i]) if name in POOLS else (lambda i: False)
            if t.hit_policy == PoolHitPolicy.TRAILING_PAGES:
                trail = max(1, len(t.keys) if t.keys else 1)
                mine = {n for n in range(1, kv_pages + 1) if all(ok(i) for i in range(max(0, n - trail), n))}
            elif t.hit_policy == PoolHitPolicy.ALL_PAGES:
                end = next((i for i in range(kv_pages) if not ok(i)), kv_pages)
                mine = set(range(1, end + 1))
            else:
                log.error("kvlink: hit policy %s is not supported: pool %s misses", t.hit_policy, name)
                mine = set()
            if mine:
                hits[name] = max(mine)
            restorable &= mine
        ordered = sorted(restorable)
        return PoolTransferResult(ordered[-1] if ordered else 0, hits, ordered)

    def batch_get_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        return self._batch_io(transfers, self._read)

    def batch_set_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        return self._batch_io(transfers, self._write)

    # -- v1 (KV pool only) ------------------------------------------------------------------------
    def batch_get_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        t = PoolTransfer(name=PoolName.KV, host_indices=host_indices, keys=list(keys))
        return self._batch_io([t], self._read)[PoolName.KV.value]

    def batch_set_v1(self, keys, host_indices, extra_info=None) -> list[bool]:
        t = PoolTransfer(name=PoolName.KV, host_indices=host_indices, keys=list(keys))
        return self._batch_io([t], self._write)[PoolName.KV.value]

    def batch_exists(self, keys, extra_info=None) -> int:
        return self.batch_exists_v2(list(keys)).kv_hit_pages

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key, target_location=None, target_sizes=None) -> torch.Tensor | None:
        """One KV page's bytes into ``target_location`` (a tensor of the page's size); None: miss."""
        if target_location is None:
            return None
        try:
            buf = self.store.get(FULL, self._pool_key(self._tokens(key)))
        except KvlinkError:
            return None
        flat = target_location.view(-1)
        return target_location if buf is not None and self._unwrap(0, buf, flat) else None

    def batch_get(self, keys, target_locations=None, target_sizes=None) -> list[torch.Tensor | None]:
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]

    def set(self, key, value=None, target_location=None, target_sizes=None) -> bool:
        if value is None:
            return False
        try:
            return self.store.put(self._tokens(key), FULL, self._wrap(0, FULL, value))
        except KvlinkError as exc:
            log.warning("kvlink: storing page %s failed: %s", key, exc)
            return False

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values or []))

    def clear(self) -> None:
        """Not supported: a kvlink pool is shared and evicts by itself (logged, nothing cleared)."""
        log.warning("kvlink: clear() is not supported; the pool evicts by its own policy")

    def get_stats(self):
        return None

    def close(self) -> None:
        self.store.close()
