"""The protocol of the peers' runner scripts: one JSON command per line on stdin, one JSON reply
line per command on stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "trace": ...}``).

Standard library only: each runner imports it inside its peer's venv. Importing it sends anything
else written to stdout (the peers' own logs) to stderr, off the reply channel.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Callable

_OUT = sys.stdout
sys.stdout = sys.stderr


def reply(**kw) -> None:
    _OUT.write(json.dumps(kw) + "\n")
    _OUT.flush()


def serve(handle: Callable[[dict], dict | None]) -> int:
    """Answer commands until ``quit`` or the end of stdin. ``handle(cmd)`` returns the reply's
    fields, or None for an op it does not know; what it raises is reported to the parent, which
    skips the peer with the reason."""
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            fields = handle(cmd)
            if fields is None:
                reply(ok=False, error=f"unknown op {op!r}")
                continue
            reply(ok=True, **fields)
        except Exception as exc:
            reply(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
            continue
        if op == "quit":
            return 0
    return 0
