"""The GPU path on CuPy arrays against the CPU path and cbn.reference (skipped without a CUDA device)."""
import numpy as np
import pytest
from helpers import unaligned

import cbn
from cbn import _cuda_plan, reference

cupy = pytest.importorskip("cupy")
if not cupy.is_available():  # pragma: no cover - depends on the machine
    pytest.skip("CuPy finds no CUDA device", allow_module_level=True)

DTYPES = [np.float16, np.float32, np.float64]
TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-11}
ACTIVATIONS = [None, "relu", "leaky_relu", "sigmoid", "tanh"]

# (shape, channel_axis): row kernels (long runs), column kernels (NC, NHWC, short runs), odd sizes
CASES = [
    ((8, 6, 9, 10), 1),
    ((4, 3, 40), 1),
    ((37, 5), 1),
    ((5, 7, 3, 6), -1),
    ((3, 4, 5, 2, 3), 1),
    ((2, 3, 31), 1),
    ((1000, 3), 1),
    ((16, 2, 64, 33), 1),
    ((6, 5, 4), 0),
    ((4, 6, 5, 3), (1, 3)),
    ((300, 64), 1),  # 16-byte accesses: elementwise columns of every dtype, ...
    ((6, 5, 8, 12), -1),  # ... of float32 and float64
    ((3, 8, 48), 1),  # ... runs of every dtype
]


@pytest.fixture(params=["one block per channel", "split channels"], autouse=True)
def kernel_path(request, monkeypatch):
    """Every test twice: small channels through the one-block kernels, and through the split reductions."""
    if request.param == "split channels":
        monkeypatch.setattr(_cuda_plan, "one_block_per_channel", lambda *args: False)
    return request.param


def gpu(a):
    return cupy.asarray(a)


def host(a):
    return cupy.asnumpy(a)


