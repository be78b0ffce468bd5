"""cbn's local release matrix: build, repair and test a wheel for every CPython on this machine.

    python3 wheels/matrix.py

From the sdist (which must hold everything a build needs), a wheel for each
CPython 3.10-3.13 found under ``$(pyenv root)/versions`` (or as ``pythonX.Y``
on PATH; a missing one is reported, not skipped silently), repaired to a
manylinux tag by ``auditwheel repair`` (libgomp bundled) into ``wheels/``.
Each is installed into a fresh virtual environment of its Python and tested
from ``tests/``: the full suite for the Python running this script, the
reference-agreement, gradient and error tests for the others.  Then the same
tests with the oldest NumPy that cbn declares (on the oldest Python) and with
a build without OpenMP (``CBN_OPENMP=0``).  Work files go to ``build/matrix/``.
Prints a summary table; exits 1 when a row failed or a Python is missing.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "matrix"
WHEELS = ROOT / "wheels"
VERSIONS = ("3.10", "3.11", "3.12", "3.13")
SUBSET = ["test_reference.py", "test_gradients.py", "test_errors.py"]
SDIST_MUST_HOLD = [
    "setup.py", "pyproject.toml", "README.md", "LICENSE", "cbn/__init__.py", "cbn/_kernels.pyx", "cbn/_kernels.pyi",
    "cbn/py.typed", "cbn/cuda/batch_norm.cu", "src_c/cbn_loops.h", "src_c/cbn_loops_t.h", "src_c/cbn_openmp.h",
    "tests/test_reference.py", "tests/conftest.py", "tests/helpers.py",
]


def log_path(name):
    return WORK / "logs" / f"{name}.log"


def run(cmd, name, env=None, cwd=None):
    """Run ``cmd`` with its output in build/matrix/logs/<name>.log; True when it succeeded."""
    path = log_path(name)
    start = time.perf_counter()
    with open(path, "w") as log:
        result = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    ok = result.returncode == 0
    print(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    if not ok:
        print("       " + "\n       ".join(path.read_text().splitlines()[-15:]))
    return ok


def find_python(version):
    """The newest pyenv CPython ``version``, else ``pythonX.Y`` on PATH, else None."""
    root = os.environ.get("PYENV_ROOT") or pathlib.Path.home() / ".pyenv"
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() or root
    found = [p for p in pathlib.Path(root, "versions").glob(f"{version}.*")
             if re.fullmatch(rf"{re.escape(version)}\.\d+", p.name) and (p / "bin" / "python3").exists()]
    if found:
        newest = max(found, key=lambda p: int(p.name.rsplit(".", 1)[1]))
        return newest / "bin" / "python3"
    on_path = shutil.which(f"python{version}")
    return pathlib.Path(on_path) if on_path else None


def oldest_numpy():
    """The NumPy floor of the project's dependencies, as a pip requirement of that release series."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    floor = next(re.fullmatch(r"numpy>=([\d.]+)", d.replace(" ", "")).group(1) for d in deps if d.startswith("numpy"))
    return f"numpy=={floor}.*" if floor.count(".") == 1 else f"numpy=={floor}"


