#!/usr/bin/env bash
# One prepared run on a lent GPU machine (16 cores): CUDA/Triton tests, the GPU benchmark, then the
# transfer and pool benchmarks, whose speed goals a 2-core VM cannot judge fairly.
# Usage there: bash benchmarks/device_check.sh [all|cpu]  (wheels for missing packages in .whl/, results in $OUT)
set -u
OUT=${OUT:-/tmp/kvlink-device}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export KVLINK_BUILD_DIR=/tmp/kvlink-build PYTHONUNBUFFERED=1
echo "cores: $(nproc)"; uname -r
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${1:-all}" = "all" ]; then
time timeout 200 python3 -c "from kvlink.ops import native; native.cuda_ext(); print('cuda extension built')" 2>&1 | tail -5
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_ops.py tests/unit/test_serde_roundtrip.py tests/unit/test_device_digest.py \
  -o addopts="" 2>&1 | tee "$OUT/pytest.txt" | tail -8
timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/unit/test_pool_slab.py tests/integration/test_pool_tiers.py \
  -o addopts="" 2>&1 | tee "$OUT/pytest_pool_cuda.txt" | tail -4
timeout 90 python3 benchmarks/gpu.py --json > "$OUT/gpu_bench.json" 2>&1; tail -c 1500 "$OUT/gpu_bench.json"; echo
fi
timeout 200 python3 benchmarks/transfer.py --repeat 5 --json > "$OUT/transfer.json" 2>&1; tail -c 1500 "$OUT/transfer.json"; echo
mkdir -p /tmp/kvlink-poolbench; timeout 120 python3 benchmarks/pool.py --json --dir /tmp/kvlink-poolbench > "$OUT/pool.json" 2>&1; tail -c 2000 "$OUT/pool.json"; echo
