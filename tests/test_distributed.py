"""cbn.distributed under real MPI: tests/mpi_check.py run by mpiexec on 1, 2 and 3 ranks.

MPI runs in subprocesses only, so that this test process never initializes
MPI (a later fork of an MPI process is undefined).  Skipped without mpi4py
or an ``mpiexec``.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
HERE = pathlib.Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_distributed_equals_one_process_on_the_whole_batch(ranks):
    run = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(HERE / "mpi_check.py")],
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"mpi_check: {ranks} ranks OK" in run.stdout


def test_data_parallel_demo_follows_the_single_process_loss_curve():
    pytest.importorskip("sklearn")
    run = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "cbn", "mpi-demo", "--steps", "25"],
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rows per rank [10, 20, 30]" in run.stdout
    worst = float(run.stdout.split("largest loss difference over 25 steps: ")[1].split()[0])
    assert worst <= 1e-12


def test_mpi_bench_reports_every_column():
    run = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "cbn", "mpi-bench", "--shape", "4x8x5x5",
                          "--repeat", "2"], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stdout + run.stderr
    row = run.stdout.strip().splitlines()[-1].split()
    assert row[0] == "2" and row[5] == str(17 * 8) and row[7] == str(16 * 8)  # bytes: (2C + 1) and 2C doubles
    assert all(float(v) > 0 for v in row)


def test_import_without_mpi4py_says_what_to_install():
    code = "import sys; sys.modules['mpi4py'] = None\ntry:\n    import cbn.distributed\nexcept ImportError as e:\n" \
           "    print(e)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert "pip install 'cbn[mpi]'" in run.stdout, run.stdout + run.stderr


def test_import_cbn_imports_neither_mpi4py_nor_dask():
    code = "import sys, cbn; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mpi4py', 'dask')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr
