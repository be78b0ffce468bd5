"""The GPU path, kernels included, on a machine without a GPU: cbn/cuda/batch_norm.cu compiled for the CPU
(tests/cuda_emulator.h) under a NumPy stand-in for CuPy (tests/emulated_cupy.py), against the CPU path.

Each CUDA thread runs as an operating-system thread, so the arrays are small; tests/test_gpu.py is the
full suite on a real device. Skipped without a C++20 compiler, and where CuPy finds a device.
"""
import shutil
import sys

import numpy as np
import pytest
from helpers import unaligned

import cbn
from cbn import _cuda_plan

try:
    import cupy as _real_cupy

    _device = _real_cupy.is_available()
except ImportError:
    _device = False
if _device:  # pragma: no cover - depends on the machine
    pytest.skip("CuPy finds a device: tests/test_gpu.py covers the GPU path", allow_module_level=True)
if shutil.which("g++") is None:  # pragma: no cover
    pytest.skip("no g++ to compile the kernels for the CPU", allow_module_level=True)

import emulated_cupy as cupy  # noqa: E402  (tests/ is on sys.path under pytest's rootdir-relative imports)

TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-11}

# (shape, channel_axis) -> which kernels and accesses they take (float32)
CASES = [
    ((3, 4, 40), 1),  # runs of 40: 16-byte row reduction
    ((3, 2, 33), 1),  # runs of 33: element accesses
    ((40, 8), 1),  # NC, 8 channels: 16-byte columns in the elementwise passes
    ((30, 5), 1),  # NC, 5 channels: element accesses
    ((4, 3, 3, 4), -1),  # NHWC
    ((5, 3, 4, 2), 1),  # runs of 8 < 32: the column kernels with several columns per channel
    ((2, 3, 8192), 1),  # a channel over 4 blocks
    ((2048, 8), 1),  # columns over 2 row chunks
]


@pytest.fixture(scope="module", autouse=True)
def emulated_gpu():
    """cupy is the stand-in while this module runs; cbn._gpu is imported afresh with it, and dropped after."""
    saved = {name: sys.modules.pop(name, None) for name in ("cupy", "cbn._gpu")}
    sys.modules["cupy"] = cupy
    yield
    for name in ("cupy", "cbn._gpu"):
        sys.modules.pop(name, None)
        if saved[name] is not None:
            sys.modules[name] = saved[name]
    if hasattr(cbn, "_gpu"):
        del cbn._gpu


@pytest.fixture(params=["one block per channel", "split channels"])
def kernel_path(request, monkeypatch):
    if request.param == "split channels":
        monkeypatch.setattr(_cuda_plan, "one_block_per_channel", lambda *args: False)
    return request.param


def assert_close(actual, expected, dtype, scale=1.0):
    assert type(actual) is cupy.ndarray
    tol = TOL[np.dtype(dtype).type] * max(1.0, scale)
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


def data(rng, shape, dtype, offset=0.0):
    return (offset + rng.standard_normal(shape)).astype(dtype)


def params(rng, x, axis):
    c = x.shape[axis]
    return rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


@pytest.mark.parametrize("shape, axis", CASES)
def test_forward_and_backward_match_the_cpu(rng, shape, axis, kernel_path):
    x, dy = data(rng, shape, np.float32, offset=3.0), data(rng, shape, np.float32)
    gamma, beta = params(rng, x, axis)
    y_cpu, mean_cpu, invstd_cpu = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    y, mean, invstd = cbn.batch_norm_forward(cupy.asarray(x), cupy.asarray(gamma), cupy.asarray(beta),
                                             channel_axis=axis)
    assert_close(y, y_cpu, np.float32, scale=4)
    assert_close(mean, mean_cpu, np.float32, scale=4)
    assert_close(invstd, invstd_cpu, np.float32)
    expected = cbn.batch_norm_backward(dy, x, mean_cpu, invstd_cpu, gamma, channel_axis=axis)
    got = cbn.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), mean, invstd, cupy.asarray(gamma),
                                  channel_axis=axis)
    for g, e, scale in zip(got, expected, (4, np.prod(shape), np.prod(shape))):
        assert_close(g, e, np.float32, scale=np.sqrt(scale))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("shape, axis", [((3, 4, 40), 1), ((40, 8), 1)])
