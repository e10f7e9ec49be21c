"""Prefill side: stream a request's cache to its decode peer layer by layer as prefill computes it.

Call order per request: :meth:`PrefillSide.begin`, then :meth:`~PrefillSide.save_layer` once per
layer as soon as the layer is computed (from a forward hook, say), then :meth:`~PrefillSide.finish`.
Each layer is packed at once, so the engine may overwrite nothing it already saved, and handed to
the transport, which sends it while the next layers are computed.

vLLM ``KVConnectorBase_V1`` (worker side): ``start_load_kv``/``wait_for_layer_load`` are the
decode side's; ``save_kv_layer(layer_name, kv_layer, attn_metadata)`` -> :meth:`save_layer`;
``wait_for_save`` -> :meth:`finish`. Scheduler side: ``request_finished`` returns
``(True, {"kvlink": destination})`` once :meth:`begin` was called, so the blocks stay allocated
until :meth:`finish` returns. See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass, field

from kvlink.config import CodecConfig, TransportConfig
from kvlink.errors import ConfigError, EngineError, TransferTimeout
from kvlink.serde import CacheRef, Packer, PagedCache, StagingArena
from kvlink.serde.layout import layer_segments
from kvlink.transport import OutgoingTransfer, TransferClient
from kvlink.transport.adaptive import CodecAdvisor, link_rate
from kvlink.transport.loop import new_event_loop, run_sync, stop_loop


def transfer_id_for(request_id: str) -> int:
    """The transfer id both sides derive from a request id (never 0)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") or 1


@dataclass
class SendReport:
    """What one request's send did (times are ``time.monotonic()``)."""

    request_id: str
    bytes: int
    layers: int
    began: float
    layer_saved: dict[int, float] = field(default_factory=dict)   # layer -> when save_layer packed it
    finished: float = 0.0
    bytes_resent: int = 0

    @property
    def seconds(self) -> float:
        return self.finished - self.began


@dataclass
class _Request:
    ref: CacheRef
    layers: list[int]
    transfer: OutgoingTransfer
    report: SendReport
    client: TransferClient
    payloads: list = field(default_factory=list)


DEFAULT_STAGING_BYTES = 64 << 20  # a few layers of a long request in flight; larger ones overflow


