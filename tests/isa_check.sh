#!/usr/bin/env bash
# Agreement across instruction sets: cbn's kernels built for one instruction set each
# (no target_clones), compared bit for bit with the installed build (tests/isa_check.py).
# Instruction sets this CPU lacks are skipped.  x86-64 Linux only.
#
#   bash tests/isa_check.sh        (after tests/run.sh, whose .venv holds the installed wheel)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="$root/build/isa"
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
    echo "isa_check: x86-64 Linux only, skipped"
    exit 0
fi
"$py" -m pip install -q "setuptools>=77" "Cython>=3"
rm -rf "$out"
builds=()
for isa in baseline avx2 avx512f; do
    if [ "$isa" != baseline ] && ! grep -qw "$isa" /proc/cpuinfo; then
        echo "isa_check: this CPU has no $isa, skipped"
        continue
    fi
    flags="-DCBN_NO_CLONES"
    [ "$isa" != baseline ] && flags="$flags -m$isa"
    rm -rf "$root/build/lib."* "$root/build/temp."*
    CFLAGS="$flags" "$py" -m pip install -q --no-build-isolation --no-deps --no-cache-dir --target "$out/$isa" "$root"
    builds+=("$out/$isa")
done
rm -rf "$root/build/lib."* "$root/build/temp."*  # these objects must not end up in a release wheel
cd "$root/tests"
"$py" isa_check.py "${builds[@]}"
