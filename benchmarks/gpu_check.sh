#!/usr/bin/env bash
# One prepared run on a lent GPU machine: CUDA/Triton tests, then the GPU benchmark.
# Usage there: bash benchmarks/gpu_check.sh  (wheels for missing packages in .whl/, results in $OUT)
set -u
OUT=${OUT:-/tmp/kvlink-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export KVLINK_BUILD_DIR=/tmp/kvlink-build PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
time python3 -c "from kvlink.ops import native; native.cuda_ext(); print('cuda extension built')" 2>&1 | tail -5
python3 -m pytest -q -p no:cacheprovider tests/unit/test_ops.py tests/unit/test_serde_roundtrip.py \
  -o addopts="" 2>&1 | tee "$OUT/pytest.txt" | tail -15
python3 benchmarks/gpu.py --json 2>&1 | tee "$OUT/gpu_bench.json"