def build_sdist(tools):
    dist = WORK / "dist"
    if not run([tools / "python", "-m", "build", "--sdist", "--outdir", dist, ROOT], "sdist"):
        return None
    sdist = next(dist.glob("cbn-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [m for m in SDIST_MUST_HOLD if m not in names]
    verdict = "ok   sdist holds what a build needs" if not missing else f"FAIL sdist lacks {missing}"
    print(f"  {verdict}")
    return None if missing else sdist


def build_wheel(python, sdist, label, tools, env=None, into=WHEELS):
    """A wheel of ``sdist`` built by ``python``, repaired by auditwheel into ``into``; its path or None."""
    raw = WORK / f"raw-{label}"
    shutil.rmtree(raw, ignore_errors=True)
    # --no-cache-dir: pip would otherwise reuse a wheel it built from the same sdist with other settings
    if not run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", raw, sdist], f"build-{label}",
               env=env):
        return None
    built = next(raw.glob("cbn-*.whl"))
    python_tag = built.name.split("-")[2]
    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob(f"cbn-*-{python_tag}-*.whl"):  # an earlier run's wheel for this Python
        old.unlink()
    path = {"PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}  # auditwheel runs patchelf from PATH
    if not run([tools / "auditwheel", "repair", "-w", into, built], f"repair-{label}", env=path):
        return None
    return next(into.glob(f"cbn-*-{python_tag}-*.whl"))


def test_wheel(python, wheel, label, tests, extras="test", numpy=None, torch=False):
    """Install ``wheel`` in a fresh venv of ``python`` and run ``tests``; a summary row."""
    row = {"build": label, "python": "", "numpy": "", "openmp": "", "tag": "-".join(wheel.name[:-4].split("-")[2:]),
           "tests": "", "ok": False}
    venv = WORK / f"venv-{label}"
    shutil.rmtree(venv, ignore_errors=True)
    py = venv / "bin" / "python"
    steps = [[python, "-m", "venv", venv], [py, "-m", "pip", "install", "-q", f"{wheel}[{extras}]"]]
    if numpy:
        steps.append([py, "-m", "pip", "install", "-q", numpy])
    if torch:
        steps.append([py, "-m", "pip", "install", "-q", "torch==2.13.0"])
    for i, step in enumerate(steps):
        if not run(step, f"install-{label}-{i}"):
            return row
    probe = ("import platform, numpy, cbn; c = cbn.show_config(mode='dicts');"
             "print(platform.python_version(), numpy.__version__, 'on' if c['openmp'] else 'off')")
    info = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=WORK).stdout.split()
    if len(info) == 3:
        row.update(python=info[0], numpy=info[1], openmp=info[2])
    junit = WORK / f"junit-{label}.xml"
    ok = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests], f"tests-{label}",
             cwd=ROOT / "tests")
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
        skipped = int(suite.get("skipped"))
        row["tests"] = f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"
    row["ok"] = ok
    return row


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "logs").mkdir(parents=True)
    rows, problems = [], []
    print(f"cbn release matrix (logs in {WORK / 'logs'})", flush=True)

    tools = WORK / "tools" / "bin"
    if not (run([sys.executable, "-m", "venv", WORK / "tools"], "tools-venv")
            and run([tools / "python", "-m", "pip", "install", "-q", "build", "auditwheel", "patchelf"], "tools")):
        sys.exit("matrix: could not install build and auditwheel")
    sdist = build_sdist(tools)
    if sdist is None:
        sys.exit("matrix: the sdist is broken")

    main_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    pythons = {}
    for version in VERSIONS:
        python = find_python(version)
        if python is None:
            print(f"  MISSING CPython {version}: not under $(pyenv root)/versions nor on PATH; its wheel is not built")
            problems.append(f"CPython {version} missing")
            continue
        pythons[version] = python
        print(f"CPython {version}: {python}", flush=True)
        wheel = build_wheel(python, sdist, version, tools)
        if wheel is None:
            rows.append({"build": version, "python": version, "numpy": "", "openmp": "", "tag": "(build failed)",
                         "tests": "", "ok": False})
            continue
        full = version == main_version
        rows.append(test_wheel(python, wheel, version, [] if full else SUBSET, extras="test,demo" if full else "test",
                               torch=full and os.environ.get("CBN_TEST_TORCH", "1") != "0"))
        if version == min(pythons):  # the oldest Python: also the oldest NumPy cbn declares
            rows.append(test_wheel(python, wheel, f"{version}-oldest-numpy", SUBSET, numpy=oldest_numpy()))

    if main_version in pythons:
        print("without OpenMP (CBN_OPENMP=0)", flush=True)
        serial = build_wheel(pythons[main_version], sdist, "no-openmp", tools, env={"CBN_OPENMP": "0"},
                             into=WORK / "no-openmp")
        if serial is None:
            rows.append({"build": "no-openmp", "python": main_version, "numpy": "", "openmp": "off",
                         "tag": "(build failed)", "tests": "", "ok": False})
        else:
            rows.append(test_wheel(pythons[main_version], serial, "no-openmp", SUBSET))

    header = ("build", "python", "numpy", "openmp", "tag", "tests")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  result")
    print("  ".join("-" * w for w in widths) + "  ------")
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)) + ("  ok" if r["ok"] else "  FAILED"))
    bad = [r["build"] for r in rows if not r["ok"]] + problems
    untagged = [r["build"] for r in rows if r["ok"] and "manylinux" not in r["tag"]]
    if untagged:
        bad.append(f"no manylinux tag: {untagged}")
    print("\nmatrix: " + ("all green" if not bad else "FAILED: " + "; ".join(bad)))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
