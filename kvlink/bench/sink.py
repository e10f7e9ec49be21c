"""``kvlink transfer serve``: a receiver for transfer benchmarks and link tests.

It receives transfers into a preallocated arena, verifies every part that is a kvlink payload
against its segment checksums as it lands (unless ``--no-verify``) and prints one JSON line per
event. With ``raw_port`` it also runs the physical baseline's sink: plain blocking
sockets doing ``recv_into`` into a preallocated buffer, one thread per connection (and, when the
sender asks, an xxh3 of each piece as it lands: the cheapest integrity check there is).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import threading

from kvlink.codec.checksum import checksum_stream
from kvlink.config import TransportConfig
from kvlink.errors import KvlinkError
from kvlink.presets import PRESETS, get_preset
from kvlink.serde.payload import PayloadScan, payload_intact
from kvlink.serde.staging import StagingArena
from kvlink.transport.parts import arena_allocator
from kvlink.transport.receiver import TransferServer

RAW_HEADER = struct.Struct("<QQQ")  # offset, length within the sink buffer, flags
RAW_HASH = 1  # flag: hash the bytes as they land and reply with their xxh3
RAW_REPLY = struct.Struct("<Q")  # the xxh3 of the bytes received (0 unless RAW_HASH)


def emit(event: dict, out=None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(event) + "\n")
    out.flush()


class RawSink:
    """Baseline receiver: each connection sends (offset, length, flags) then that many bytes; we
    reply with :data:`RAW_REPLY` (their xxh3 with :data:`RAW_HASH`, else 0)."""

    def __init__(self, host: str, port: int, buffer: memoryview):
        self.buffer = buffer
        self.sock = socket.create_server((host, port), backlog=64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting (connections being served end when their peers close)."""
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = bytearray(RAW_HEADER.size)
                if not _recv_exact(conn, memoryview(head)):
                    return
                offset, length, flags = RAW_HEADER.unpack(head)
                if offset + length > len(self.buffer):
                    return
                hasher = checksum_stream() if flags & RAW_HASH else None
                if not _recv_exact(conn, self.buffer[offset: offset + length], hasher):
                    return
                conn.sendall(RAW_REPLY.pack(hasher.intdigest() if hasher is not None else 0))


def _recv_exact(conn: socket.socket, view: memoryview, hasher=None) -> bool:
    """Fill ``view``; with ``hasher``, hash each piece right after it lands (still in cache)."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        if hasher is not None:
            hasher.update(view[got: got + n])
        got += n
    return True


async def serve(host: str, port: int, raw_port: int | None, arena_bytes: int, config: TransportConfig,
                secret: bytes | None, max_transfers: int | None = None, verify: bool = True, ssl=None) -> None:
    arena = StagingArena(arena_bytes, pin=False)
    fingerprints = [get_preset(name).fingerprint for name in PRESETS]
    # Model payloads carry their own checksums: the server verifies each part with them (inside the
    # timed transfer), and senders on the default setting skip per-chunk hashing.
    server = TransferServer(config, fingerprints, secret=secret, allocator=arena_allocator(arena),
                            part_verifier=payload_intact if verify else None, part_scanner=PayloadScan, ssl=ssl)
    bound = await server.start(host, port)
    sink = None
    if raw_port is not None:
        sink = RawSink(host, raw_port, memoryview(StagingArena(arena_bytes, pin=False).buffer.numpy()))
    emit({"event": "listening", "host": bound[0], "port": bound[1], "raw_port": sink.port if sink else None})
    served, finishing = 0, set()
    try:
        while max_transfers is None or served < max_transfers:
            incoming = await server.accept()
            task = asyncio.create_task(_finish(incoming, verify))
            finishing.add(task)
            task.add_done_callback(finishing.discard)
            served += 1
        await asyncio.gather(*finishing)
    finally:
        await server.close()


async def _finish(incoming, verify: bool) -> None:
    event = {"event": "transfer", "id": f"{incoming.transfer_id:#x}", "parts": incoming.num_parts,
             "meta": incoming.meta}
    try:
        parts = await incoming.done()
        seconds = incoming.finished - incoming.started
        nbytes = sum(len(p) for p in parts)
        event.update(bytes=nbytes, seconds=round(seconds, 6), gbps=round(nbytes * 8 / max(seconds, 1e-9) / 1e9, 4))
        event.update(verified=verify)  # per chunk (xxh3 frames) or per part (payload checksums)
    except KvlinkError as exc:
        event.update(error=type(exc).__name__, message=str(exc))
    finally:
        incoming.release()
    emit(event)
