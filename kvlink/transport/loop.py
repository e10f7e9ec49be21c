"""Running kvlink's asyncio code: uvloop when installed (faster sockets), asyncio otherwise."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

from kvlink.errors import TransferTimeout


def run(main: Coroutine[Any, Any, Any], use_uvloop: bool = True) -> Any:
    """``asyncio.run(main)``, on uvloop's event loop when it is installed and wanted."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A new event loop (uvloop's when installed and wanted), for a loop run in its own thread."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_sync(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> Any:
    """Run ``coro`` on ``loop`` (another thread's) and wait for its result. Raises
    :class:`~kvlink.errors.TransferTimeout` (and cancels it) when ``timeout`` passes first."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except TimeoutError:  # concurrent.futures.TimeoutError is the builtin one since 3.11
        if not future.done():
            future.cancel()
            raise TransferTimeout(f"no result within {timeout} s") from None
        raise


def stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, timeout: float | None = None) -> None:
    """Stop ``loop`` (run forever by ``thread``), join the thread and close the loop: what a sync
    wrapper does at close and when its construction fails, so no thread outlives it."""
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
    if not thread.is_alive():
        loop.close()
