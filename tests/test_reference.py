"""Every public function against cbn.reference over dtypes, shapes, axes and layouts."""
import numpy as np
import pytest
from helpers import LAYOUTS, assert_close, make_layout, random_array

import cbn
from cbn import reference

DTYPES = [np.float16, np.float32, np.float64, np.int32]

# (shape, channel axes): 2-D to 5-D, one channel, prime extents, spatial size 1
CASES = [
    ((7, 3), 1),
    ((7, 3), -1),
    ((6, 1, 7), 1),
    ((5, 3, 1, 1), 1),
    ((3, 5, 7, 2), 1),
    ((3, 5, 7, 2), -1),
    ((3, 5, 7, 2), (1, 3)),
    ((3, 5, 7, 2), (3, 1)),
    ((2, 3, 5, 4, 3), 1),
    ((2, 3, 5, 4, 3), (0, 2)),
    ((4, 3, 2, 5, 3), -1),
]


def _per_channel_shape(shape, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(shape[a] for a in axes)


def _ids(case):
    shape, axis = case
    return f"{'x'.join(map(str, shape))}-axis{axis}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_all_functions_match_reference(case, dtype, layout, rng):
    shape, axis = case
    x = make_layout(random_array(rng, shape, dtype, offset=3.0, scale=2.0), layout)
    cshape = _per_channel_shape(shape, axis)
    gamma = rng.uniform(0.5, 2.0, cshape)
    beta = rng.standard_normal(cshape)
    x_before = x.copy()
    result = np.result_type(x.dtype, np.float16) if x.dtype.kind == "f" else np.dtype(np.float64)

    # statistics
    mean, var = cbn.batch_stats(x, channel_axis=axis)
    mean_ref, var_ref = reference.batch_stats(x, channel_axis=axis)
    assert mean.dtype == mean_ref.dtype and var.dtype == var_ref.dtype
    assert_close(mean, mean_ref, mean.dtype, scale=4.0)
    assert_close(var, var_ref, var.dtype, scale=4.0)

    # training forward
    y, m, s = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    y_ref, m_ref, s_ref = reference.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    assert y.dtype == y_ref.dtype == result and y.shape == shape
    assert m.dtype == m_ref.dtype and s.dtype == s_ref.dtype
    assert_close(y, y_ref, y.dtype, scale=4.0)
    assert_close(m, m_ref, m.dtype, scale=4.0)
    # invstd is 1/sqrt(eps) ~ 316 on constant channels (broadcast layout)
    assert_close(s, s_ref, s.dtype, scale=float(np.max(s_ref)))
    assert_close(cbn.batch_norm(x, gamma, beta, channel_axis=axis), y_ref, result, scale=4.0)

    # inference
    running_mean = rng.standard_normal(cshape)
    running_var = rng.uniform(0.5, 2.0, cshape)
    kwargs = dict(running_mean=running_mean, running_var=running_var, training=False, channel_axis=axis)
    y_eval = cbn.batch_norm(x, gamma, beta, **kwargs)
    assert y_eval.dtype == result
    assert_close(y_eval, reference.batch_norm(x, gamma, beta, **kwargs), result, scale=30.0)

    # gradient, with dy in the same layout as x
    dy = make_layout(random_array(rng, shape, dtype), layout)
    grads = cbn.batch_norm_backward(dy, x, m_ref, s_ref, gamma, channel_axis=axis)
    grads_ref = reference.batch_norm_backward(dy, x, m_ref, s_ref, gamma, channel_axis=axis)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, got.dtype, scale=float(np.max(np.abs(want), initial=1.0)))

    np.testing.assert_array_equal(x, x_before)  # inputs are never modified


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1, (1, 2)])
def test_gradient_with_layouts_mixed(dtype, axis, rng):
    """dy and x in different layouts still pair element by element."""
    shape = (4, 3, 5, 6)
    x = make_layout(random_array(rng, shape, dtype), "F")
    dy = make_layout(random_array(rng, shape, dtype), "strided")
    _, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis)
    got = cbn.batch_norm_backward(dy, x, mean, invstd, channel_axis=axis)
    want = reference.batch_norm_backward(dy, x, mean, invstd, channel_axis=axis)
    for g, w in zip(got, want):
        assert_close(g, w, dtype, scale=float(np.max(np.abs(w))))


