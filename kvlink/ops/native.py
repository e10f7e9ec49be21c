"""On-demand builds of ``csrc/``: the CPU row copier, fused copy-and-hash runs and hashed socket
landings (plain C through ctypes, with the vendored xxHash header) and the CUDA extension.

Each is built once per machine into the build directory (``KVLINK_BUILD_DIR``) keyed by a hash of
its source, then loaded once per process. A missing compiler or CUDA makes the backend unavailable;
callers then fall back to the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kvlink.config import OpsConfig
from kvlink.errors import BackendUnavailable

# csrc/ sits beside the package in a source checkout (the Makefile installs kvlink editable).
CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
_lock = threading.Lock()
_cpu_lib: ctypes.CDLL | None = None
_cpu_error: str | None = None
_cuda_mod = None
_cuda_error: str | None = None


def _source(rel: str) -> Path:
    if (CSRC / rel).exists():
        return CSRC / rel
    raise BackendUnavailable(f"csrc/{rel} not found: native backends need a source checkout")


CPU_SOURCES = ("cpu/rows.c", "cpu/runs.c", "cpu/landing.c")
CPU_HEADERS = ("third_party/xxhash/xxhash.h", "cpu/stream_copy.h")


def _cpu_flags() -> str:
    """The CPU's feature flags: part of the build key, as the library is built for this CPU
    (``-march=native``) and a build directory may be shared by machines of different kinds."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def _build_cpu(config: OpsConfig) -> ctypes.CDLL:
    srcs = [_source(rel) for rel in CPU_SOURCES]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in srcs + [_source(h) for h in CPU_HEADERS]))
    key.update(_cpu_flags().encode())
    target = config.build_dir / f"kvlink_cpu_{key.hexdigest()[:16]}.so"
    if not target.exists():
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None:
            raise BackendUnavailable("no C compiler found for the native CPU backend")
        config.build_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=config.build_dir)
        os.close(fd)
        errors = []
        # -march=native lets xxh3 and the streaming copy use AVX2/AVX-512; a compiler without it
        # (or another architecture) builds the portable code.
        for arch in (["-march=native"], []):
            proc = subprocess.run([cc, "-O3", *arch, "-fopenmp", "-shared", "-fPIC", *map(str, srcs), "-o", tmp],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
            errors.append(proc.stderr.strip()[:500])
        else:
            os.unlink(tmp)
            raise BackendUnavailable(f"building {', '.join(CPU_SOURCES)} failed: {errors[-1]}")
        os.replace(tmp, target)  # atomic: concurrent builders never see half a library
    lib = ctypes.CDLL(str(target))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    for name in ("kvlink_gather_rows", "kvlink_scatter_rows"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.kvlink_copy_runs.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.kvlink_copy_runs.restype = None
    lib.kvlink_plane_runs.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_int]
    lib.kvlink_plane_runs.restype = None
    lib.kvlink_xxh3.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.kvlink_xxh3.restype = ctypes.c_uint64
    for name in ("kvlink_xxh3_state_size", "kvlink_xxh3_state_align"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int64
    lib.kvlink_xxh3_reset.argtypes = [ctypes.c_void_p]
    lib.kvlink_xxh3_reset.restype = None
    lib.kvlink_xxh3_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.kvlink_xxh3_update.restype = None
    lib.kvlink_xxh3_digest.argtypes = [ctypes.c_void_p]
    lib.kvlink_xxh3_digest.restype = ctypes.c_uint64
    lib.kvlink_recv_land.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_void_p]
    lib.kvlink_recv_land.restype = ctypes.c_int64
    return lib


def cpu_lib_loaded() -> bool:
    """Whether the CPU library is loaded in this process already (never builds or waits)."""
    return _cpu_lib is not None


def cpu_lib(config: OpsConfig | None = None) -> ctypes.CDLL:
    """The loaded CPU library; raises :class:`BackendUnavailable` if it cannot be built."""
    global _cpu_lib, _cpu_error
    with _lock:
        if _cpu_lib is None and _cpu_error is None:
            try:
                _cpu_lib = _build_cpu(config or OpsConfig.from_env())
            except (BackendUnavailable, OSError) as exc:
                _cpu_error = str(exc)
        if _cpu_lib is None:
            raise BackendUnavailable(_cpu_error or "native CPU backend unavailable")
        return _cpu_lib


def cuda_ext(config: OpsConfig | None = None):
    """The CUDA extension, built with torch's extension builder on first use where CUDA exists."""
    global _cuda_mod, _cuda_error
    with _lock:
        if _cuda_mod is None and _cuda_error is None:
            if not torch.cuda.is_available():
                _cuda_error = "CUDA is not available on this machine"
            else:
                try:
                    from torch.utils.cpp_extension import load

                    config = config or OpsConfig.from_env()
                    build = config.build_dir / "cuda_rows"
                    build.mkdir(parents=True, exist_ok=True)
                    _cuda_mod = load(name="kvlink_cuda_rows", sources=[str(_source("cuda/rows.cu"))],
                                     build_directory=str(build), extra_cuda_cflags=["-O3"], verbose=False)
                except Exception as exc:  # the builder raises many types; report them all the same way
                    _cuda_error = f"building the CUDA extension failed: {exc}"
        if _cuda_mod is None:
            raise BackendUnavailable(_cuda_error or "CUDA backend unavailable")
        return _cuda_mod


def cpu_gather_rows(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    es = rows.element_size()
    cpu_lib().kvlink_gather_rows(rows.data_ptr(), rows.stride(0) * es, ids.data_ptr(), ids.numel(),
                                 out.data_ptr(), out.shape[1] * es)


def cpu_scatter_rows(packed: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    es = rows.element_size()
    cpu_lib().kvlink_scatter_rows(packed.data_ptr(), packed.shape[1] * es, ids.data_ptr(), ids.numel(),
                                  rows.data_ptr(), rows.stride(0) * es)
