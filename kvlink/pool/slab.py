"""A memory tier: fixed-size pages carved out of chunks allocated on demand.

The host tier is DRAM (pinned when CUDA exists, so promotion to the GPU and transfers start
without staging); the GPU tier is the same code with ``device="cuda"`` (tests run it on
``device="cpu"``). An entry takes ``ceil(size / page_bytes)`` pages, not necessarily adjacent,
and carries the xxh3 of its bytes: :meth:`get` verifies it and drops an entry that fails,
rather than ever returning damaged bytes.

Memory is allocated lazily, ``chunk_bytes`` at a time, when the free pages run out, and each
chunk is charged to a shared :class:`~kvlink.pool.budget.HostBudget` when one is given: creating
a tier costs nothing, and a daemon's many tiers together never hold more than the budget.
``capacity`` is the tier's own cap (its tenant's quota). Chunks stay allocated until
:meth:`close` (a tier that was full once keeps its memory; its capacity bounds it).

The free pages are a stack: the most recently freed pages are reused first, so a tier whose
working set is small keeps reusing the same few (already faulted-in, cache-warm) pages instead
of walking through every page of its capacity (which grew a daemon's RSS for minutes).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvlink.codec.checksum import checksum
from kvlink.errors import ChecksumMismatch, ConfigError, LengthError, PoolError
from kvlink.ops.runs import Runs, buffer_pieces, concat


@dataclass(frozen=True)
class SlabEntry:
    pages: tuple[int, ...]
    nbytes: int
    digest: int | None  # None: stored without one, reads cannot verify it


class Landing:
    """Adjacent pages of a host tier reserved for bytes that are about to arrive (e.g. a pool
    daemon's receiver writes a put straight into them), so storing them is :meth:`SlabTier.adopt`,
    not a copy. ``release()`` hands the pages back unless they were adopted."""

    __slots__ = ("tier", "pages", "nbytes", "view", "adopted", "released")

    def __init__(self, tier: "SlabTier", pages: tuple[int, ...], nbytes: int):
        self.tier, self.pages, self.nbytes = tier, pages, nbytes
        self.view = memoryview(tier._span(pages[0], nbytes).numpy())
        self.adopted = self.released = False

    def release(self) -> None:
        self.tier._unreserve(self)


class SlabTier:
    """Up to ``capacity`` bytes in pages of ``page_bytes``, allocated ``chunk_bytes`` at a time
    (charged to ``budget`` when given); thread-safe."""

    def __init__(self, capacity: int, page_bytes: int = 2 << 20, device: str | torch.device = "cpu",
                 pin: bool | None = None, chunk_bytes: int = 64 << 20, budget=None):
        if page_bytes <= 0 or capacity < page_bytes:
            raise ConfigError(f"need 0 < page_bytes <= capacity, got {page_bytes} and {capacity}")
        self.device = torch.device(device)
        if pin is None:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
        self._pin = bool(pin)
        self.page_bytes = page_bytes
        self.num_pages = capacity // page_bytes
        self.chunk_pages = max(1, min(self.num_pages, chunk_bytes // page_bytes))
        self.budget = budget
        self._chunks: list[torch.Tensor] = []  # chunk c holds pages [c * chunk_pages, ...)
        # One view per page, made on first use and kept: slicing a tensor costs microseconds,
        # which is a tenth of a 2 MiB copy on a many-core host.
        self._pages: list[torch.Tensor | None] = []
        # Free pages, a stack popped from the right (LIFO). Pages are pushed in reverse order
        # (:meth:`_push`), so popping hands a freed run, or a new chunk, back out in ascending
        # order: adjacent entries stay adjacent (one view per entry, room for landings).
        self._free: collections.deque[int] = collections.deque()
        self._entries: dict[bytes, SlabEntry] = {}
        self._lock = threading.Lock()
        self.stats = collections.Counter()

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return (len(self._pages) - len(self._free)) * self.page_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of memory the tier holds (allocated chunks), used or free."""
        with self._lock:
            return len(self._pages) * self.page_bytes

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _span(self, page: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` from the start of ``page`` on (they must lie in its chunk)."""
        start = (page % self.chunk_pages) * self.page_bytes
        return self._chunks[page // self.chunk_pages][start: start + nbytes]

    def _page(self, index: int) -> torch.Tensor:
        page = self._pages[index]
        if page is None:
            page = self._pages[index] = self._span(index, self.page_bytes)
        return page

    def _new_chunk(self, fault: bool = True) -> list[int] | None:
        """Allocate the next chunk (under the lock); its page indices, or None when the tier's
        capacity or the shared budget has no room for it. ``fault``: touch it now (host tiers),
        so later copies into it run at memory speed."""
        first = len(self._pages)
        count = min(self.chunk_pages, self.num_pages - first)
        if count <= 0:
            return None
        nbytes = count * self.page_bytes
        if self.budget is not None and not self.budget.charge(nbytes):
            self.stats["budget_refused"] += 1
            return None
        try:
            chunk = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self._pin)
            if fault and self.device.type == "cpu" and not self._pin:
                chunk.zero_()  # fault the chunk in now, not page by page on the first puts
        except (RuntimeError, MemoryError):
            if self.budget is not None:
                self.budget.release(nbytes)
            self.stats["alloc_failed"] += 1
            return None
        self._chunks.append(chunk)
        self._pages.extend([None] * count)
        self.stats["chunks"] += 1
        return list(range(first, first + count))

    def _grow(self, need: int) -> bool:
        """Allocate chunks until ``need`` pages are free (under the lock); False if they cannot be."""
        while len(self._free) < need:
            pages = self._new_chunk()
            if pages is None:
                return False
            self._push(pages)
        return True

    def _push(self, pages) -> None:
        """Free ``pages`` (under the lock): they are the next ones handed out, lowest first."""
        self._free.extend(reversed(pages))

    def _pop(self, need: int) -> tuple[int, ...]:
        """The ``need`` most recently freed pages (under the lock; ``need <= len(self._free)``)."""
        return tuple(self._free.pop() for _ in range(need))

    def close(self) -> None:
        """Drop every entry and give the memory (and its budget charge) back."""
        with self._lock:
            if self.budget is not None:
                self.budget.release(len(self._pages) * self.page_bytes)
            self._entries.clear()
            self._chunks.clear()
            self._pages.clear()
            self._free.clear()

    # -- data -------------------------------------------------------------------------------------
    def put(self, key: bytes, data, digest: int | None = None, hashed: bool = True) -> bool:
        """Copy ``data`` (bytes-like, CPU or device tensor, or a list of them stored back to back,
        e.g. ``Payload.buffers()``) in; False when there is no room (the caller evicts and
        retries). An existing entry under ``key`` is replaced. ``digest``: the xxh3 of the bytes
        when the caller already has it, else computed unless ``hashed`` is False (then the entry
        cannot be verified on reads)."""
        srcs = [_as_bytes_tensor(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
        nbytes = sum(src.numel() for src in srcs)
        need = max(1, -(-nbytes // self.page_bytes))
        with self._lock:
            held = len(self._entries.get(key, SlabEntry((), 0, 0)).pages)
            if need > len(self._free) + held and not self._grow(need - held):
                self.stats["put_full"] += 1
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._push(old.pages)
            pages = self._pop(need)
        want_hash = hashed and digest is None
        if self.device.type == "cpu" and nbytes and all(src.device.type == "cpu" for src in srcs):
            # One native job: each piece hashed (when asked) and copied while in cache, on all cores.
            runs = Runs()
            runs.add(concat([buffer_pieces(src) for src in srcs if src.numel()]), self._page_pieces(pages, nbytes))
            chunks = list(self._chunks)  # the native copy holds no reference: a close() must not free them
            got = runs.run(hash=want_hash, stream=True)[0]
            del chunks
            return self._record(key, pages, nbytes, got if want_hash else digest)
        # Hash each span right after copying it, while it is still in cache (host tiers).
        hasher = xxhash.xxh3_64() if want_hash and self.device.type == "cpu" else None
        whole_page = len(srcs) == 1 and nbytes == self.page_bytes
        if whole_page:  # no slicing
            self._page(pages[0]).copy_(srcs[0], non_blocking=self.device.type == "cuda")
            if hasher is not None:
                hasher.update(memoryview(self._page(pages[0]).numpy()))
        at = 0  # bytes of the entry written so far
        for src in [] if whole_page else srcs:
            off = 0
            while off < src.numel():
                page, in_page = pages[at // self.page_bytes], at % self.page_bytes
                n = min(self.page_bytes - in_page, src.numel() - off)
                dst = self._page(page)[in_page: in_page + n]
                dst.copy_(src[off: off + n], non_blocking=self.device.type == "cuda")
                if hasher is not None:
                    hasher.update(memoryview(dst.numpy()))
                off += n
                at += n
        if hasher is not None:
            digest = hasher.intdigest()
        elif digest is None and hashed:
            h = xxhash.xxh3_64()
            for src in srcs:
                h.update(_host_view(src))
            digest = h.intdigest()
        return self._record(key, pages, nbytes, digest)

    def _record(self, key: bytes, pages: tuple[int, ...], nbytes: int, digest: int | None) -> bool:
        with self._lock:
            self._entries[key] = SlabEntry(pages, nbytes, digest)
            self.stats["puts"] += 1
        return True

    def _page_pieces(self, pages: tuple[int, ...], nbytes: int):
        """Addresses and lengths of an entry's bytes, page by page (host tiers)."""
        cp, pb = self.chunk_pages, self.page_bytes
        addr = np.array([self._chunks[p // cp].data_ptr() + (p % cp) * pb for p in pages], np.int64)
        lens = np.full(len(pages), pb, np.int64)
        lens[-1] = nbytes - (len(pages) - 1) * pb
        return addr, lens

    def reserve(self, nbytes: int) -> Landing | None:
        """Adjacent free pages for ``nbytes`` (host tiers), or None when there are none: this never
        evicts (it runs on a receiver's path, on an event loop; see :meth:`_take_run` for when it
        allocates). Fill ``landing.view``, then :meth:`adopt` it."""
        if self.device.type != "cpu":
            return None
        need = max(1, -(-nbytes // self.page_bytes))
        with self._lock:
            pages = self._take_run(need)
            if pages is None:
                self.stats["reserve_missed"] += 1
                return None
            self.stats["reserved"] += 1
        return Landing(self, pages, nbytes)

    def _take_run(self, need: int) -> tuple[int, ...] | None:
        """``need`` adjacent free pages in one chunk, or None. When none are free, an unpinned
        tier allocates a chunk without faulting it in (an mmap: microseconds; the writes into
        the landing fault it, in the transport's reader threads); a pinned one does not (pinning
        takes milliseconds and this runs on an event loop)."""
        if need > self.chunk_pages:
            return None
        run = self._free_run(need)
        if run is None and not self._pin:
            pages = self._new_chunk(fault=False)
            if pages is not None:
                if len(pages) < need:  # the tier's last chunk is smaller than the others
                    self._push(pages)
                    return self._free_run(need)
                run = tuple(pages[:need])
                self._push(pages[need:])
        return run

    def _free_run(self, need: int) -> tuple[int, ...] | None:
        if len(self._free) < need:
            return None
        if need == 1:
            return self._pop(1)
        head, cp = self._free[-1], self.chunk_pages
        if (head // cp == (head + need - 1) // cp
                and all(self._free[-1 - i] == head + i for i in range(1, need))):
            # The usual case: freed runs and new chunks are pushed so that they pop in ascending
            # order, so the top of the stack is already a run (no sort of the free list).
            return self._pop(need)
        free = sorted(self._free)
        for i in range(len(free) - need + 1):
            if free[i + need - 1] - free[i] == need - 1 and free[i] // cp == free[i + need - 1] // cp:
                run = tuple(free[i: i + need])
                taken = set(run)
                self._free = collections.deque(p for p in self._free if p not in taken)
                return run
        return None

    def adopt(self, key: bytes, landing: Landing, digest: int | None = None, hashed: bool = True) -> None:
        """Make a filled :class:`Landing` the entry under ``key`` (replacing any), without copying."""
        if landing.tier is not self:
            raise ConfigError("a landing can only be adopted by the tier that reserved it")
        if digest is None and hashed:
            digest = checksum(landing.view)
        with self._lock:
            if landing.adopted or landing.released:
                raise PoolError("landing already adopted or released")
            old = self._entries.pop(key, None)
            if old is not None:
                self._push(old.pages)
            landing.adopted = True
            self._entries[key] = SlabEntry(landing.pages, landing.nbytes, digest)
            self.stats["puts"] += 1
            self.stats["adopted"] += 1

    def _unreserve(self, landing: Landing) -> None:
        with self._lock:
            if not landing.adopted and not landing.released:
                self._push(landing.pages)
            landing.released = True

    def get(self, key: bytes, out=None, verify: bool = True):
        """The entry's bytes, copied into ``out`` (a writable bytes-like or tensor of the right
        size) or a new CPU tensor. Raises :class:`PoolError` for a missing key; an entry failing
        its checksum is dropped and :class:`ChecksumMismatch` raised."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats["misses"] += 1
                raise PoolError(f"no entry {key.hex()[:16]} in this tier")
        dst = torch.empty(entry.nbytes, dtype=torch.uint8) if out is None else _as_bytes_tensor(out)
        if dst.numel() != entry.nbytes:
            raise LengthError(f"output holds {dst.numel()} bytes, entry has {entry.nbytes}")
        verify = verify and entry.digest is not None
        if self.device.type == "cpu" and dst.device.type == "cpu" and entry.nbytes:
            runs = Runs()
            runs.add(self._page_pieces(entry.pages, entry.nbytes), buffer_pieces(dst))
            chunks = list(self._chunks)  # the native copy holds no reference: a close() must not free them
            got = runs.run(hash=verify, stream=False)[0]  # the caller reads it next: keep it in cache
            del chunks
            return self._verified(key, entry, dst, got if verify else entry.digest)
        hasher = xxhash.xxh3_64() if verify and dst.device.type == "cpu" else None
        if len(entry.pages) == 1 and entry.nbytes == self.page_bytes and hasher is None:
            dst.copy_(self._page(entry.pages[0]))  # a whole page: no slicing
        else:
            for i, page in enumerate(entry.pages):
                lo = i * self.page_bytes
                n = min(self.page_bytes, entry.nbytes - lo)
                dst[lo: lo + n].copy_(self._page(page)[:n])
                if hasher is not None and n:
                    hasher.update(memoryview(dst[lo: lo + n].numpy()))  # while it is in cache
        got = hasher.intdigest() if hasher is not None else (checksum(_host_view(dst)) if verify else entry.digest)
        return self._verified(key, entry, dst, got)

    def _verified(self, key: bytes, entry: SlabEntry, dst: torch.Tensor, got: int | None) -> torch.Tensor:
        if got != entry.digest:
            self.delete(key)
            self.stats["corrupt"] += 1
            raise ChecksumMismatch(f"slab entry {key.hex()[:16]}", entry.digest, got)
        self.stats["hits"] += 1
        return dst

    def views(self, key: bytes) -> list[memoryview]:
        """The entry's bytes in place, page by page (host tiers; no copy). Valid only while the
        entry stays: callers pin it first (see :meth:`Pool.pin_views`)."""
        entry = self._entries.get(key)
        if entry is None:
            raise PoolError(f"no entry {key.hex()[:16]} in this tier")
        if self.device.type != "cpu":
            raise ConfigError("views are for host tiers")
        pages = entry.pages
        if (pages == tuple(range(pages[0], pages[0] + len(pages)))
                and pages[0] // self.chunk_pages == pages[-1] // self.chunk_pages):
            # Adjacent pages in one chunk (every landed put, most entries of a tier that is not
            # fragmented): one view, so a reply sends it as one buffer.
            return [memoryview(self._span(pages[0], entry.nbytes).numpy())]
        out = []
        for i, page in enumerate(pages):
            n = min(self.page_bytes, entry.nbytes - i * self.page_bytes)
            out.append(memoryview(self._page(page)[:n].numpy()))
        return out

    def delete(self, key: bytes) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._push(entry.pages)
            return True

    def entry(self, key: bytes) -> SlabEntry | None:
        return self._entries.get(key)


def _as_bytes_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype == torch.uint8 and data.dim() == 1 and data.is_contiguous():
            return data
        if not data.is_contiguous():
            raise ConfigError("tier data must be contiguous")
        return data.reshape(-1).view(torch.uint8)
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def _host_view(t: torch.Tensor):
    """A host buffer over ``t`` for hashing (device tensors are copied to the host first)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.numpy()) if t.numel() else b""
