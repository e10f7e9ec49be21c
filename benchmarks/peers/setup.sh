#!/usr/bin/env bash
# Creates the peers' venvs for benchmarks/peers.py (idempotent; prints what it did):
#   $KVLINK_PEERS_DIR/lmcache   LMCache 0.5.6 on CPU torch 2.13.0 (no CUDA wheel is ever pulled:
#                               torch first, then lmcache --no-deps, then only what its CPU
#                               engine and local CPU / disk backends import, under a constraint
#                               that pins torch)
#   $KVLINK_PEERS_DIR/mooncake  mooncake-transfer-engine-non-cuda (needs Debian libibverbs1)
# Default KVLINK_PEERS_DIR: .peers at the repository root (ignored by git).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${KVLINK_PEERS_DIR:-$ROOT/.peers}"
PY="${PEERS_PYTHON:-python3}"
LMCACHE_VERSION=0.5.6
TORCH_VERSION=2.13.0
# What LMCache's engine, token database, LocalCPUBackend and LocalDiskBackend import on CPU
# (its CUDA, cuFile, cloud, Kafka and gRPC extras are left out).
LMCACHE_DEPS=("numpy<=2.2.6" pyyaml msgspec "prometheus_client>=0.18.0,<=0.24.1" psutil py-cpuinfo
              sortedcontainers aiofile aiofiles "pyzmq>=25" safetensors cachetools blake3 nvtx aiohttp
              requests numba "transformers>=5.4" cryptography "setuptools>=77.0.3,<81")
mkdir -p "$DIR"
say() { echo "[peers setup] $*"; }

ready() { [ -f "$1/.kvlink-peer-ready" ] && [ "$(cat "$1/.kvlink-peer-ready")" = "$2" ]; }

# --- LMCache --------------------------------------------------------------------------------
V="$DIR/lmcache"
STAMP="lmcache==$LMCACHE_VERSION torch==$TORCH_VERSION+cpu"
if ready "$V" "$STAMP"; then
  say "lmcache: $V already set up ($STAMP)"
else
  [ -x "$V/bin/python" ] || { say "lmcache: creating venv $V"; "$PY" -m venv "$V"; }
  CONS="$V/constraints.txt"
  echo "torch==$TORCH_VERSION+cpu" > "$CONS"
  say "lmcache: installing torch==$TORCH_VERSION+cpu from local disk (pip's find-links)"
  # --no-index: torch only from a wheel on local disk (PyPI's torch for Linux is a CUDA build,
  # never pulled); then its pure-Python dependencies, with torch pinned by the constraint.
  if ! "$V/bin/pip" install -q --no-index --no-deps "torch==$TORCH_VERSION+cpu"; then
    echo "[peers setup] error: torch $TORCH_VERSION+cpu is not on local disk (pip find-links);" \
         "put the CPU wheel there first: this script never pulls a CUDA torch" >&2
    exit 2
  fi
  "$V/bin/pip" install -q -c "$CONS" "torch==$TORCH_VERSION+cpu"
  "$V/bin/python" -W ignore - <<'EOF'
import torch, sys
if "+cpu" not in torch.__version__ and torch.version.cuda is not None:
    sys.exit(f"a CUDA torch ({torch.__version__}) was installed: refusing to go on")
print(f"[peers setup] lmcache: torch {torch.__version__}")
EOF
  say "lmcache: installing lmcache==$LMCACHE_VERSION --no-deps and its CPU dependencies"
  "$V/bin/pip" install -q -c "$CONS" --no-deps "lmcache==$LMCACHE_VERSION"
  say "lmcache: pip will list the extras left out (CUDA, cuFile, cloud, gRPC, telemetry): expected"
  "$V/bin/pip" install -q -c "$CONS" "${LMCACHE_DEPS[@]}"
  LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 "$V/bin/python" -c "
import lmcache.v1.cache_engine, lmcache.v1.storage_backend.local_cpu_backend, lmcache.v1.storage_backend.local_disk_backend
import lmcache.v1.gpu_connector, torch
assert torch.version.cuda is None, torch.__version__
print('[peers setup] lmcache: imports OK, torch', torch.__version__)" 2>/dev/null
  echo "$STAMP" > "$V/.kvlink-peer-ready"
  say "lmcache: ready"
fi

# --- Mooncake -------------------------------------------------------------------------------
if ! ldconfig -p 2>/dev/null | grep -q "libibverbs.so.1"; then
  if [ "$(id -u)" = 0 ]; then
    say "mooncake: installing Debian libibverbs1"
    apt-get install -y -q libibverbs1 >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libibverbs1 >/dev/null; }
  else
    say "mooncake: libibverbs1 is missing and this is not root: install it (apt-get install libibverbs1)"
  fi
else
  say "mooncake: libibverbs1 present"
fi
V="$DIR/mooncake"
STAMP="mooncake-transfer-engine-non-cuda"
if ready "$V" "$STAMP"; then
  say "mooncake: $V already set up ($("$V/bin/pip" show mooncake-transfer-engine-non-cuda 2>/dev/null | sed -n 's/^Version: //p'))"
else
  [ -x "$V/bin/python" ] || { say "mooncake: creating venv $V"; "$PY" -m venv "$V"; }
  say "mooncake: installing mooncake-transfer-engine-non-cuda"
  "$V/bin/pip" install -q mooncake-transfer-engine-non-cuda
  "$V/bin/python" -c "
from mooncake.engine import TransferEngine
from mooncake.store import MooncakeDistributedStore
print('[peers setup] mooncake: imports OK')"
  echo "$STAMP" > "$V/.kvlink-peer-ready"
  say "mooncake: ready"
fi
say "done: venvs under $DIR"
