#!/usr/bin/env bash
# Build cbn's wheel, install it into a fresh virtual environment and run the
# test suite against the installed package (not the source tree).
#
#   bash tests/run.sh [pytest arguments]
#
# PYTHON picks the interpreter (default python3); CBN_VENV the environment
# (default .venv, recreated); CBN_TEST_TORCH=0 skips installing PyTorch, whose
# live-oracle tests then skip (the stored golden vectors still run).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CBN_VENV:-$root/.venv}"

rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip build

# a stale build/ could hold objects built with other flags (CBN_OPENMP)
rm -rf "$root/build" "$root"/wheels/cbn-*.whl
"$py" -m build --wheel --outdir "$root/wheels" "$root"
wheel=$(ls "$root"/wheels/cbn-*.whl)
# mpich: the MPI library for mpi4py (cbn[mpi]) where the machine has none
"$py" -m pip install -q "$wheel[test,demo,mpi,dask]" mpich
if [ "${CBN_TEST_TORCH:-1}" != 0 ]; then
    # the CPU build on this project's machines; elsewhere pip picks its default build
    "$py" -m pip install -q torch==2.13.0
fi

# From inside tests/, `import cbn` finds the installed wheel, not ../cbn.
cd "$root/tests"
exec "$py" -m pytest "$@"
