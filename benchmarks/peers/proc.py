"""Peer runner processes: each peer runs in its own venv (made by setup.sh) and answers JSON lines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path

from kvlink.errors import KvlinkError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PEERS_DIR = Path(os.environ.get("KVLINK_PEERS_DIR", ROOT / ".peers"))  # where setup.sh put the venvs
VENVS = {"lmcache": "lmcache", "mooncake": "mooncake"}


class PeerSetupMissing(KvlinkError):
    """A peer's venv is missing or incomplete: run ``bash benchmarks/peers/setup.sh`` first.
    Raised by :func:`python_of` (the benchmark exits non-zero with this message)."""


class PeerFailed(KvlinkError):
    """A peer runner answered an error, died or did not answer in time (the peer is skipped
    with this reason). Raised by :meth:`Runner.call`."""


def python_of(peer: str) -> Path:
    """The interpreter of ``peer``'s venv; raises :class:`PeerSetupMissing` when setup.sh has not
    made it (or its marker file, written last, is absent)."""
    venv = PEERS_DIR / VENVS[peer]
    py, marker = venv / "bin" / "python", venv / ".kvlink-peer-ready"
    if not py.exists() or not marker.exists():
        raise PeerSetupMissing(f"peer {peer!r} is not set up ({venv} has no ready venv): "
                               f"run `bash benchmarks/peers/setup.sh` first")
    return py


class Runner:
    """A runner script in a peer's venv, driven one JSON command at a time."""

    def __init__(self, peer: str, script: str, args: tuple = (), env: dict | None = None, log=None):
        self.name = f"{peer}:{script}"
        self.log_name = getattr(log, "name", None)
        environ = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        environ.pop("PYTHONPATH", None)  # nothing of kvlink's venv leaks into the peer's
        self.proc = subprocess.Popen([str(python_of(peer)), str(HERE / script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True, env=environ)
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._replies.put(json.loads(line))
            except ValueError:
                continue
        self._replies.put(None)  # end of output: the runner died

    def call(self, op: str, timeout: float = 300.0, **kw) -> dict:
        """Send one command and return its reply; raises :class:`PeerFailed` on an error reply,
        a dead runner or no reply within ``timeout`` seconds."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise PeerFailed(f"{self.name}: cannot send {op} ({exc}; runner exit code {self._code()})"
                             f"{self._see()}") from None
        try:
            got = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()  # a late reply would answer the next command
            self.proc.wait()
            raise PeerFailed(f"{self.name}: no reply to {op} within {timeout:.0f} s") from None
        if got is None:
            raise PeerFailed(f"{self.name}: runner exited (code {self._code()}) during {op}{self._see()}")
        if not got.get("ok"):
            raise PeerFailed(f"{self.name}: {op}: {got.get('error')}")
        return got

    def _code(self) -> int | None:
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def _see(self) -> str:
        return f"; its stderr is in {self.log_name}" if self.log_name else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit", timeout=60)
            except PeerFailed:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