def test_float16_and_float64(rng, shape, axis, dtype, kernel_path):
    x = data(rng, shape, dtype, offset=1.0)
    y_cpu, mean_cpu, _ = cbn.batch_norm_forward(x, channel_axis=axis)
    y, mean, _ = cbn.batch_norm_forward(cupy.asarray(x), channel_axis=axis)
    assert y.dtype == dtype and mean.dtype == mean_cpu.dtype
    assert_close(y, y_cpu, dtype, scale=4)
    assert_close(mean, mean_cpu, mean_cpu.dtype, scale=4)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activations(rng, activation, kernel_path):
    shape, axis = (6, 8, 4), 1
    x, dy = data(rng, shape, np.float64), data(rng, shape, np.float64)
    gamma, beta = params(rng, x, axis)
    kw = dict(channel_axis=axis, activation=activation, negative_slope=0.2)
    y_cpu, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, **kw)
    y, _, _ = cbn.batch_norm_forward(cupy.asarray(x), cupy.asarray(gamma), cupy.asarray(beta), **kw)
    assert_close(y, y_cpu, np.float64, scale=10)
    expected = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **kw)
    got = cbn.batch_norm_backward(*(cupy.asarray(a) for a in (dy, x, mean, invstd, gamma, beta)), **kw)
    for g, e in zip(got, expected):
        assert_close(g, e, np.float64, scale=100)


def test_inference_running_statistics_and_batch_stats(rng):
    x = data(rng, (6, 4, 12), np.float32, offset=-2.0)
    rm, rv = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    rm_g, rv_g = cupy.asarray(rm), cupy.asarray(rv)
    y = cbn.batch_norm(cupy.asarray(x), running_mean=rm_g, running_var=rv_g, momentum=0.3)
    assert_close(y, cbn.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.3), np.float32, scale=4)
    assert_close(rm_g, rm, np.float32)
    assert_close(rv_g, rv, np.float32)
    y = cbn.batch_norm(cupy.asarray(x), running_mean=rm_g, running_var=rv_g, training=False, activation="relu")
    assert_close(y, cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False, activation="relu"),
                 np.float32, scale=4)
    for got, expected in zip(cbn.batch_stats(cupy.asarray(x)), cbn.batch_stats(x)):
        assert_close(got, expected, np.float32, scale=4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 4, 12), (3, 4, 40), (40, 8)])
def test_running_statistics_updated_by_the_kernels_as_on_the_host(rng, shape, dtype, kernel_path):
    """Contiguous running statistics are updated by the kernels that finish the statistics; strided ones by
    update_running after the call: the same bits."""
    x = cupy.asarray(data(rng, shape, np.float32, offset=-2.0))
    C = shape[1]
    start = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    contiguous = [cupy.asarray(s.copy()) for s in start]
    strided = [cupy.zeros(2 * C, dtype)[::2] for _ in start]
    for r, s in zip(strided, start):
        r[...] = s
    for rm, rv in (contiguous, strided):
        cbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.3)
    for a, b, s in zip(contiguous, strided, start):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, s)  # updated


@pytest.mark.parametrize("shape, axis", [((3, 4, 40), 1), ((40, 8), 1), ((2, 3, 8192), 1)])
def test_unaligned_arrays_give_the_same_bits(rng, shape, axis, kernel_path):
    x, dy = cupy.asarray(data(rng, shape, np.float32, offset=1.0)), cupy.asarray(data(rng, shape, np.float32))
    kw = dict(channel_axis=axis, activation="leaky_relu")
    forward = cbn.batch_norm_forward(x, **kw)
    for a, b in zip(forward, cbn.batch_norm_forward(unaligned(x, cupy.empty), **kw)):
        np.testing.assert_array_equal(a, b)
    y = unaligned(cupy.empty(x.shape, x.dtype), cupy.empty)
    cbn.batch_norm(x, **kw, out=y)
    np.testing.assert_array_equal(y, forward[0])
    grads = cbn.batch_norm_backward(dy, x, forward[1], forward[2], **kw)
    shifted = unaligned(dy, cupy.empty)
    for a, b in zip(grads, cbn.batch_norm_backward(shifted, x, forward[1], forward[2], **kw)):
        np.testing.assert_array_equal(a, b)
