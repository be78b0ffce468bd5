"""The GPU path's parts that need no GPU: CUDA sources compile, launch shapes cover every value, CuPy stays optional."""
import importlib.resources
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cbn
from cbn import _api
from cbn import _cuda_plan as plan

SOURCE = importlib.resources.files("cbn") / "cuda" / "batch_norm.cu"
DTYPES = (np.float16, np.float32, np.float64)


def test_cuda_source_ships_with_the_package():
    assert SOURCE.is_file()
    text = SOURCE.read_text()
    assert "cbn_reduce_rows" in text
    assert f"#define CBN_CHANNEL_THREADS {plan.CHANNEL_THREADS} " in text  # launch bounds = the launch's block
    assert f"#define CBN_SPLIT_THREADS {plan.THREADS} " in text


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_instance_compiles_with_nvcc(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    names = [name for dtype in DTYPES for name in plan.name_expressions(dtype)]
    # taking each instance's address makes nvcc compile exactly what cupy.RawModule's name_expressions ask for
    unit = tmp_path / "instances.cu"
    unit.write_text(
        f'#include "{SOURCE}"\n' + "".join(f"void *cbn_instance_{i} = (void *)&{n};\n" for i, n in enumerate(names))
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # tests/sanitize.sh preloads ASan: not for nvcc
    result = subprocess.run(
        [nvcc, "-cubin", f"-arch={arch}", "-Werror", "all-warnings", str(unit), "-o", str(tmp_path / "k.cubin")],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    symbols = subprocess.run(["strings", str(tmp_path / "k.cubin")], capture_output=True, text=True).stdout
    for base in {n.split("<")[0] for n in names}:
        assert base in symbols


# --------------------------------------------------------------------------
# Launch shapes, checked by replaying each kernel's index arithmetic in Python


def _rows_kernel_indices(A, C, B, p):
    """(value index, partial slot) of every value cbn_reduce_rows reads, as its threads compute them."""
    seen = []
    Q, BV, vec = C * B, B // p.vec, p.vec
    step = p.block[0]
    step_a, step_b = divmod(step, BV)
    for block in range(p.grid[0]):
        c, k = divmod(block, p.n_chunks)
        end = min(A * BV, (k + 1) * p.span)
        for t in range(step):
            j = k * p.span + t
            a, b = divmod(j, BV)
            b *= vec
            while j < end:
                seen += [(a * Q + c * B + b + i, c * p.n_chunks + k) for i in range(vec)]
                a, b, j = a + step_a, b + step_b * vec, j + step
                if b >= B:
                    b, a = b - B, a + 1
    return seen


def _cols_kernel_indices(A, C, B, p):
    seen = []
    Q = C * B
    bx, by = p.block
    for gx, gy, tx, ty in itertools.product(range(p.grid[0]), range(p.grid[1]), range(bx), range(by)):
        q = (gx * bx + tx) * p.vec
        if q >= Q:
            continue
        for r in range(gy * p.span + ty, min(A, (gy + 1) * p.span), by):
            seen += [(r * Q + q + i, (q + i) * p.n_chunks + gy) for i in range(p.vec)]
    return seen


SHAPES = [(1, 1, 1), (2, 3, 1), (7, 5, 3), (33, 2, 31), (3, 2, 32), (5, 3, 100), (64, 4, 49), (300, 70, 1),
          (1000, 3, 2), (2, 1, 5000), (9, 3, 64), (40, 16, 4), (100, 24, 1), (3, 5, 8)]


@pytest.mark.parametrize("vec", [1, 2, 4, 8])
@pytest.mark.parametrize("A, C, B", SHAPES)
def test_reduction_reads_every_value_once_into_its_channel(A, C, B, vec):
    p = plan.reduce_plan(A, C, B, vec)
    assert p.by_rows == (B >= plan.ROWS_MIN_RUN)
    assert p.vec == (vec if p.by_rows and B % vec == 0 else 1)
    assert math.prod(p.block) == plan.THREADS
    seen = (_rows_kernel_indices if p.by_rows else _cols_kernel_indices)(A, C, B, p)
    values = sorted(i for i, _ in seen)
    assert values == list(range(A * C * B))
    for index, slot in seen:
        channel = index // B % C
        assert channel * p.partials <= slot < (channel + 1) * p.partials
    assert all(n <= 65535 for n in p.grid[1:])
    if p.by_rows:
        assert sorted(_finishing_counts(C, p)) == list(range(C))  # each channel finished exactly once


def _finishing_counts(C, p):
    """Channels finished by cbn_reduce_rows' last-block test, replayed over every block in launch order."""
    counter = [0] * C
    finished = []
    for block in range(p.grid[0]):
        c = block // p.n_chunks
        counter[c] += 1
        if counter[c] == p.n_chunks:
            finished.append(c)
    return finished


@pytest.mark.parametrize("vec", [1, 4])
@pytest.mark.parametrize("A, C, B", SHAPES + [(4096, 1024, 1), (32, 64, 3136), (100352, 64, 1)])
def test_elementwise_launch_covers_every_value_once(A, C, B, vec):
    p = plan.elementwise_plan(A, C, B, vec)
    bx, by = p.block
    assert bx * by == plan.THREADS and p.vec in (1, vec) and C * B % p.vec == 0
    columns = C * B // p.vec
    assert p.grid[0] * bx >= columns > (p.grid[0] - 1) * bx
    assert p.grid[1] * p.rows >= A > (p.grid[1] - 1) * p.rows and p.rows % by == 0
    if A * C * B < 100_000:
        count = np.zeros(A * C * B, dtype=int)
        for gx, gy, tx, ty in itertools.product(range(p.grid[0]), range(p.grid[1]), range(bx), range(by)):
            q = (gx * bx + tx) * p.vec
            if q < C * B:
                for r in range(gy * p.rows + ty, min(A, (gy + 1) * p.rows), by):
                    count[r * C * B + q:r * C * B + q + p.vec] += 1
        assert (count == 1).all()


@pytest.mark.parametrize("shape", [(32, 64, 3136), (64, 256, 196), (4096, 1024, 1), (100352, 64, 1), (8, 32, 16384)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_launch_shapes_fill_a_gpu_and_depend_on_the_shape_only(shape, dtype):
    vec = plan.VECTOR[np.dtype(dtype)]
    p = plan.reduce_plan(*shape, vec)
    blocks = p.grid[0] * (p.grid[1] if len(p.grid) > 1 else 1)
    assert 250 <= blocks <= 4 * plan.REDUCE_BLOCKS
    assert p.vec == (vec if p.by_rows and shape[2] % vec == 0 else 1)  # 16-byte accesses where a run allows them
    assert p == plan.reduce_plan(*shape, vec)
    e = plan.elementwise_plan(*shape, vec)
    assert e.grid[0] * e.grid[1] >= 250 and e.vec == vec


def test_small_arrays_take_the_one_block_kernels():
    f32, f64 = np.float32, np.float64
    assert plan.one_block_per_channel(64, 128, 1, f32)  # NC 64x128
    assert plan.one_block_per_channel(16, 32, 64, f64)  # NCHW 16x32x8x8
    assert plan.one_block_per_channel(16, 32, 196, f32)
    assert plan.one_block_per_channel(1, 2, 16384, f32)  # 16384 values per channel
    assert not plan.one_block_per_channel(1, 2, 16384, f64)  # float64 holds half as many
    assert not plan.one_block_per_channel(64, 256, 196, f32)  # a large array: the split kernels
    assert not plan.one_block_per_channel(32, 64, 3136, f32)


def test_name_expressions_cover_each_dtype():
    for dtype in DTYPES:
        names = plan.name_expressions(dtype)
        assert len(names) == len(set(names)) == (13 if dtype == np.float64 else 14)
    with pytest.raises(KeyError):
        plan.name_expressions(np.int32)


# --------------------------------------------------------------------------
# CuPy stays optional


def test_import_cbn_does_not_import_cupy():
    code = "import sys, numpy as np, cbn; cbn.batch_norm(np.ones((4, 3))); assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_arguments_never_take_the_gpu_path():
    x = np.ones((4, 3))
    assert not _api._on_gpu(x, None, np.zeros(3), (None, x), [1.0], 2.0)


def test_objects_from_cupy_are_recognised_without_importing_it():
    fake = type("ndarray", (), {"__module__": "cupy"})()
    assert _api._on_gpu(None, (None, fake))
    assert _api._on_gpu(np.ones(3), fake)


def test_without_cupy_show_config_says_why_the_gpu_path_is_unavailable():
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # as if CuPy were not installed
        "import cbn; print(cbn.show_config(mode='dicts')['gpu'])"
    )
    printed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert printed.startswith("unavailable")
    assert cbn.show_config(mode="dicts")["gpu"]
