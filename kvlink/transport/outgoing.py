"""The sender's view of one transfer: parts fed as they are produced, chunks queued and acked."""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import os
import time
from typing import TYPE_CHECKING, Callable

from kvlink.errors import ConfigError, KvlinkError, TransferCancelled
from kvlink.transport.pacing import TokenBucket

if TYPE_CHECKING:
    from kvlink.transport.sender import TransferClient

Chunk = tuple[int, int, int]  # (part, offset, length)

# Parts announced per PART frame: ~24 bytes of JSON each keeps a frame far below the 64 KiB
# control-body limit, and the receiver's work per frame bounded, however many parts there are.
PARTS_PER_FRAME = 1024
# Pending runs a connection looks through for its own part or a fresh one (see take()): more
# than any plausible number of connections, few enough to keep each pick cheap.
LANE_LOOKAHEAD = 64


def _bytes_view(buffer) -> memoryview:
    """A flat byte view of ``buffer`` (``cast`` only when needed: it costs microseconds a call, per part)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 and view.c_contiguous else view.cast("B")


class _Part:
    __slots__ = ("views", "starts", "length", "acked", "left", "seq")

    def __init__(self, views: list[memoryview], nchunks: int, seq: int):
        self.views = views
        self.seq = seq  # position in the order parts were added (connections announce in that order)
        self.starts, total = [], 0
        for v in views:
            self.starts.append(total)
            total += v.nbytes
        self.length = total
        self.acked = bytearray(nchunks)
        self.left = nchunks

    def pieces(self, offset: int, length: int) -> list[memoryview]:
        """The bytes [offset, offset + length) as views, split where the caller's buffers meet."""
        out, i = [], max(0, bisect.bisect_right(self.starts, offset) - 1)
        while length > 0:
            view, start = self.views[i], self.starts[i]
            lo = offset - start
            take = min(length, view.nbytes - lo)
            if take > 0:
                out.append(view[lo: lo + take])
                offset += take
                length -= take
            i += 1
        return out