def test_mixed_dtypes_promote_like_numpy(rng):
    x = random_array(rng, (6, 3, 4), np.float32)
    dy = random_array(rng, (6, 3, 4), np.float64)
    _, mean, invstd = cbn.batch_norm_forward(x)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, invstd)
    assert dx.dtype == np.float64 and dgamma.dtype == np.float64 and dbeta.dtype == np.float64
    dx16, _, _ = cbn.batch_norm_backward(dy.astype(np.float16), x.astype(np.float16), mean, invstd)
    assert dx16.dtype == np.float16


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64])
def test_integer_and_bool_inputs_give_float64(dtype, rng):
    x = random_array(rng, (10, 3), dtype)
    y = cbn.batch_norm(x)
    assert y.dtype == np.float64
    assert_close(y, reference.batch_norm(x.astype(np.float64)), np.float64, scale=4.0)


def test_array_like_inputs(rng):
    x = random_array(rng, (5, 2, 3), np.float64)

    class WithArray:
        def __array__(self, dtype=None, copy=None):
            return x

    want = reference.batch_norm(x, [1.0, 2.0], (0.5, -0.5))
    assert_close(cbn.batch_norm(x.tolist(), [1.0, 2.0], (0.5, -0.5)), want, np.float64)
    assert_close(cbn.batch_norm(WithArray(), [1.0, 2.0], (0.5, -0.5)), want, np.float64)


def test_non_native_byte_order_and_unaligned(rng):
    x = random_array(rng, (8, 3, 5), np.float64)
    swapped = x.astype(x.dtype.newbyteorder("S"))
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float64).reshape(x.shape)
    unaligned[...] = x
    assert not unaligned.flags.aligned
    want = reference.batch_norm(x)
    for arr in (swapped, unaligned):
        y = cbn.batch_norm(arr)
        assert y.dtype == np.float64 and y.dtype.isnative
        assert_close(y, want, np.float64, scale=4.0)


@pytest.mark.parametrize("axis", [1, -1])
def test_empty_channel_axis_gives_empty_results(axis):
    x = np.zeros((4, 0, 3)) if axis == 1 else np.zeros((4, 3, 0))
    y, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis)
    assert y.shape == x.shape and mean.shape == (0,) and invstd.shape == (0,)
    dx, dgamma, dbeta = cbn.batch_norm_backward(x, x, mean, invstd, channel_axis=axis)
    assert dx.shape == x.shape and dgamma.shape == (0,)


