"""Mooncake side of benchmarks/peers.py: runs inside .peers/mooncake/bin/python (never imports kvlink).

Roles (argv[1]):

- ``te``: one Transfer Engine over TCP (``P2PHANDSHAKE`` metadata, no etcd), with one registered
  buffer (``size`` bytes, ctypes memory). The target just registers; the initiator fills its
  buffer from ``source`` (the very bytes kvlink sends) and writes it to the target's buffer in
  ``segments`` pieces with ``batch_transfer_sync_write`` (the call Mooncake's KV connectors use).
- ``store``: a Mooncake Store client (``MooncakeDistributedStore.setup`` against a
  ``mooncake_master`` the parent started, TCP). The holder mounts the memory segment that keeps
  the objects (a storage node, as kvlink's daemon holds its pool); the client mounts none and
  moves the bytes with ``batch_put_from`` / ``batch_get_into`` on registered buffers (its
  zero-copy calls), so they cross loopback as kvlink's do.

Protocol: JSON commands on stdin, one JSON reply line each on stdout (``{"ok": ...}``);
Mooncake's logs go to stderr. Digests (blake2b) are computed outside the clock.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
import time

from runner_io import serve  # before Mooncake: what it prints stays off the reply channel


def digest(buf, n: int) -> str:
    return hashlib.blake2b(memoryview(buf)[:n], digest_size=16).hexdigest()


class Te:
    def __init__(self, cmd: dict):
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        rc = self.engine.initialize(cmd.get("host", "127.0.0.1"), "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"TransferEngine.initialize returned {rc}")
        self.size = cmd["size"]
        self.buf = (ctypes.c_char * self.size)()
        self.addr = ctypes.addressof(self.buf)
        rc = self.engine.register_memory(self.addr, self.size)
        if rc != 0:
            raise RuntimeError(f"register_memory returned {rc}")
        if cmd.get("source"):
            with open(cmd["source"], "rb", buffering=0) as f:
                got = f.readinto(memoryview(self.buf))
            if got != self.size:
                raise RuntimeError(f"source holds {got} bytes, expected {self.size}")

    def info(self) -> dict:
        return {"rpc_port": self.engine.get_rpc_port(), "addr": self.addr}

    def write(self, cmd: dict) -> dict:
        target, base, segs = cmd["target"], cmd["peer_addr"], cmd["segments"]
        srcs, dsts, off = [], [], 0
        for n in segs:
            srcs.append(self.addr + off)
            dsts.append(base + off)
            off += n
        t0 = time.perf_counter()
        rc = self.engine.batch_transfer_sync_write(target, srcs, dsts, segs)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"batch_transfer_sync_write returned {rc}")
        return {"seconds": seconds}


class Store:
    def __init__(self, cmd: dict):
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        # local_hostname, metadata_server, global_segment_size, local_buffer_size, protocol,
        # rdma_devices, master_server_address
        rc = self.store.setup(cmd.get("host", "127.0.0.1"), "P2PHANDSHAKE", cmd["segment_bytes"],
                              cmd["buffer_bytes"], "tcp", "", cmd["master"])
        if rc != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
        self.sizes = cmd.get("sizes") or []
        if not self.sizes:  # the holder: its segment keeps the objects, it puts and gets nothing
            return
        self.total = sum(self.sizes)
        self.src = (ctypes.c_char * self.total)()
        self.dst = (ctypes.c_char * self.total)()
        with open(cmd["source"], "rb", buffering=0) as f:
            got = f.readinto(memoryview(self.src))
        if got != self.total:
            raise RuntimeError(f"source holds {got} bytes, expected {self.total}")
        for buf in (self.src, self.dst):
            rc = self.store.register_buffer(ctypes.addressof(buf), self.total)
            if rc != 0:
                raise RuntimeError(f"register_buffer returned {rc}")
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def _ptrs(self, buf) -> list[int]:
        base = ctypes.addressof(buf)
        return [base + o for o in self.offsets]

    def put(self, cmd: dict) -> dict:
        keys = [f"{cmd['prefix']}/{i}" for i in range(len(self.sizes))]
        t0 = time.perf_counter()
        rcs = self.store.batch_put_from(keys, self._ptrs(self.src), self.sizes)
        seconds = time.perf_counter() - t0
        bad = [r for r in rcs if r != 0]
        if bad:
            raise RuntimeError(f"batch_put_from: {len(bad)} of {len(rcs)} failed (first {bad[0]})")
        return {"seconds": seconds}

    def get(self, cmd: dict) -> dict:
        keys = [f"{cmd['prefix']}/{i}" for i in range(len(self.sizes))]
        ctypes.memset(self.dst, 0, self.total)
        t0 = time.perf_counter()
        got = self.store.batch_get_into(keys, self._ptrs(self.dst), self.sizes)
        seconds = time.perf_counter() - t0
        if list(got) != list(self.sizes):
            raise RuntimeError(f"batch_get_into returned sizes {list(got)[:4]}..., expected {self.sizes[:4]}...")
        equal = bytes(memoryview(self.dst)[:4096]) == bytes(memoryview(self.src)[:4096]) and \
            digest(self.dst, self.total) == digest(self.src, self.total)
        return {"seconds": seconds, "equal": equal}

    def remove(self, cmd: dict) -> dict:
        """Remove the key set (force: our get is done; the read lease would keep them 10 s)."""
        keys = [f"{cmd['prefix']}/{i}" for i in range(len(self.sizes))]
        bad = [r for r in self.store.batch_remove(keys, True) if r != 0]
        if bad:
            raise RuntimeError(f"batch_remove: {len(bad)} of {len(keys)} failed (first {bad[0]})")
        return {}


def main() -> int:
    role = sys.argv[1]
    obj = None

    def handle(cmd: dict) -> dict | None:
        nonlocal obj
        op = cmd["op"]
        if op == "open":
            obj = Te(cmd) if role == "te" else Store(cmd)
            import importlib.metadata as md
            version = md.version("mooncake-transfer-engine-non-cuda")
            return dict(version=version, **(obj.info() if role == "te" else {}))
        if op == "digest":
            return dict(digest=digest(obj.buf, obj.size))
        if op == "zero":
            ctypes.memset(obj.buf, 0, obj.size)
            return {}
        if op in ("write", "put", "get", "remove"):
            return getattr(obj, op)(cmd)
        if op == "quit":
            return {}
        return None

    return serve(handle)


if __name__ == "__main__":
    sys.exit(main())