class OutgoingTransfer:
    """A transfer being sent. Feed parts with :meth:`add_part` (in any order, as they are produced);
    :meth:`done` returns once the receiver has verified every byte.

    The buffers given to :meth:`add_part` are sent without copying and must stay unchanged until
    :meth:`done` returns or raises. :meth:`done` raises :class:`~kvlink.errors.TransferCancelled`,
    :class:`~kvlink.errors.TransferRejected`, :class:`~kvlink.errors.TransferTimeout`,
    :class:`~kvlink.errors.TransferFailed` or :class:`~kvlink.errors.PeerUnreachable`.
    """

    def __init__(self, client: "TransferClient", transfer_id: int | None, parts: int, chunk: int, weight: float,
                 deadline: float | None, rate: float | None, meta: dict, on_ready: Callable[["OutgoingTransfer"], None]):
        if parts < 1:
            raise ConfigError("a transfer needs at least one part")
        if weight <= 0:
            raise ConfigError(f"weight must be positive, got {weight}")
        self.client = client
        self.verifiable = False  # parts the receiver's part verifier can judge (see TransferClient.open)
        self.transfer_id = transfer_id if transfer_id is not None else int.from_bytes(os.urandom(8), "little") or 1
        self.num_parts = parts
        self.chunk = chunk
        self.weight = float(weight)
        self.deadline = None if deadline is None else time.monotonic() + deadline
        self.bucket = None if rate is None else TokenBucket(rate / 8, max(4 * chunk, int(rate / 8 * 0.002)))
        self.meta = meta
        self.opened = time.monotonic()
        self.last_progress = self.opened  # last time the receiver acknowledged new bytes
        self.finished: float | None = None
        self._parts: list[_Part | None] = [None] * parts
        self._order: list[int] = []  # part indices in the order they were added
        self.pending: collections.deque[Chunk] = collections.deque()
        self.resend: collections.deque[Chunk] = collections.deque()
        self._lanes: dict[int, int] = {}  # part -> the lane its last frame went on (while it has more)
        self.retries: collections.Counter[tuple[int, int]] = collections.Counter()
        self.vfinish = 0.0  # fair-queueing tag
        self.bytes_total = 0
        self.bytes_sent = 0
        self.bytes_acked = 0
        self.bytes_resent = 0
        self._on_ready = on_ready
        self._done = asyncio.get_running_loop().create_future()
        self.error: KvlinkError | None = None

    # -- producer API ---------------------------------------------------------------------------
    def add_part(self, index: int, buffers) -> None:
        """Queue part ``index``: one bytes-like object or a list of them (e.g. ``Payload.buffers()``)."""
        if self.error is not None:
            raise self.error
        if not 0 <= index < self.num_parts:
            raise ConfigError(f"part {index} outside 0..{self.num_parts - 1}")
        if self._parts[index] is not None:
            raise ConfigError(f"part {index} was already added")
        if not isinstance(buffers, (list, tuple)):
            buffers = [buffers]
        views = [_bytes_view(b) for b in buffers]
        length = sum(v.nbytes for v in views)
        nchunks = max(1, -(-length // self.chunk))
        self._parts[index] = _Part(views, nchunks, len(self._order))
        self._order.append(index)
        self.bytes_total += length
        self.pending.append((index, 0, length))  # one run per part: take() cuts frames from it
        self._on_ready(self)

    def added_parts(self) -> list[int]:
        """Indices of the parts added so far, in the order they were added."""
        return list(self._order)

    @property
    def parts_added(self) -> int:
        return len(self._order)

    def announced_on(self, index: int, count: int) -> bool:
        """Whether part ``index`` is among the first ``count`` parts added."""
        return self._parts[index].seq < count

    def announcement(self, start: int) -> list[list[int]]:
        """``[index, length]`` of the parts added after the first ``start``, at most
        :data:`PARTS_PER_FRAME` of them: one PART frame's body."""
        return [[i, self._parts[i].length] for i in self._order[start: start + PARTS_PER_FRAME]]

    def part_length(self, index: int) -> int:
        return self._parts[index].length

    def pieces(self, chunk: Chunk) -> list[memoryview]:
        part, offset, length = chunk
        return self._parts[part].pieces(offset, length)

    # -- transport bookkeeping ----------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.error is None and bool(self.pending or self.resend)

    def take(self, max_bytes: int, lane: int | None = None) -> Chunk:
        """The next frame's bytes: a resend as it was, or up to ``max_bytes`` of consecutive
        grid chunks of one part (at least one), so frames grow with the rate.

        ``lane`` (the connection that will carry it) keeps a part's frames on one connection:
        it continues the part it was given last, else starts the first part no other lane is
        on, else (nothing else left) takes the next frame of another lane's part. A part's
        frames then reach the receiver in order on one connection, whose reader can verify
        each as it lands (in cache) instead of in a pass over memory later."""
        if self.resend:
            return self.resend.popleft()
        i = self._run_for(lane) if lane is not None else 0
        part, offset, length = self.pending[i]
        run = max(self.chunk, max_bytes // self.chunk * self.chunk)
        if length <= run:
            del self.pending[i]
            self._lanes.pop(part, None)
            return part, offset, length
        self.pending[i] = (part, offset + run, length - run)
        if lane is not None:
            self._lanes[part] = lane
        return part, offset, run

    def release_lane(self, lane: int) -> None:
        """``lane``'s connection is gone: its parts are free for any other lane to go on with."""
        for part in [p for p, owner in self._lanes.items() if owner == lane]:
            del self._lanes[part]

    def _run_for(self, lane: int) -> int:
        """Index in ``pending`` of the run ``lane`` takes from (see :meth:`take`). Looks at a
        bounded prefix: pending runs start in order, so lanes' parts are near its head."""
        fresh = None
        for i, (part, _, _) in enumerate(itertools.islice(self.pending, LANE_LOOKAHEAD)):
            owner = self._lanes.get(part)
            if owner == lane:
                return i
            if owner is None and fresh is None:
                fresh = i
        return 0 if fresh is None else fresh

    def acked(self, part: int, offset: int, length: int) -> bool:
        """Record an acknowledged run; False if it was already acknowledged or is unknown."""
        p = self._parts[part] if 0 <= part < self.num_parts else None
        if p is None or offset % self.chunk or offset + length > p.length:
            return False
        first, last = offset // self.chunk, max(offset // self.chunk, -(-(offset + length) // self.chunk) - 1)
        fresh = p.acked[first: last + 1].count(0)
        if not fresh:
            return False
        p.acked[first: last + 1] = b"\x01" * (last + 1 - first)
        p.left -= fresh
        self.bytes_acked += length
        self.last_progress = time.monotonic()
        return True

    def requeue(self, chunk: Chunk, unack: bool = False, max_run: int | None = None) -> None:
        """Send ``chunk`` again, ahead of new data (after a lost connection or a bad checksum).

        ``unack``: the receiver rejected bytes it had acknowledged (a whole part failed its
        verification): count them as unacknowledged again and resend them in runs of at most
        ``max_run`` bytes."""
        part, offset, length = chunk
        p = self._parts[part] if 0 <= part < self.num_parts else None
        if self._done.done() or p is None or offset % self.chunk or offset + length > p.length:
            return
        first, end = offset // self.chunk, -(-(offset + length) // self.chunk) or 1
        if unack:
            for i in range(first, end):
                if p.acked[i]:
                    p.acked[i] = 0
                    p.left += 1
                    self.bytes_acked -= min(self.chunk, p.length - i * self.chunk)
        if all(p.acked[first:end]):
            return
        step = max_run or length or 1
        for at in range(offset, offset + max(length, 1), step):
            self.resend.append((part, at, min(step, offset + length - at)))
        self.bytes_resent += length

    def finish(self) -> None:
        """The receiver verified everything (its END may overtake acks still on other connections)."""
        if not self._done.done():
            self.bytes_acked = self.bytes_total
            self.finished = time.monotonic()
            self._done.set_result(None)

    def fail(self, error: KvlinkError) -> None:
        if self._done.done():
            return
        self.error = error
        self.pending.clear()
        self.resend.clear()
        self._lanes.clear()
        self._done.set_exception(error)
        self._done.exception()  # marked retrieved: an unawaited failure is not logged twice

    # -- application API ---------------------------------------------------------------------
    async def done(self) -> None:
        """Wait until the receiver has verified every part (raises the transfer's error)."""
        await asyncio.shield(self._done)

    @property
    def is_done(self) -> bool:
        return self._done.done()

    def cancel(self) -> None:
        """Abandon the transfer on both sides; :meth:`done` raises TransferCancelled."""
        if not self._done.done():
            self.client._cancel(self)
            self.fail(TransferCancelled(f"transfer {self.transfer_id:#x} cancelled by the sender"))

    @property
    def goodput_bps(self) -> float:
        end = self.finished or time.monotonic()
        return self.bytes_acked * 8 / max(end - self.opened, 1e-9)