@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4, 3e4, 1e5])
def test_large_offset_variance_is_accurate(offset, axis):
    """float32 data offset + N(0, 1): variance within 1e-6 relative of float64."""
    rng = np.random.default_rng(0)
    x = (offset + rng.standard_normal((64, 8, 32, 32))).astype(np.float32)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    reduce_axes = (0, 2, 3) if axis == 1 else (0, 1, 2)
    exact = x.astype(np.float64).var(axis=reduce_axes)
    _, var = cbn.batch_stats(x, channel_axis=axis)
    assert np.max(np.abs(var - exact) / exact) <= 1e-6
    _, _, invstd = cbn.batch_norm_forward(x, channel_axis=axis, out=(None, None, np.empty(8)))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(exact + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# (64, 3, 4096): a fused group per channel in float32, tiles merged with Chan's formula in float64 and in
# batch_stats, chunks of rows in column mode
@pytest.mark.parametrize("shape", [(8, 3, 100), (64, 3, 4096)], ids=["small", "large"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCW", "NWC"])
def test_an_outlier_first_in_its_channel_keeps_the_variance_exact(axis, shape, dtype):
    """Statistics sum deviations from each channel's first value in one pass, which cancels when that
    value lies far from the mean; such a channel takes a second pass from its mean, and the
    statistics of float32 and float64 data alike keep float64's digits."""
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    x[0, 0, 0] = 1e4  # the first value of channel 0 (and of its first block): 1e4 sigma away
    x[:, 1] += 1e4
    x[0, 1, 0] = 0.0  # channel 1 the other way round: the outlier below a large offset
    exact = x.astype(np.float64)
    want_mean, want_var = exact.mean(axis=(0, 2)), exact.var(axis=(0, 2))
    if axis == -1:  # the same values, channels last (column mode): channel c's first value is x[0, 0, c]
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = dict(channel_axis=axis)
    _, mean, invstd = cbn.batch_norm_forward(x, out=(None, np.empty(3), np.empty(3)), **kw)  # float64 statistics
    assert np.all(np.abs(mean - want_mean) <= 1e-14 * (np.abs(want_mean) + np.sqrt(want_var)))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(want_var + 1e-5), rtol=1e-13)
    if dtype == np.float64:
        np.testing.assert_allclose(cbn.batch_stats(x, **kw)[1], want_var, rtol=1e-13)


@pytest.mark.parametrize("axis", [1, -1], ids=["NCHW", "NHWC"])
def test_large_constant_channel_normalizes_to_beta(axis):
    """pytorch#5410: a channel holding one large constant must give exactly beta."""
    x = np.random.default_rng(0).standard_normal((16, 3, 5, 5)).astype(np.float32)
    x[:, 1] = 1e7
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    beta = np.array([0.0, 0.25, 0.0])
    y = cbn.batch_norm(x, None, beta, channel_axis=axis)
    assert np.all(np.take(y, 1, axis=axis) == np.float32(0.25))


@pytest.mark.parametrize("training", [True, False])
def test_huge_offset_does_not_cancel(training):
    """float64 data 1e12 + small integers: exactly representable, exact mean.

    The folded form ``x * scale + (beta - mean * scale)`` loses ~1e-4 here
    (products of size 1e12 rounded); the centred form is exact to rounding.
    """
    k = np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], 12).reshape(6, 2, 5)  # zero sum per channel
    x = 1e12 + k
    std = np.sqrt(2.0)  # biased std of (-2, -1, 0, 1, 2)
    if training:
        y = cbn.batch_norm(x, eps=0.0)
    else:
        y = cbn.batch_norm(x, running_mean=np.full(2, 1e12), running_var=np.full(2, 2.0), training=False, eps=0.0)
    np.testing.assert_allclose(y, k / std, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative"])
def test_out_in_place_equals_out_of_place(dtype, layout, rng):
    x = make_layout(random_array(rng, (6, 4, 5, 3), dtype, offset=2.0), layout)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    want = cbn.batch_norm(x, gamma, beta)
    got = cbn.batch_norm(x, gamma, beta, out=x)
    assert got is x
    np.testing.assert_array_equal(x, want)

    x = make_layout(random_array(rng, (6, 4, 5, 3), dtype, offset=2.0), layout)
    dy = make_layout(random_array(rng, (6, 4, 5, 3), dtype), layout)
    _, mean, invstd = cbn.batch_norm_forward(x)
    want = cbn.batch_norm_backward(dy, x, mean, invstd, gamma)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, out=(dy, None, None))
    assert dx is dy
    for g, w in zip((dx, dgamma, dbeta), want):
        np.testing.assert_array_equal(g, w)


