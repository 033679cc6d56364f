#!/usr/bin/env bash
# The GPU checks in one go, for a lent GPU machine (the device tool runs it in the repo's
# root): wheels for what its image lacks (.whl, if carried), the GPU tests, then the
# benchmark at real shapes. Everything lands in $OUT (default /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rf 2>&1 \
  | tee "$OUT/test_gpu.log" | tail -40
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_engine.py --out "$OUT/gpu_engine.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/gpu_engine.log" | grep -v '^{' | tail -40
echo done
