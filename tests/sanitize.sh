#!/usr/bin/env bash
# The test suite under AddressSanitizer and UndefinedBehaviorSanitizer: cbn is
# built with -fsanitize=address,undefined into build/sanitize (a venv), the
# sanitizer runtimes are preloaded into Python, and any report fails the run.
#
#   bash tests/sanitize.sh [pytest arguments]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/build/sanitize"
rm -rf "$venv" "$root/build/lib."* "$root/build/temp."*
"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q "setuptools>=77" "Cython>=3" numpy pytest threadpoolctl

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    "$py" -m pip install -q --no-build-isolation --no-deps --no-cache-dir "$root"
rm -rf "$root/build/lib."* "$root/build/temp."*  # sanitized objects must not end up in a release wheel

# Python itself is not built with ASan: preload the runtimes, ignore CPython's
# own allocations at exit (leak checking is the memory tests' job), stop at the
# first report.
cc=${CC:-gcc}
export LD_PRELOAD="$($cc -print-file-name=libasan.so):$($cc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONMALLOC=malloc  # every Python allocation through ASan's malloc
export CBN_SANITIZED=1  # tests that measure memory skip: ASan's quarantine holds freed memory

cd "$root/tests"
"$py" -m pytest -q -p no:cacheprovider "$@"
echo "sanitizers: no report"
