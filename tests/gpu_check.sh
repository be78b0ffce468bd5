#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA device where CuPy, PyTorch,
# Cython, NumPy, pytest and nvcc are already installed (no network needed):
# build cbn from this tree, run the GPU tests, run the GPU benchmark.
# Logs and the benchmark's JSON go to $OUT (default: ./gpu_out).
#   bash tests/gpu_check.sh [prebuilt wheels to fall back on...]
# CBN_INPLACE=1: use the tree itself, with the extension already built in place
# for that machine's Python (setup.py build_ext --inplace, carried along), which
# saves the minute a build there takes out of the device time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-gpu_out}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c "import sys, cupy, numpy, torch; print(sys.version.split()[0], 'cupy', cupy.__version__,
        'numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/machine.txt"

if [ -n "${CBN_INPLACE:-}" ] && PYTHONPATH=$PWD $py -c "import cbn" >"$out/build.txt" 2>&1; then
    export PYTHONPATH=$PWD
elif ! $py -m pip install --no-build-isolation --no-deps -q . >"$out/build.txt" 2>&1; then
    echo "build from source failed (see build.txt); installing a prebuilt wheel: $*"
    $py -m pip install --no-deps -q "$@" || exit 1
fi
(cd /tmp && $py -m cbn info) 2>&1 | tee -a "$out/machine.txt"

echo "[${SECONDS}s] tests"
(cd tests && timeout 300 $py -m pytest -q -p no:cacheprovider --tb=short --maxfail=25 test_gpu.py test_cuda.py) 2>&1 \
    | tee "$out/tests.txt"
tests=${PIPESTATUS[0]}

echo "[${SECONDS}s] profile"
(cd /tmp && timeout 120 $py "$OLDPWD/tests/gpu_profile.py") 2>&1 | tee "$out/profile.txt"

echo "[${SECONDS}s] bench"
(cd /tmp && timeout 240 $py -m cbn bench --device gpu --json "$out/bench.json") 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "[${SECONDS}s] tests exit $tests, bench exit $bench"
exit $((tests || bench))
