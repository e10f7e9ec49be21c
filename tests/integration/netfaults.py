"""A real TCP proxy on loopback that injects faults into kvlink traffic (sender -> receiver).

It forwards bytes both ways. In the sender-to-receiver direction it follows frame boundaries
(48-byte header, then ``length`` body bytes) so it can flip one bit inside the body of the N-th
DATA frame, and it can cut every connection once a byte budget has passed.
"""

from __future__ import annotations

import asyncio

from kvlink.transport.frame import HEADER_SIZE, FrameType, parse_header


class FaultProxy:
    def __init__(self, target_port: int, kill_after: int | None = None, corrupt_data_frame: int | None = None,
                 cut_data_frame: int | None = None, corrupt_resend_of_cut: bool = False):
        self.target_port = target_port
        self.cut_data_frame = cut_data_frame  # forward half of this DATA frame's body, then cut all
        # flip a bit early in the body of the cut frame's resend (in the half that got through)
        self.corrupt_resend_of_cut = corrupt_resend_of_cut
        self._cut_key: tuple | None = None
        self.kill_after = kill_after
        self.corrupt_data_frame = corrupt_data_frame
        self.forwarded = 0
        self.killed = 0
        self.corrupted = 0
        self.data_frames = 0
        self.largest_data_frame = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._forward_frames(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            w.transport.abort()

    async def _pipe(self, reader, writer) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()

    async def _forward_frames(self, reader, writer) -> None:
        while True:
            head = await reader.readexactly(HEADER_SIZE)
            header = parse_header(head, 1 << 30)
            body = bytearray(await reader.readexactly(header.length)) if header.length else bytearray()
            if header.type is FrameType.DATA and header.length:
                self.data_frames += 1
                self.largest_data_frame = max(self.largest_data_frame, header.length)
                if self.corrupt_data_frame is not None and self.data_frames == self.corrupt_data_frame:
                    body[len(body) // 2] ^= 0x10
                    self.corrupted += 1
                key = (header.transfer_id, header.stream, header.offset)
                if self.corrupt_resend_of_cut and key == self._cut_key:
                    body[len(body) // 8] ^= 0x10
                    self.corrupted += 1
                    self._cut_key = None
                if self.cut_data_frame is not None and self.data_frames == self.cut_data_frame:
                    self._cut_key = key
                    writer.write(head + body[: len(body) // 2])
                    await writer.drain()
                    self.killed += 1
                    for w in list(self._writers):
                        w.transport.abort()
                    return
            writer.write(head + body)
            await writer.drain()
            self.forwarded += len(head) + len(body)
            if self.kill_after is not None and self.forwarded >= self.kill_after and not self.killed:
                self.killed += 1
                for w in list(self._writers):
                    w.transport.abort()
                return
