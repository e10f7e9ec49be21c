"""The worker-side half of kvlink's vLLM connector: moves the bytes the scheduler side decided on.

Runs in vLLM's worker process, on its main thread; kvlink's transport runs on an event loop in a
background thread. Per step:

- ``bind`` (before the forward): a prefill request's pool hit is restored (sync: the forward reads
  it); a decode request's pool prefix and pushed tokens start loading (async: reported through
  :meth:`transfer_results` when every layer is written, or failed); finished requests' tokens go
  to the pool; each send opens its transfer.
- ``save_layer`` (after each attention layer): packs that layer of every request sending this
  step and hands it to the transport, which sends while the next layers compute.
- ``finish_step`` (after the forward): the layers with no attention hook (recurrent state) are
  packed now, when their state is final, and each send waits for the receiver in the background.

Nothing raises into vLLM: a failure is logged and reported the way vLLM recomputes (a failed load
in ``failed_recving``), a failed send leaves the decode side's load to fail and recompute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

from kvlink.daemon.client import PoolClient
from kvlink.engine.decode import DecodeSide
from kvlink.engine.pieces import check_block_size
from kvlink.engine.prefill import PrefillSide
from kvlink.engine.vllm.layout import VllmLayout
from kvlink.engine.vllm.meta import ConnectorConfig, LoadJob, SendJob, StepJobs, StoreJob
from kvlink.errors import EntryMissing, KvlinkError, LoadFailed
from kvlink.serde import CacheRef
from kvlink.transport.loop import new_event_loop, run_sync, stop_loop

log = logging.getLogger("kvlink.vllm")


def _log_pool_connect(fut: concurrent.futures.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.info("pool not reachable yet (%s); connecting at first use", fut.exception())


class WorkerSide:
    """Owns the transport for one worker's cache (``layout``): a prefill side, and a decode side
    listening on ``config.listen`` when ``listen`` is true."""

    def __init__(self, layout: VllmLayout, config: ConnectorConfig, listen: bool, pool_model: str | None = None):
        self.layout, self.config, self.pool_model = layout, config, pool_model
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlink-vllm", daemon=True)
        self._thread.start()
        try:
            self.prefill = PrefillSide(layout.paged, secret=config.secret)
            self.decode = DecodeSide(layout.paged, secret=config.secret, begin_timeout=config.begin_timeout)
            self.address = self._run(self.decode.start(*config.listen)) if listen else None
        except BaseException:
            stop_loop(self._loop, self._thread, 5)
            raise
        self._sends: dict[str, SendJob] = {}           # sending this step
        self._saved: dict[str, set[int]] = {}
        self._finishing: dict[str, concurrent.futures.Future | None] = {}  # req -> finish (None: failed early)
        self._loading: dict[str, concurrent.futures.Future] = {}
        self._storing: dict[str, concurrent.futures.Future] = {}
        self._pool_lock = asyncio.Lock()
        self._finished_seen: set[str] = set()  # finished requests whose send is still being waited for
        if config.pool is not None:  # connect in the background now rather than at the first request
            self._submit(self._pool()).add_done_callback(_log_pool_connect)

    def _run(self, coro, timeout: float | None = None):
        return run_sync(coro, self._loop, timeout)

    def _submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _ref(self, blocks, num_tokens: int, token_start: int = 0) -> CacheRef:
        return CacheRef(self.layout.token_blocks(blocks), num_tokens, self.layout.state_slots(blocks), token_start)

    async def _pool(self):
        """The daemon's client, connected on first use (its block size must be a multiple of ours)."""
        async with self._pool_lock:
            if self.decode.pool is None:
                host, http_port, data_port = self.config.pool
                client = PoolClient(self.pool_model, host, http_port, data_port, secret=self.config.secret,
                                    spec=self.layout.spec)
                await client.connect()
                check_block_size(self.layout.paged, client.block_size)
                self.decode.pool, self.decode.pool_block_size = client, client.block_size
            return self.decode.pool

    async def _restore(self, job: LoadJob) -> None:
        """Tokens ``[0, job.token_start)`` from the pool; raises :class:`LoadFailed` when the pool
        no longer holds them all (evicted since the lookup) and the pool's typed errors."""
        began = time.monotonic()
        await self._pool()
        hit = await self.decode.lookup(job.tokens[: job.token_start])
        if hit.tokens < job.token_start:
            cause = EntryMissing(f"the pool holds {hit.tokens} of {job.token_start} tokens")
            raise LoadFailed(job.req_id, list(range(self.layout.spec.num_layers)), [], {-1: cause})
        await self.decode.load_from_pool(hit, self._ref(job.blocks, job.token_start))
        log.info("kvlink: request %s restored %d tokens from the pool (%.1f ms)", job.req_id, job.token_start,
                 1e3 * (time.monotonic() - began))

    # -- before the forward ----------------------------------------------------------------
    def bind(self, jobs: StepJobs) -> None:
        for job in jobs.loads:
            if job.transfer is None:
                self._restore_now(job)
            else:
                self._loading[job.req_id] = self._submit(self._load(job))
        for job in jobs.stores:
            self._storing[job.req_id] = self._submit(self._store(job))
        for job in jobs.sends:
            self._begin(job)

    def _restore_now(self, job: LoadJob) -> None:
        """A prefill request's pool hit, before the forward reads it. vLLM already counts these
        tokens as computed, so a failure cannot be recomputed here: the request's transfer is
        cancelled instead (the decode server then recomputes the prompt)."""
        try:
            self._run(self._restore(job), self.config.load_timeout)
            self._zero_after(job.blocks, job.token_start)
        except KvlinkError as exc:
            log.error("request %s: pool restore failed (%s); its transfer will be cancelled", job.req_id, exc)
            self._finishing[job.req_id] = None

    async def _store(self, job: StoreJob) -> None:
        await self._pool()
        report = await self.decode.store(job.tokens, self._ref(job.blocks, len(job.tokens)))
        log.info("kvlink: request %s stored %d tokens in the pool (%d new entries, %d refused)", job.req_id,
                 len(job.tokens), report.stored, report.failed)

    async def _load(self, job: LoadJob) -> None:
        if job.token_start:
            await self._restore(job)
        ref = self._ref(job.blocks, job.num_tokens, job.token_start)
        self.decode.start_load(job.transfer, ref, timeout=self.config.load_timeout)
        try:
            report = await self.decode.wait_all(job.transfer)
            self._zero_after(job.blocks, job.num_tokens)
            log.info("kvlink: request %s loaded tokens [0, %d) (%d bytes, %.1f ms), pool tokens %d", job.req_id,
                     job.num_tokens, report.bytes, 1e3 * (report.finished - report.began), job.token_start)
        finally:
            self.decode.release(job.transfer)

    def _zero_after(self, blocks, num_tokens: int) -> None:
        """Zero the token rows from ``num_tokens`` to the end of the request's blocks. vLLM zeroes
        new attention blocks because its CPU kernel reads whole blocks (stale NaNs there poison the
        result); it skips blocks a connector loads, so the rows a load does not write are ours to clear."""
        ids = self.layout.token_blocks(blocks)
        bs = self.layout.paged.block_size
        for layer in range(self.layout.spec.num_layers):
            for _, plane in self.layout.paged.planes(layer):
                rows = plane.view(plane.shape[0], bs, -1) if plane.dim() == 2 else plane
                first = num_tokens // bs
                if first < len(ids) and num_tokens % bs:
                    rows[ids[first], num_tokens % bs:].zero_()
                    first += 1
                for b in ids[first:]:
                    rows[b].zero_()

    def _begin(self, job: SendJob) -> None:
        restore_failed = job.req_id in self._finishing and self._finishing[job.req_id] is None
        ref = self._ref(job.blocks, job.num_tokens, job.token_start)
        try:
            self._run(self.prefill.begin(job.transfer, ref, job.destination), self.config.send_timeout)
        except KvlinkError as exc:
            log.error("request %s: cannot open its transfer to %s (%s)", job.req_id, job.destination, exc)
            self._finishing[job.req_id] = None
            return
        if restore_failed:  # its prefix is not what the pool held: cancel, so the decode side recomputes now
            self._run(self.prefill.abort(job.transfer), self.config.send_timeout)
            return
        self._sends[job.req_id] = job
        self._saved[job.req_id] = set()

    # -- during and after the forward -----------------------------------------------------
    def save_layer(self, layer_name: str) -> None:
        layer = self.layout.layer_index.get(layer_name)
        if layer is None:
            return
        for req_id, job in list(self._sends.items()):
            self._save(req_id, job, layer)

    def _save(self, req_id: str, job: SendJob, layer: int) -> None:
        if layer in self._saved[req_id]:
            return
        try:
            self.prefill.save_layer(job.transfer, layer)
            self._saved[req_id].add(layer)
        except KvlinkError as exc:
            log.error("request %s: layer %d not sent (%s)", req_id, layer, exc)
            self._sends.pop(req_id)
            self._submit(self.prefill.abort(job.transfer))
            self._finishing[req_id] = None

    def finish_step(self) -> None:
        """Pack the layers no hook saved (recurrent state), then wait for the receiver in the background."""
        for req_id, job in list(self._sends.items()):
            for layer in range(self.layout.spec.num_layers):
                if req_id in self._sends:
                    self._save(req_id, job, layer)
            if req_id in self._sends:
                self._finishing[req_id] = self._submit(self.prefill.finish(job.transfer, self.config.send_timeout))
        self._sends.clear()
        self._saved.clear()

    # -- reporting ---------------------------------------------------------------------------
    def transfer_results(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """``(finished sending, finished receiving, failed receiving)`` as vLLM wants them: a
        send (or pool store) is reported once done and once vLLM said the request finished; a failed
        load is reported both as finished and failed, so vLLM recomputes it."""
        # Only ids with a send in flight are kept: every other finished request would stay forever.
        self._finished_seen |= self._finishing.keys() & set(finished_req_ids)
        sending, recving, failed = set(), set(), set()
        for req_id, fut in list(self._finishing.items()):
            if req_id in self._finished_seen and (fut is None or fut.done()):
                if fut is not None and fut.exception() is not None:
                    log.error("request %s: send failed (%s)", req_id, fut.exception())
                elif fut is not None:
                    log.info("kvlink: request %s sent (%d bytes)", req_id, fut.result().bytes)
                del self._finishing[req_id]
                self._finished_seen.discard(req_id)
                sending.add(req_id)
        for req_id, fut in list(self._storing.items()):
            if fut.done():
                if fut.exception() is not None:
                    log.warning("request %s: pool store failed (%s)", req_id, fut.exception())
                del self._storing[req_id]
                sending.add(req_id)
        for req_id, fut in list(self._loading.items()):
            if fut.done():
                del self._loading[req_id]
                recving.add(req_id)
                if fut.exception() is not None:
                    log.error("request %s: load failed, vLLM recomputes it (%s)", req_id, fut.exception())
                    failed.add(req_id)
        return sending, recving, failed

    def close(self) -> None:
        try:
            self._run(self.prefill.close(), 10)
            self._run(self.decode.close(), 10)
        except KvlinkError as exc:
            log.warning("closing: %s", exc)
        finally:
            stop_loop(self._loop, self._thread, 5)
