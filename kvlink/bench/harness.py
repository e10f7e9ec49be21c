"""Where ``kvlink bench transfer`` runs its two ends: a given receiver, a local subprocess on
loopback, or the link lab (receiver in one namespace, sender in the other)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Callable

from kvlink.errors import ConfigError, TransportError


def _python_cli() -> list[str]:
    return [sys.executable, "-m", "kvlink.cli"]


class SinkProcess:
    """``kvlink transfer serve`` as a subprocess; reads its JSON event lines."""

    def __init__(self, argv: list[str], timeout: float = 60.0):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()
            raise TransportError(f"receiver did not start: {err.strip()[-2000:]}")
        self.listening = json.loads(line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_argv(host: str, arena: str, raw_sink: bool = True) -> list[str]:
    argv = [*_python_cli(), "transfer", "serve", "--host", host, "--port", "0", "--arena", arena]
    return argv + ["--raw-port", "0"] if raw_sink else argv


def _target(host: str, listening: dict, baseline: bool) -> list[str]:
    argv = ["--connect", f"{host}:{listening['port']}"]
    return argv + ["--raw-port", str(listening["raw_port"])] if baseline else argv


def run_local(sender_argv: list[str], arena: str, baseline: bool = True) -> tuple[int, str, list[dict]]:
    """Receiver subprocess on loopback, then the sender (this same CLI) against it."""
    sink = SinkProcess(serve_argv("127.0.0.1", arena, baseline))
    try:
        argv = [*sender_argv, *_target("127.0.0.1", sink.listening, baseline)]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        return proc.returncode, proc.stdout, sink.events
    finally:
        sink.stop()


def run_lab(sender_argv: list[str], arena: str, rate: float, change: tuple[float, float] | None,
            on_change: Callable[[float], None] | None = None, baseline: bool = True) -> tuple[int, str, list[dict]]:
    """Both ends in the link lab; optionally change the link rate ``change=(after_s, new_rate)``."""
    from kvlink.transport.lab import LinkLab

    with LinkLab(rate) as lab:
        sink = SinkProcess(lab.command("b", serve_argv(lab.addr_b, arena, baseline)))
        try:
            argv = lab.command("a", [*sender_argv, *_target(lab.addr_b, sink.listening, baseline)])
            proc = subprocess.Popen([*argv, "--announce-start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            # The sender says on stderr when its transfer starts (after packing): the rate change is
            # timed from there.
            for line in proc.stderr:
                if line.startswith("KVLINK-START"):
                    break
                sys.stderr.write(line)
            drain = threading.Thread(target=lambda: sys.stderr.writelines(proc.stderr), daemon=True)
            drain.start()
            if change is not None:
                after, new_rate = change
                try:
                    proc.wait(after)
                except subprocess.TimeoutExpired:
                    lab.set_rate(new_rate)
                    if on_change is not None:
                        on_change(time.monotonic())
            out = proc.stdout.read()
            proc.wait()
            return proc.returncode, out, sink.events
        finally:
            sink.stop()


def parse_connect(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--connect wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
