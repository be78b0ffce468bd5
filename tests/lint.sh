#!/usr/bin/env bash
# Lint, as CI runs it: ruff (Python), cython-lint (the .pyx and .pxi), mypy (the package
# and the compiled module's stubs), and mypy's stubtest of cbn/_kernels.pyi
# against an installed build of the kernels.
#
#   bash tests/lint.sh [WHEEL]   # stubtest installs WHEEL; without one it is skipped
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/build/lint"
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q ruff==0.17.6 cython-lint==0.22.1 mypy==2.4.1 numpy pyyaml
export PATH="$venv/bin:$PATH"  # cython-lint runs pycodestyle from PATH
cd "$root"
ruff check .
cython-lint cbn/_kernels.pyx cbn/_plain.pxi
mypy  # files and settings: [tool.mypy] in pyproject.toml
python - <<'PY'
# the hosted workflows: valid YAML, jobs with steps, and only public actions at pinned versions
import pathlib, re, yaml
PUBLIC = re.compile(r"(actions/(checkout|setup-python|upload-artifact|download-artifact)|pypa/cibuildwheel)@v[\d.]+")
for path in sorted(pathlib.Path(".github/workflows").glob("*.yml")):
    doc = yaml.safe_load(path.read_text())
    assert doc.get("jobs"), f"{path}: no jobs"
    for name, job in doc["jobs"].items():
        assert job.get("steps"), f"{path}: job {name} has no steps"
        for step in job["steps"]:
            uses = step.get("uses")
            assert uses is None or PUBLIC.fullmatch(uses), f"{path}: job {name} uses {uses!r}"
    print(f"{path}: {len(doc['jobs'])} jobs, valid")
PY
if [ $# -gt 0 ]; then
    python -m pip install -q --no-deps --force-reinstall "$1"
    (cd /tmp && python -m mypy.stubtest cbn._kernels)
else
    echo "lint: no wheel given, stubtest of cbn._kernels skipped"
fi
echo "lint: clean"