def assert_close(actual, expected, dtype, scale=1.0):
    actual = host(actual)
    assert actual.shape == np.shape(expected)
    tol = TOL[np.dtype(dtype).type] * max(1.0, scale)
    np.testing.assert_allclose(actual.astype(np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


def data(rng, shape, dtype, offset=0.0):
    return (offset + rng.standard_normal(shape)).astype(dtype)


def params(rng, x, axis):
    cshape = tuple(x.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
    return rng.uniform(0.5, 2.0, cshape), rng.standard_normal(cshape)


def layouts(x):
    """x on the GPU in several memory layouts, same values."""
    yield "C", gpu(x)
    yield "F", cupy.asfortranarray(gpu(x))
    big = cupy.zeros(tuple(2 * n for n in x.shape), dtype=x.dtype)
    view = big[tuple(slice(None, None, 2) for _ in x.shape)]
    view[...] = gpu(x)
    yield "strided", view


# --------------------------------------------------------------------------
# Agreement with the CPU path and the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES)
def test_training_forward_matches_cpu_and_reference(rng, shape, axis, dtype):
    x = data(rng, shape, dtype, offset=3.0)
    gamma, beta = params(rng, x, axis)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    y_cpu, mean_cpu, invstd_cpu = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    for name, xg in layouts(x):
        y, mean, invstd = cbn.batch_norm_forward(xg, gpu(gamma), gpu(beta), channel_axis=axis)
        assert isinstance(y, cupy.ndarray) and y.dtype == y_cpu.dtype and mean.dtype == mean_cpu.dtype, name
        assert_close(y, y_ref, dtype, scale=4)
        assert_close(mean, mean_ref, np.float64 if dtype == np.float64 else np.float32, scale=4)
        assert_close(invstd, invstd_ref, np.float64 if dtype == np.float64 else np.float32)
        assert_close(y, y_cpu, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES)
def test_backward_matches_cpu_and_reference(rng, shape, axis, dtype):
    x = data(rng, shape, dtype)
    dy = data(rng, shape, dtype)
    gamma, beta = params(rng, x, axis)
    _, mean, invstd = reference.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    expected = reference.batch_norm_backward(dy, x, mean, invstd, gamma, channel_axis=axis)
    for name, xg in layouts(x):
        got = cbn.batch_norm_backward(gpu(dy), xg, gpu(mean), gpu(invstd), gpu(gamma), channel_axis=axis)
        for g, e, scale in zip(got, expected, (4, np.prod(shape), np.prod(shape))):
            assert_close(g, e, dtype, scale=np.sqrt(scale))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, axis", [((6, 5, 7, 8), 1), ((50, 9), 1), ((4, 5, 6, 7), -1)])
def test_activations_forward_and_backward(rng, shape, axis, activation):
    x = data(rng, shape, np.float64)
    dy = data(rng, shape, np.float64)
    gamma, beta = params(rng, x, axis)
    kw = dict(channel_axis=axis, activation=activation, negative_slope=0.2)
    y_ref, mean, invstd = reference.batch_norm_forward(x, gamma, beta, **kw)
    y, _, _ = cbn.batch_norm_forward(gpu(x), gpu(gamma), gpu(beta), **kw)
    assert_close(y, y_ref, np.float64)
    expected = reference.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **kw)
    got = cbn.batch_norm_backward(gpu(dy), gpu(x), gpu(mean), gpu(invstd), gpu(gamma), gpu(beta), **kw)
    for g, e in zip(got, expected):
        assert_close(g, e, np.float64, scale=100)
    y32, _, _ = cbn.batch_norm_forward(gpu(x.astype(np.float32)), gpu(gamma), gpu(beta), **kw)
    assert_close(y32, y_ref, np.float32, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_and_running_statistics_match_cpu(rng, dtype):
    x = data(rng, (9, 4, 6, 5), dtype, offset=-2.0)
    gamma, beta = params(rng, x, 1)
    rm, rv = rng.standard_normal(4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    rm_g, rv_g = gpu(rm), gpu(rv)
    y = cbn.batch_norm(gpu(x), gpu(gamma), gpu(beta), running_mean=rm_g, running_var=rv_g, momentum=0.3)
    y_cpu = cbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3)
    assert_close(y, y_cpu, dtype, scale=4)
    assert_close(rm_g, rm, dtype)
    assert_close(rv_g, rv, dtype)
    for activation in ACTIVATIONS:
        kw = dict(running_mean=rm_g, running_var=rv_g, training=False, activation=activation)
        y = cbn.batch_norm(gpu(x), gpu(gamma), gpu(beta), **kw)
        expected = reference.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False,
                                        activation=activation)
        assert_close(y, expected, dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 4, 12), (3, 4, 40), (40, 8)])
def test_running_statistics_updated_by_the_kernels_as_on_the_host(rng, shape, dtype):
    """Contiguous running statistics are updated by the kernels; strided ones by update_running: same bits."""
    x = gpu(data(rng, shape, np.float32, offset=-2.0))
    C = shape[1]
    start = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    contiguous = [gpu(s) for s in start]
    strided = [cupy.zeros(2 * C, dtype)[::2] for _ in start]
    for r, s in zip(strided, start):
        r[...] = gpu(s)
    for rm, rv in (contiguous, strided):
        cbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.3)
    for a, b, s in zip(contiguous, strided, start):
        assert cupy.array_equal(a, b) and not np.array_equal(host(a), s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES[:6])
def test_batch_stats(rng, shape, axis, dtype):
    x = data(rng, shape, dtype, offset=10.0)
    mean, var = cbn.batch_stats(gpu(x), channel_axis=axis)
    mean_ref, var_ref = reference.batch_stats(x, channel_axis=axis)
    work = np.float64 if dtype == np.float64 else np.float32
    assert mean.dtype == work and var.dtype == work
    assert_close(mean, mean_ref, work, scale=10)
    assert_close(var, var_ref, work)


def test_integer_input_computes_in_float64(rng):
    x = rng.integers(-5, 5, size=(10, 3, 4))
    y = cbn.batch_norm(gpu(x))
    assert y.dtype == np.float64
    assert_close(y, reference.batch_norm(x), np.float64)


@pytest.mark.parametrize("shape, axis", [((2, 16, 8192), 1), ((2048, 256), 1), ((8, 28, 28, 32), -1),
                                         ((16, 64, 20, 20), 1)])