def test_out_arguments_follow_ufunc_rules(rng):
    x = random_array(rng, (5, 3, 4), np.float32)
    want_y, want_mean, want_invstd = reference.batch_norm_forward(x)

    out = np.empty((5, 3, 4), np.float64)  # wider dtype: same_kind cast
    assert cbn.batch_norm(x, out=out) is out
    assert_close(out, want_y, np.float32, scale=4.0)
    assert cbn.batch_norm(x, out=(out,)) is out  # one-entry tuple, as for ufuncs

    strided = np.zeros((10, 3, 8), np.float32)[::2, :, ::2]
    assert cbn.batch_norm(x, out=strided) is strided
    assert_close(strided, want_y, np.float32, scale=4.0)

    mean64, invstd64 = np.empty(3), np.empty(3)
    y, mean, invstd = cbn.batch_norm_forward(x, out=(None, mean64, invstd64))
    assert mean is mean64 and invstd is invstd64
    # float64 outs keep the float64 statistics the kernels computed
    assert_close(mean64, x.astype(np.float64).mean(axis=(0, 2)), np.float64, scale=4.0)
    assert_close(y, want_y, np.float32, scale=4.0)


def test_out_partially_overlapping_an_input(rng):
    """An out that overlaps x without being x goes through a temporary."""
    buf = random_array(rng, (7, 3), np.float64)
    x = buf[:6]
    want = reference.batch_norm(x.copy())
    out = buf[1:]
    cbn.batch_norm(x, out=out)
    assert_close(out, want, np.float64, scale=4.0)


# ---------------------------------------------------------------------------
# running statistics