class PrefillSide:
    """Sends requests' caches out of one :class:`PagedCache` (asyncio; see :class:`SyncPrefillSide`).

    One :class:`~kvlink.transport.TransferClient` per destination, opened on first use and kept.
    ``advisor``: a :class:`~kvlink.transport.adaptive.CodecAdvisor` choosing each layer's codecs
    (instead of ``codec``'s fixed ones) from the destination link's current rate
    (``client.snapshot()``) as the layer is saved; it is calibrated on the request's own data at
    :meth:`begin` (once per segment class and dtype).
    """

    def __init__(self, cache: PagedCache, codec: CodecConfig | None = None, transport: TransportConfig | None = None,
                 secret: bytes | None = None, advisor: CodecAdvisor | None = None,
                 staging_bytes: int = DEFAULT_STAGING_BYTES):
        """``staging_bytes``: a staging arena (pinned when CUDA exists, pre-faulted otherwise)
        that layers are packed into and sent from, reused from request to request; a layer that
        does not fit gets a buffer of its own (0: always). Raises :class:`ConfigError` for a
        negative size."""
        if staging_bytes < 0:
            raise ConfigError(f"staging_bytes must be >= 0, got {staging_bytes}")
        self.cache = cache
        staging = StagingArena(staging_bytes) if staging_bytes else None
        self.packer = Packer(cache, codec, staging=staging, overflow=True)
        self.advisor = advisor
        self.transport = transport or TransportConfig()
        self.secret = secret
        self._clients: dict[tuple[str, int], TransferClient] = {}
        self._requests: dict[str, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def client(self, destination: tuple[str, int]) -> TransferClient:
        """The connected client for ``destination``; raises the transport's connect errors
        (:class:`~kvlink.errors.PeerUnreachable`, :class:`~kvlink.errors.FingerprintMismatch`...)."""
        dest = (destination[0], int(destination[1]))
        client = self._clients.get(dest)
        if client is None:
            client = TransferClient(*dest, self.cache.spec.fingerprint, self.transport, self.secret)
            await client.connect()
            self._clients[dest] = client
        return client

    async def begin(self, request_id: str, ref: CacheRef, destination: tuple[str, int], *,
                    layers: list[int] | None = None, weight: float = 1.0, deadline: float | None = None) -> None:
        """Open the request's transfer: one part per layer, tokens [ref.token_start, ref.num_tokens)
        (the receiver already holds the prefix before ``token_start``). Raises :class:`EngineError`
        for a request id in use and the transport's connect errors."""
        if request_id in self._requests:
            raise EngineError(f"request {request_id} already begun")
        self._loop = asyncio.get_running_loop()
        layers = list(range(self.cache.spec.num_layers) if layers is None else layers)
        ref.block_ids_checked(self.cache)
        client = await self.client(destination)
        if self.advisor is not None:
            await asyncio.to_thread(self.advisor.calibrate_cache, self.cache, ref)  # no-op once profiled
        meta = {"request": request_id, "layers": layers, "token_start": ref.token_start, "num_tokens": ref.num_tokens}
        transfer = client.open(len(layers), weight=weight, deadline=deadline, meta=meta,
                               transfer_id=transfer_id_for(request_id), verifiable=True)  # parts are payloads
        self._requests[request_id] = _Request(ref, layers, transfer, SendReport(request_id, 0, len(layers),
                                                                                 time.monotonic()), client)

    def save_layer(self, request_id: str, layer: int) -> None:
        """Pack ``layer`` now and queue it for sending. Safe from any thread (a forward hook):
        the packing happens in the caller, the hand-off on the event loop. Raises
        :class:`EngineError` for an unknown request, a layer not in it or saved already, and the
        transfer's typed error once it failed (checked here: from another thread, a failure in
        the hand-off could not reach the caller)."""
        req = self._req(request_id)
        try:
            index = req.layers.index(layer)
        except ValueError:
            raise EngineError(f"request {request_id} does not send layer {layer}") from None
        if layer in req.report.layer_saved:
            raise EngineError(f"request {request_id}: layer {layer} was saved already")
        if req.transfer.error is not None:
            raise req.transfer.error
        codecs = None
        if self.advisor is not None:  # the codecs that deliver soonest at the link's rate right now
            segments = layer_segments(self.cache.spec, layer, req.ref.token_start, req.ref.num_tokens)
            codecs = self.advisor.codecs(segments, link_rate(req.client.snapshot()))
        payload = self.packer.pack(req.ref, [layer], codecs)
        req.payloads.append(payload)
        req.report.bytes += payload.nbytes
        req.report.layer_saved[layer] = time.monotonic()
        if self._in_loop():
            req.transfer.add_part(index, payload.buffers())
        else:
            self._loop.call_soon_threadsafe(req.transfer.add_part, index, payload.buffers())

    async def finish(self, request_id: str, timeout: float | None = None) -> SendReport:
        """Wait until the receiver has verified every layer; returns the report. Raises the
        transfer's typed error (:class:`~kvlink.errors.TransferTimeout`,
        :class:`~kvlink.errors.TransferCancelled`, :class:`~kvlink.errors.TransferFailed`...),
        and :class:`~kvlink.errors.TransferTimeout` when ``timeout`` (seconds) passes first. The
        request is forgotten either way; a transfer not done by then is cancelled (the decode
        side sees :class:`~kvlink.errors.TransferCancelled`), so its buffers are never sent
        after they are given back."""
        req = self._req(request_id)
        try:
            await asyncio.wait_for(req.transfer.done(), timeout)
            req.report.finished = time.monotonic()
            req.report.bytes_resent = req.transfer.bytes_resent
            return req.report
        except asyncio.TimeoutError:
            raise TransferTimeout(f"request {request_id}: not verified by the receiver within {timeout} s; "
                                  "transfer cancelled") from None
        finally:
            if not req.transfer.is_done:
                req.transfer.cancel()
            self._drop(request_id)

    async def abort(self, request_id: str) -> None:
        """Cancel the request's transfer (the receiver sees TransferCancelled)."""
        req = self._requests.get(request_id)
        if req is not None:
            req.transfer.cancel()
            self._drop(request_id)

    async def close(self) -> None:
        for request_id in list(self._requests):
            await self.abort(request_id)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def _req(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise EngineError(f"unknown request {request_id}")
        return req

    def _drop(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            for payload in req.payloads:
                payload.release()

    def _in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False


class SyncPrefillSide:
    """:class:`PrefillSide` for synchronous engines: its event loop runs in a background thread.

    ``save_layer`` returns as soon as the layer is packed; ``begin``/``finish`` block.
    """

    def __init__(self, *args, **kwargs):
        """As :class:`PrefillSide`; raises what it raises, and then leaves no thread or loop behind."""
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlink-prefill", daemon=True)
        self._thread.start()
        try:
            self.side = PrefillSide(*args, **kwargs)
        except BaseException:
            stop_loop(self._loop, self._thread)
            raise

    def _run(self, coro, timeout: float | None = None):
        return run_sync(coro, self._loop, timeout)

    def begin(self, request_id: str, ref: CacheRef, destination: tuple[str, int], **kwargs) -> None:
        self._run(self.side.begin(request_id, ref, destination, **kwargs))

    def save_layer(self, request_id: str, layer: int) -> None:
        self.side.save_layer(request_id, layer)

    def finish(self, request_id: str, timeout: float | None = None) -> SendReport:
        return self._run(self.side.finish(request_id, timeout))

    def abort(self, request_id: str) -> None:
        self._run(self.side.abort(request_id))

    def close(self) -> None:
        try:
            self._run(self.side.close())
        finally:
            stop_loop(self._loop, self._thread)