def test_chunked_channels_match_cpu(rng, shape, axis):
    """Channels split over many blocks (the split kernels' partial sums), against the CPU path."""
    x = data(rng, shape, np.float32, offset=2.0)
    dy = data(rng, shape, np.float32)
    gamma, beta = params(rng, x, axis)
    y_cpu, mean_cpu, invstd_cpu = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    y, mean, invstd = cbn.batch_norm_forward(gpu(x), gpu(gamma), gpu(beta), channel_axis=axis)
    assert_close(y, y_cpu, np.float32, scale=4)
    assert_close(mean, mean_cpu, np.float32, scale=4)
    assert_close(invstd, invstd_cpu, np.float32)
    expected = cbn.batch_norm_backward(dy, x, mean_cpu, invstd_cpu, gamma, channel_axis=axis)
    got = cbn.batch_norm_backward(gpu(dy), gpu(x), mean, invstd, gpu(gamma), channel_axis=axis)
    for g, e, scale in zip(got, expected, (4, np.prod(shape), np.prod(shape))):
        assert_close(g, e, np.float32, scale=np.sqrt(scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((3, 8, 48), 1), ((300, 64), 1), ((6, 5, 8, 12), -1), ((2, 16, 8192), 1)])
def test_results_do_not_depend_on_alignment(rng, shape, axis, dtype):
    """Unaligned arrays take element accesses where aligned ones take 16-byte vectors: the same bits."""
    x, dy = gpu(data(rng, shape, dtype, offset=1.0)), gpu(data(rng, shape, dtype))
    gamma, beta = (gpu(p) for p in params(rng, host(x), axis))
    kw = dict(channel_axis=axis, activation="leaky_relu")
    forward = cbn.batch_norm_forward(x, gamma, beta, **kw)
    for a, b in zip(forward, cbn.batch_norm_forward(unaligned(x, cupy.empty), gamma, beta, **kw)):
        assert cupy.array_equal(a, b)
    y = unaligned(cupy.empty_like(x), cupy.empty)
    cbn.batch_norm(x, gamma, beta, **kw, out=y)
    assert cupy.array_equal(y, forward[0])
    grads = cbn.batch_norm_backward(dy, x, forward[1], forward[2], gamma, beta, **kw)
    shifted = unaligned(dy, cupy.empty)
    for a, b in zip(grads, cbn.batch_norm_backward(shifted, x, forward[1], forward[2], gamma, beta, **kw)):
        assert cupy.array_equal(a, b)


# --------------------------------------------------------------------------
# out=, in place, inputs untouched


def test_out_arguments_and_in_place(rng):
    x = data(rng, (6, 3, 5, 7), np.float32)
    dy = data(rng, (6, 3, 5, 7), np.float32)
    expected = cbn.batch_norm(x)
    xg = gpu(x)
    same = cbn.batch_norm(xg, out=xg)  # in place
    assert same is xg
    assert_close(xg, expected, np.float32, scale=4)

    xg, dyg = gpu(x), gpu(dy)
    y, mean, invstd = cupy.empty_like(xg), cupy.empty(3, np.float64), cupy.empty(3, np.float32)
    result = cbn.batch_norm_forward(xg, out=(y, mean, invstd))
    assert result[0] is y and result[1] is mean and result[2] is invstd
    assert_close(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), np.float64)  # a float64 out keeps float64 stats
    np.testing.assert_array_equal(host(xg), x)  # input untouched

    dx_ref = cbn.batch_norm_backward(dy, x, host(mean), host(invstd))
    dx = cbn.batch_norm_backward(dyg, xg, mean, invstd, out=(dyg, None, None))[0]  # dx into dy
    assert dx is dyg
    assert_close(dx, dx_ref[0], np.float32, scale=10)

    f64 = cupy.empty(x.shape, np.float64)  # a wider out: computed in float32, cast on the way
    assert cbn.batch_norm(gpu(x), out=f64) is f64
    assert_close(f64, expected, np.float32, scale=4)

    y_f = cupy.empty(x.shape, np.float32, order="F")  # out in another layout than x
    cbn.batch_norm(gpu(x), out=y_f)
    assert_close(y_f, expected, np.float32, scale=4)