@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1, (1, 2)])
def test_running_stats_update_like_reference(stat_dtype, axis, rng):
    x = random_array(rng, (8, 3, 4, 2), np.float32, offset=1.0, scale=3.0)
    cshape = _per_channel_shape(x.shape, axis)
    rm, rv = np.full(cshape, 0.5, stat_dtype), np.full(cshape, 2.0, stat_dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    for momentum in (0.1, 0.0, 1.0, 0.3):
        cbn.batch_norm(x, running_mean=rm, running_var=rv, momentum=momentum, channel_axis=axis)
        reference.batch_norm(x, running_mean=rm_ref, running_var=rv_ref, momentum=momentum, channel_axis=axis)
    assert rm.dtype == stat_dtype and rv.dtype == stat_dtype
    assert_close(rm, rm_ref, stat_dtype, scale=4.0)
    assert_close(rv, rv_ref, stat_dtype, scale=10.0)
    # the running variance is the unbiased one
    rm, rv = np.zeros(cshape), np.zeros(cshape)
    cbn.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0, channel_axis=axis)
    axes = axis if isinstance(axis, tuple) else (axis,)
    moved = np.moveaxis(x.astype(np.float64), axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(-1, *cshape)
    assert_close(rv, flat.var(axis=0, ddof=1), np.float64, scale=10.0)


def test_forward_updates_running_stats_too(rng):
    x = random_array(rng, (8, 3), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    cbn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert_close(rm, 0.1 * x.mean(axis=0), np.float64)
    assert_close(rv, 0.9 + 0.1 * x.var(axis=0, ddof=1), np.float64)


# ---------------------------------------------------------------------------
# threads


# Each reaches a different kernel path: fused per-channel blocks, column mode
# (channels innermost), chunked large channels, and the NC column case.
THREAD_CASES = [
    ((16, 8, 32, 33), 1),  # row mode, fused groups of channels
    ((16, 8, 32, 33), -1),  # column mode, rows along a
    ((4, 3, 300, 301), 1),  # row mode, channels too large to fuse: (a, c, b) tiles
    ((40000, 5, 7), 1),  # row mode, short runs, tiles of several channels
    ((3001, 70), 1),  # column mode (NC)
    ((2100, 300), 1),  # column mode, tiles of whole rows
    # column mode, tiles of whole rows wider than the column sums' blocks (CBN_COLS), 4 KiB apart or more:
    # the sums take CBN_ROWS rows at a time, and the last tile's 55 rows leave 3 over
    ((2103, 1100), 1),
    ((1100, 300), 1),  # column mode, 1024 to 2047 rows too wide for channel tiles: 8 tiles of whole rows
    ((5, 300, 70, 3), 2),  # row mode, runs of 3 values
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-axis{c[1]}")
def test_every_kernel_path_matches_reference(case, dtype):
    shape, axis = case
    rng = np.random.default_rng(3)
    x = random_array(rng, shape, dtype, offset=5.0, scale=2.0)
    dy = random_array(rng, shape, dtype)
    y, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis)
    y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x, channel_axis=axis)
    assert_close(y, y_ref, dtype, scale=4.0)
    assert_close(mean, mean_ref, dtype, scale=8.0)
    assert_close(invstd, invstd_ref, dtype)
    for got, want in zip(cbn.batch_norm_backward(dy, x, mean_ref, invstd_ref, channel_axis=axis),
                         reference.batch_norm_backward(dy, x, mean_ref, invstd_ref, channel_axis=axis)):
        assert_close(got, want, dtype, scale=float(np.max(np.abs(want))))


@pytest.mark.parametrize("layout", ["C", "F", "strided", "transposed"])
@pytest.mark.parametrize("case", THREAD_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-axis{c[1]}")
def test_results_do_not_depend_on_thread_count(case, layout):
    """Bitwise the same for 1, 2, 3 and 4 threads, and from run to run."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    shape, axis = case
    rng = np.random.default_rng(7)
    x = make_layout(random_array(rng, shape, np.float32, offset=10.0), layout)
    dy = make_layout(random_array(rng, shape, np.float32), layout)

    def run():
        y, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis)
        mean_b, var_b = cbn.batch_stats(x, channel_axis=axis)
        return (y, mean, invstd, mean_b, var_b, *cbn.batch_norm_backward(dy, x, mean, invstd, channel_axis=axis))

    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        expected = run()
    for n in (1, 2, 3, 4):
        with threadpoolctl.threadpool_limits(n, user_api="openmp"):
            for got, want in zip(run(), expected):
                np.testing.assert_array_equal(got, want)


def test_threadpoolctl_controls_cbn_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cbn import _kernels

    if not cbn.show_config(mode="dicts")["openmp"]:
        pytest.skip("built without OpenMP")
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert _kernels.max_threads() == 1
    with threadpoolctl.threadpool_limits(3, user_api="openmp"):
        assert _kernels.max_threads() == 3


@pytest.mark.parametrize("activation", [None, "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((64, 128), 1), ((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1)])
def test_fast_path_gives_the_general_paths_bits(shape, axis, dtype, activation):
    """Plain arrays take the kernels' plain entry points; lists for gamma/beta/mean force the general path."""
    rng = np.random.default_rng(11)
    x = random_array(rng, shape, dtype, offset=3.0)
    dy = random_array(rng, shape, dtype)
    c = shape[axis]
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    from cbn import _kernels

    plain = (x, gamma, beta, None, None, 0.1, 1e-5, axis, activation, 0.01, None, True)
    assert _kernels.train_plain(*plain) is not None  # the fast path applies
    act = dict(activation=activation)
    fast = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis, **act)
    general = cbn.batch_norm_forward(x, list(gamma), list(beta), channel_axis=axis, **act)
    for a, b in zip(fast, general):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(cbn.batch_norm(x, gamma, beta, channel_axis=axis, **act), general[0])
    y_out = np.empty_like(x)
    assert cbn.batch_norm(x, gamma, beta, channel_axis=axis, out=y_out, **act) is y_out
    np.testing.assert_array_equal(y_out, general[0])
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    assert _kernels.inference_plain(x, gamma, beta, rm, rv, 0.1, 1e-5, axis, activation, 0.01, None) is not None
    eval_kw = dict(training=False, channel_axis=axis, **act)
    np.testing.assert_array_equal(
        cbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, **eval_kw),
        cbn.batch_norm(x, list(gamma), beta, running_mean=list(rm), running_var=rv, **eval_kw),
    )
    _, mean, invstd = fast
    fast_grads = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, channel_axis=axis, **act)
    general_grads = cbn.batch_norm_backward(
        dy, x, list(mean), list(invstd), list(gamma), list(beta), channel_axis=axis, **act
    )
    for a, b in zip(fast_grads, general_grads):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
