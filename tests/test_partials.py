"""Batch norm in pieces: mergeable statistics and the backward's two halves.

Merging the partials of any split of a batch must give the statistics of the
whole batch, and a backward assembled from the reduce and elementwise
primitives must equal ``batch_norm_backward``: what cbn.distributed and
cbn.dask rely on.
"""
import numpy as np
import pytest
from helpers import LAYOUTS, make_layout, random_array, whole_stats

import cbn
from cbn import reference
from cbn._kernels import merge_packed

CASES = [  # shape, channel_axis
    ((10, 3), 1),
    ((7, 4, 5), 1),
    ((6, 3, 4, 5), 1),
    ((6, 4, 5, 3), -1),
    ((5, 3, 2, 4), (1, 3)),
    ((5, 3, 2, 4), (3, 1)),
]


@pytest.mark.parametrize("module", [cbn, reference], ids=["cbn", "reference"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_of_one_piece(module, dtype, shape, axis, layout):
    rng = np.random.default_rng(1)
    x = make_layout(random_array(rng, shape, dtype, offset=3.0), layout)
    count, mean, m2 = module.batch_stats_partial(x, channel_axis=axis)
    expected_mean, expected_m2 = whole_stats(x, axis)
    assert type(count) is np.int64 and count == x.size // expected_mean.size
    assert mean.dtype == m2.dtype == np.float64
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(m2, expected_m2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", [cbn, reference], ids=["cbn", "reference"])
def test_empty_piece_is_the_identity(module):
    x = np.zeros((0, 3, 4), np.float32)
    count, mean, m2 = module.batch_stats_partial(x)
    assert count == 0 and mean.shape == m2.shape == (3,) and not mean.any() and not m2.any()
    full = module.batch_stats_partial(np.arange(24.0).reshape(2, 3, 4))
    merged = module.combine_stats([count, full[0]], [mean, full[1]], [m2, full[2]])
    assert merged[0] == full[0]
    np.testing.assert_allclose(merged[1], full[1], rtol=1e-15)
    np.testing.assert_allclose(merged[2], full[2], rtol=1e-15)


def test_empty_pieces_mean_is_ignored():
    """An empty piece's mean may be NaN (as np.mean gives): it does not reach the result."""
    full = cbn.batch_stats_partial(np.arange(12.0).reshape(4, 3))
    for module in (cbn, reference):
        count, mean, m2 = module.combine_stats([0, full[0]], [np.full(3, np.nan), full[1]], [np.full(3, np.nan),
                                                                                            full[2]])
        assert count == 4 and np.isfinite(mean).all() and np.isfinite(m2).all()


def test_merging_keeps_float32_variance_at_large_offsets():
    """Pieces at offset 1e5: the merged float32 variance within 1e-6 of float64's (the issue's bound)."""
    rng = np.random.default_rng(3)
    x = (1e5 + rng.standard_normal((64, 8, 32))).astype(np.float32)
    parts = [cbn.batch_stats_partial(x[i:i + 5]) for i in range(0, 64, 5)]
    mean, var = cbn.finalize_stats(*cbn.combine_stats(*zip(*parts)))
    exact = x.astype(np.float64).var(axis=(0, 2))
    assert np.max(np.abs(var / exact - 1)) <= 1e-6


def test_per_channel_counts():
    """Counts may differ per channel (pieces that hold some channels only, say)."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
    pa, pb = cbn.batch_stats_partial(a), cbn.batch_stats_partial(b)
    counts = [np.array([6, 6, 6]), np.array([4, 0, 4])]  # channel 1 of b left out
    for module in (cbn, reference):
        count, mean, m2 = module.combine_stats(counts, [pa[1], pb[1]], [pa[2], pb[2]])
        assert count.tolist() == [10, 6, 10]
        np.testing.assert_allclose(mean[[0, 2]], np.concatenate([a, b]).mean(axis=0)[[0, 2]], rtol=1e-13)
        np.testing.assert_allclose(mean[1], a[:, 1].mean(), rtol=1e-13)
        np.testing.assert_allclose(m2[1], a[:, 1].var() * 6, rtol=1e-12)


def test_packed_merge_is_symmetric_bit_for_bit():
    """cbn.distributed's MPI operation: merge(a, b) == merge(b, a) bitwise, and equal to combine_stats."""
    rng = np.random.default_rng(5)
    C = 7
    for _ in range(200):
        na, nb = (float(n) for n in rng.integers(0, 1000, 2))
        a = np.concatenate([[na], rng.normal(1e4, 10, C), rng.random(C) * na])
        b = np.concatenate([[nb], rng.normal(1e4, 10, C), rng.random(C) * nb])
        ab, ba = b.copy(), a.copy()
        merge_packed(a, ab, C)
        merge_packed(b, ba, C)
        assert ab.tobytes() == ba.tobytes()
        if na and nb:
            expected = cbn.combine_stats([int(na), int(nb)], [a[1:C + 1], b[1:C + 1]], [a[C + 1:], b[C + 1:]])
            assert ab[0] == na + nb
            np.testing.assert_allclose(ab[1:C + 1], expected[1], rtol=1e-15)
            np.testing.assert_allclose(ab[C + 1:], expected[2], rtol=1e-12)
        else:  # an empty side leaves the other as it was
            assert ab.tobytes() == (b if nb else a).tobytes()
    rows = np.concatenate([a, b]), np.concatenate([b, a])  # several partials per buffer
    merge_packed(rows[0], rows[1], C)
    assert rows[1][:2 * C + 1].tobytes() == ab.tobytes()
    with pytest.raises(ValueError, match="rows of 15"):
        merge_packed(np.zeros(14), np.zeros(14), C)


@pytest.mark.parametrize("module", [cbn, reference], ids=["cbn", "reference"])
def test_finalize(module):
    x = np.random.default_rng(6).standard_normal((9, 4))
    mean, var = module.finalize_stats(*module.batch_stats_partial(x))
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-14)
    mean, var = module.finalize_stats(*module.batch_stats_partial(x), ddof=1)
    np.testing.assert_allclose(var, x.var(axis=0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_backward_from_the_primitives(dtype, shape, axis, layout):
    """reduce -> (sum over pieces) -> elemt equals batch_norm_backward, in one piece and in several."""
    rng = np.random.default_rng(7)
    x = make_layout(random_array(rng, shape, dtype, offset=2.0), layout)
    dy = make_layout(random_array(rng, shape, dtype), layout)
    cshape = whole_stats(x, axis)[0].shape
    gamma = rng.uniform(0.5, 2.0, cshape)
    f64 = (None, np.empty(cshape), np.empty(cshape))
    _, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis, out=f64)
    dx, dgamma, dbeta = reference.batch_norm_backward(dy, x, mean, invstd, gamma, channel_axis=axis)
    count = x.size // mean.size
    for module in (cbn, reference):
        sum_dy, sum_dy_xmu = module.batch_norm_backward_reduce(dy, x, mean, invstd, channel_axis=axis)
        assert sum_dy.dtype == sum_dy_xmu.dtype == np.float64
        np.testing.assert_allclose(sum_dy, dbeta, rtol=1e-6, atol=1e-9 * count)
        np.testing.assert_allclose(sum_dy_xmu * invstd, dgamma, rtol=1e-6, atol=1e-9 * count)
        got = module.batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count,
                                               channel_axis=axis)
        assert got.dtype == dx.dtype and got.shape == x.shape
        tol = {np.float16: 4e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
        np.testing.assert_allclose(got.astype(np.float64), dx.astype(np.float64), rtol=tol, atol=tol * 4)

    # the same batch in pieces along axis 0, one empty: sums added, dx concatenated
    bounds = [0, 1, 1, shape[0]]
    pieces = [(dy[lo:hi], x[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    sums = [cbn.batch_norm_backward_reduce(d, v, mean, invstd, channel_axis=axis) for d, v in pieces]
    total_dy, total_dy_xmu = np.sum([s[0] for s in sums], axis=0), np.sum([s[1] for s in sums], axis=0)
    got = np.concatenate([cbn.batch_norm_backward_elemt(d, v, mean, invstd, gamma, total_dy, total_dy_xmu, count,
                                                        channel_axis=axis) for d, v in pieces])
    np.testing.assert_allclose(got.astype(np.float64), dx.astype(np.float64), rtol=tol, atol=tol * 4)


def test_backward_elemt_out_and_in_place():
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((6, 3, 5)), rng.standard_normal((6, 3, 5))
    mean, invstd = x.mean(axis=(0, 2)), 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5)
    sums = cbn.batch_norm_backward_reduce(dy, x, mean, invstd)
    expected = cbn.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 30)
    out = np.empty_like(x)
    assert cbn.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 30, out=out) is out
    np.testing.assert_array_equal(out, expected)
    dy_copy = dy.copy()
    assert cbn.batch_norm_backward_elemt(dy_copy, x, mean, invstd, None, *sums, 30, out=dy_copy) is dy_copy
    np.testing.assert_array_equal(dy_copy, expected)
    out_int = np.empty((6, 3, 5), np.int64)  # float results do not cast to int (same_kind)
    with pytest.raises(TypeError, match="out"):
        cbn.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 30, out=out_int)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    x, dy = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    saved = x.copy(), dy.copy()
    p = cbn.batch_stats_partial(x)
    mean, var = cbn.finalize_stats(*p)
    invstd = 1 / np.sqrt(var + 1e-5)
    sums = cbn.batch_norm_backward_reduce(dy, x, mean, invstd)
    cbn.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, 6)
    np.testing.assert_array_equal(x, saved[0])
    np.testing.assert_array_equal(dy, saved[1])


BAD_CALLS = [
    (lambda m: m.batch_stats_partial(np.float64(1.0)), ValueError, "at least 1 dimension"),
    (lambda m: m.batch_stats_partial(np.ones((3, 2)), channel_axis=2), ValueError, "out of bounds"),
    (lambda m: m.batch_stats_partial(np.ones((3, 2), complex)), TypeError, "complex"),
    (lambda m: m.combine_stats([], [], []), ValueError, "at least one"),
    (lambda m: m.combine_stats(3, np.zeros(2), np.zeros(2)), TypeError, "sequence"),
    (lambda m: m.combine_stats([1, 2], [np.zeros(2)], [np.zeros(2)] * 2), ValueError, "one entry per piece"),
    (lambda m: m.combine_stats([1, -2], [np.zeros(2)] * 2, [np.zeros(2)] * 2), ValueError, "counts must be >= 0"),
    (lambda m: m.combine_stats([1, 2.5], [np.zeros(2)] * 2, [np.zeros(2)] * 2), ValueError, "whole numbers"),
    (lambda m: m.combine_stats([1, 2], [np.zeros(2), np.zeros(3)], [np.zeros(2)] * 2), ValueError, "same shape"),
    (lambda m: m.combine_stats([np.ones(3)] * 2, [np.zeros(2)] * 2, [np.zeros(2)] * 2), ValueError, "broadcast"),
    (lambda m: m.combine_stats(["a", "b"], [np.zeros(2)] * 2, [np.zeros(2)] * 2), TypeError, "counts"),
    (lambda m: m.finalize_stats(0, np.zeros(2), np.zeros(2)), ValueError, "greater than ddof"),
    (lambda m: m.finalize_stats(1, np.zeros(2), np.zeros(2), ddof=1), ValueError, "greater than ddof"),
    (lambda m: m.finalize_stats(3, np.zeros(2), np.zeros(2), ddof=0.5), TypeError, "ddof"),
    (lambda m: m.finalize_stats(3, np.zeros(2), np.zeros(3)), ValueError, "same shape"),
    (lambda m: m.batch_norm_backward_reduce(np.ones((3, 2)), np.ones((4, 2)), np.zeros(2), np.ones(2)),
     ValueError, "same shape"),
    (lambda m: m.batch_norm_backward_reduce(np.ones((3, 2)), np.ones((3, 2)), np.zeros(3), np.ones(2)),
     ValueError, "mean must have shape"),
    (lambda m: m.batch_norm_backward_reduce(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(3)),
     ValueError, "invstd must have shape"),
    (lambda m: m.batch_norm_backward_elemt(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(2), None,
                                           np.zeros(2), np.zeros(2), 0), ValueError, "count must be positive"),
    (lambda m: m.batch_norm_backward_elemt(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(2), None,
                                           np.zeros(2), np.zeros(2), np.ones(3, int)), ValueError, "broadcast"),
    (lambda m: m.batch_norm_backward_elemt(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(2), None,
                                           np.zeros(3), np.zeros(2), 3), ValueError, "sum_dy must have shape"),
    (lambda m: m.batch_norm_backward_elemt(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(2), np.ones(1),
                                           np.zeros(2), np.zeros(2), 3), ValueError, "gamma must have shape"),
    (lambda m: m.batch_norm_backward_elemt(np.ones((3, 2)), np.ones((3, 2)), np.zeros(2), np.ones(2), None,
                                           np.zeros(2), np.zeros(2), 3, out=np.empty((2, 3))), ValueError, "out"),
]


@pytest.mark.parametrize("module", [cbn, reference], ids=["cbn", "reference"])
@pytest.mark.parametrize("call,error,match", BAD_CALLS)
def test_bad_input(module, call, error, match):
    with pytest.raises(error, match=match):
        call(module)


def test_cupy_arrays_get_a_clear_error():
    """The pieces' functions are host-only for now: a CuPy array is refused by name, not converted."""
    fake = type("ndarray", (), {"__module__": "cupy._core.core"})()
    with pytest.raises(TypeError, match="CuPy arrays are not supported"):
        cbn.batch_stats_partial(fake)
    with pytest.raises(TypeError, match="CuPy arrays are not supported"):
        cbn.batch_norm_backward_reduce(fake, np.ones((3, 2)), np.zeros(2), np.ones(2))