def test_overlapping_out_goes_through_a_temporary(rng):
    x = data(rng, (4, 2, 8), np.float32)
    expected = cbn.batch_norm(x[:, :, :4])
    xg = gpu(x)
    cbn.batch_norm(xg[:, :, :4], out=xg[:, :, 4:])
    assert_close(xg[:, :, 4:], expected, np.float32, scale=4)


# --------------------------------------------------------------------------
# Accuracy and reproducibility


def test_float32_variance_error_below_1e6_with_large_offsets(rng):
    for offset in (1e3, 1e4, 1e5):
        x = data(rng, (64, 8, 32, 32), np.float32, offset=offset)
        _, var = cbn.batch_stats(gpu(x))
        exact = x.astype(np.float64).var(axis=(0, 2, 3))
        assert np.max(np.abs(host(var) / exact - 1)) <= 1e-6, offset


def test_constant_channel_normalizes_to_beta():
    x = np.full((16, 3, 5, 5), 1e7, np.float32)
    x[:, 1] = np.arange(16 * 25, dtype=np.float32).reshape(16, 5, 5)
    beta = np.array([0.5, 0.0, -2.0])
    for layout, xg in layouts(x):
        y = host(cbn.batch_norm(xg, None, gpu(beta)))
        assert (y[:, 0] == np.float32(0.5)).all() and (y[:, 2] == np.float32(-2.0)).all(), layout


def test_float64_large_offset(rng):
    x = data(rng, (32, 4, 100), np.float64, offset=1e12)
    _, var = cbn.batch_stats(gpu(x))
    exact = (x - x.mean(axis=(0, 2), keepdims=True)).var(axis=(0, 2))
    np.testing.assert_allclose(host(var), exact, rtol=1e-9)


@pytest.mark.parametrize("shape, axis", [((32, 64, 56, 56), 1), ((4096, 1024), 1), ((16, 28, 28, 64), -1)])
def test_bitwise_identical_between_runs(rng, shape, axis):
    x = gpu(data(rng, shape, np.float32, offset=1.0))
    dy = gpu(data(rng, shape, np.float32))
    first = cbn.batch_norm_forward(x, channel_axis=axis)
    again = cbn.batch_norm_forward(x, channel_axis=axis)
    for a, b in zip(first, again):
        assert cupy.array_equal(a, b)
    g1 = cbn.batch_norm_backward(dy, x, first[1], first[2], channel_axis=axis)
    g2 = cbn.batch_norm_backward(dy, x, first[1], first[2], channel_axis=axis)
    for a, b in zip(g1, g2):
        assert cupy.array_equal(a, b)
    mean_cpu, var_cpu = cbn.batch_stats(host(x), channel_axis=axis)
    assert_close(first[1], mean_cpu, np.float32)


def test_calls_on_several_streams_and_shapes_agree(rng):
    shapes = [((16, 3000), 1), ((4, 2000, 40), 1), ((64, 5, 9), -1)]  # channel counts beyond the first buffer
    arrays = [(gpu(data(rng, shape, np.float32)), axis) for shape, axis in shapes]
    expected = [tuple(host(a) for a in cbn.batch_stats(x, channel_axis=axis)) for x, axis in arrays]
    for stream in (cupy.cuda.Stream(), cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream.null):
        with stream:
            got = [cbn.batch_stats(x, channel_axis=axis) for x, axis in arrays * 2]
        stream.synchronize()
        for (mean, var), (mean_e, var_e) in zip(got, expected * 2):
            np.testing.assert_array_equal(host(mean), mean_e)
            np.testing.assert_array_equal(host(var), var_e)


def test_nan_stays_in_its_channel(rng):
    x = data(rng, (8, 3, 16), np.float32)
    x[2, 1, 5] = np.nan
    y = host(cbn.batch_norm(gpu(x)))
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()
    for activation in ACTIVATIONS:  # inference: only the element itself, through every activation (relu too)
        y = host(cbn.batch_norm(gpu(x), running_mean=cupy.zeros(3), running_var=cupy.ones(3), training=False,
                                activation=activation))
        assert np.isnan(y[2, 1, 5]) and np.isnan(y).sum() == 1, activation


# --------------------------------------------------------------------------
# Errors


