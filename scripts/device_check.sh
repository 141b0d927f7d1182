#!/usr/bin/env bash
# The jnp path on a GPU (kvjax's CPU kernels do not run there): the
# device-agnostic tests, then decode attention against dense baselines.
#
#   OUT=/tmp/gpu scripts/device_check.sh      # on a machine with a GPU
#
# Runs from the source tree with the machine's own jax (no install, no C++
# build). Writes pytest.log, bench.log and attend_gpu.json to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvjax_device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, kvjax; print('jax', jax.__version__, jax.devices()); \
assert jax.default_backend() == 'gpu', 'no GPU'; print(kvjax.backend_info())" || exit 1
# Tests that hold on every device (the C++ kernel, demo and sharding tests
# need the CPU build or the model weights).
timeout "${TEST_S:-270}" python3 -m pytest -q -p no:cacheprovider --maxprocesses=6 -n 6 \
  tests/test_affine.py tests/test_attend.py tests/test_cache_model.py \
  tests/test_layers_and_files.py tests/test_memory.py tests/test_nonfinite_property.py \
  tests/test_paged.py tests/test_reliability.py tests/test_spec_and_stats.py \
  tests/test_transforms.py tests/test_turbo.py 2>&1 | tee "$OUT/pytest.log"
timeout "${BENCH_S:-200}" python3 benchmarks/bench_attend.py --contexts 8192,32768,131072 \
  --formats f32,bf16,q8,q4,turbo4,turbo3.5 --rounds 5 2>&1 | tee "$OUT/bench.log"
cp benchmarks/results/attend.json "$OUT/attend_gpu.json" 2>/dev/null
nvidia-smi --query-gpu=clocks.sm,clocks.mem,memory.used --format=csv,noheader
