"""Running kvlink's asyncio code: uvloop when installed (faster sockets), asyncio otherwise."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


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