def test_mixing_numpy_and_cupy_is_a_type_error(rng):
    x = data(rng, (4, 3, 2), np.float32)
    with pytest.raises(TypeError, match="gamma is a numpy.ndarray but x is a cupy.ndarray"):
        cbn.batch_norm(gpu(x), np.ones(3))
    with pytest.raises(TypeError, match="x is a numpy.ndarray but gamma is a cupy.ndarray"):
        cbn.batch_norm(x, cupy.ones(3))
    with pytest.raises(TypeError, match="must be a cupy.ndarray"):
        cbn.batch_norm(gpu(x), out=np.empty_like(x))
    with pytest.raises(TypeError, match="mean is a numpy.ndarray"):
        cbn.batch_norm_backward(gpu(x), gpu(x), np.zeros(3), cupy.ones(3))


def test_same_errors_as_the_cpu_path(rng):
    xg = gpu(data(rng, (4, 3, 2), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cbn.batch_norm(xg[:1, :, :1])
    with pytest.raises(ValueError, match="gamma must have shape"):
        cbn.batch_norm(xg, cupy.ones(4))
    with pytest.raises(ValueError, match="out of bounds"):
        cbn.batch_norm(xg, channel_axis=3)
    with pytest.raises(ValueError, match="eps"):
        cbn.batch_norm(xg, eps=-1.0)
    with pytest.raises(TypeError, match="complex"):
        cbn.batch_norm(xg.astype(cupy.complex64))
    with pytest.raises(ValueError, match="out must have shape"):
        cbn.batch_norm(xg, out=cupy.empty((4, 3)))
    with pytest.raises(TypeError, match="cannot hold"):
        cbn.batch_norm(xg, out=cupy.empty(xg.shape, cupy.int32))
    with pytest.raises(ValueError, match="required when training=False"):
        cbn.batch_norm(xg, training=False)
    with pytest.raises(ValueError, match="dy and x must have the same shape"):
        cbn.batch_norm_backward(xg[:2], xg, cupy.zeros(3), cupy.ones(3))


def test_show_config_names_the_device():
    gpu_line = cbn.show_config(mode="dicts")["gpu"]
    assert gpu_line.startswith("CuPy") and "compute capability" in gpu_line


# --------------------------------------------------------------------------
# The layer on CuPy arrays


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_layer_on_the_gpu_matches_the_layer_on_the_host(rng, activation):
    on_host = cbn.BatchNorm(5, activation=activation, momentum=None)
    on_gpu = cbn.BatchNorm(5, activation=activation, momentum=None)
    for step in range(3):
        x = data(rng, (8, 5, 3, 4), np.float32, offset=step)
        dy = data(rng, (8, 5, 3, 4), np.float32)
        y = on_gpu(gpu(x))
        assert isinstance(y, cupy.ndarray) and isinstance(on_gpu.running_mean, cupy.ndarray)
        assert_close(y, on_host(x), np.float32, scale=4)
        assert_close(on_gpu.backward(gpu(dy)), on_host.backward(dy), np.float32, scale=10)
        assert_close(on_gpu.grad_weight, on_host.grad_weight, np.float32, scale=30)
    assert on_gpu.num_batches_tracked == on_host.num_batches_tracked == 3
    for mode in ("eval",):
        on_host.eval(), on_gpu.eval()
        x, dy = data(rng, (6, 5, 2, 2), np.float32), data(rng, (6, 5, 2, 2), np.float32)
        assert_close(on_gpu(gpu(x)), on_host(x), np.float32, scale=4)
        assert_close(on_gpu.backward(gpu(dy)), on_host.backward(dy), np.float32, scale=4)
    state = on_gpu.state_dict()
    for name, value in on_host.state_dict().items():
        assert_close(state[name], value, np.float32, scale=4)
    on_host.load_state_dict({k: (v if k == "num_batches_tracked" else host(v)) for k, v in state.items()})
    x = data(rng, (4, 5, 2, 2), np.float32)
    on_gpu(gpu(x[:1]))  # a GPU forward, then a host forward moves the state back
    assert isinstance(on_gpu(x), np.ndarray) and isinstance(on_gpu.running_var, np.ndarray)
