"""Property tests (hypothesis): every function against cbn.reference on random shapes, axes, layouts and values.

Values range over subnormals, 1e-30 to 1e30, and NaN and +-inf planted in some
channels: channels without them must agree with the reference, and the
non-finite values must stay in the channels they were planted in.  The
examples are derandomized, so CI runs the same fixed set every time.
"""
import numpy as np
import pytest
from helpers import whole_stats

import cbn
from cbn import reference

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None)
TOL = {np.float32: 2e-4, np.float64: 1e-9}
SPECIALS = [np.nan, np.inf, -np.inf]


@st.composite
def problems(draw):
    """(x, dy, channel axes, planted channels) with x in a random layout."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axes = tuple(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=2, unique=True)))
    shape = tuple(max(n, 2) if i == axes[0] else n for i, n in enumerate(shape))  # some channels
    if np.prod([n for i, n in enumerate(shape) if i not in axes]) < 2:  # training needs 2 values per channel
        first_reduced = next((i for i in range(ndim) if i not in axes), None)
        hypothesis.assume(first_reduced is not None)
        shape = tuple(2 if i == first_reduced else n for i, n in enumerate(shape))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    offset = draw(st.sampled_from([0.0, 10.0])) * scale
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.standard_normal(shape)).astype(dtype)
    if draw(st.booleans()):  # subnormals in a few places
        tiny = np.finfo(dtype).smallest_subnormal
        x[tuple(rng.integers(0, n) for n in shape)] = tiny * 3
    channel_of = np.indices(shape)[list(axes)]  # the channel index of every element
    planted = set()
    if draw(st.booleans()):
        for value in draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=2)):
            where = tuple(rng.integers(0, n) for n in shape)
            x[where] = value
            planted.add(tuple(int(channel_of[k][where]) for k in range(len(axes))))
    dy = rng.standard_normal(shape).astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "reversed strides", "every other"]))
    if layout == "F":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    elif layout == "reversed strides":
        x, dy = x[(slice(None, None, -1),) * ndim].copy()[(slice(None, None, -1),) * ndim], dy.copy()
    elif layout == "every other":
        big = np.zeros(tuple(2 * n for n in shape), dtype)
        big[(slice(None, None, 2),) * ndim] = x
        x = big[(slice(None, None, 2),) * ndim]
    return x, dy, axes if len(axes) > 1 else axes[0], planted


def _channel_mask(cshape, planted):
    """True for the channels where nothing was planted."""
    clean = np.ones(cshape, bool)
    for c in planted:
        clean[c] = False
    return clean


def _per_element(mask, x, axes):
    """The per-channel ``mask`` broadcast to x's shape."""
    axes = axes if isinstance(axes, tuple) else (axes,)
    order = np.argsort(axes)
    shape = [1] * x.ndim
    for a in axes:
        shape[a] = x.shape[a]
    return np.broadcast_to(np.transpose(mask, order).reshape(shape), x.shape)


def _check(got, want, clean, dtype, scale=1.0):
    """Clean entries agree with the reference; planted ones are non-finite only where the reference is."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    tol = TOL[dtype] * scale
    np.testing.assert_allclose(got[clean], want[clean], rtol=TOL[dtype], atol=tol)
    assert np.isfinite(got[clean]).all() == np.isfinite(want[clean]).all()


@SETTINGS
@given(problems())
def test_batch_stats_match_the_reference(problem):
    x, _, axes, planted = problem
    with np.errstate(all="ignore"):  # float32 variances of 1e30-scale data overflow to inf, as in the reference
        mean, var = cbn.batch_stats(x, channel_axis=axes)
        mean_ref, var_ref = reference.batch_stats(x, channel_axis=axes)
        scale = float(np.nanmax(np.abs(np.where(np.isfinite(x), x, 0)))) or 1.0
        mean, mean_ref, var, var_ref = mean / scale, mean_ref / scale, var / scale**2, var_ref / scale**2
    clean = _channel_mask(mean.shape, planted)
    _check(mean, mean_ref, clean, x.dtype.type)
    _check(var, var_ref, clean, x.dtype.type)
    assert not np.isfinite(mean[~clean] * var[~clean]).any()  # each planted channel shows it


@SETTINGS
@given(problems())
def test_training_forward_and_backward_match_the_reference(problem):
    x, dy, axes, planted = problem
    with np.errstate(all="ignore"):
        y, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axes)
        y_ref, mean_ref, invstd_ref = reference.batch_norm_forward(x, channel_axis=axes)
        clean = _channel_mask(mean.shape, planted)
        elements = _per_element(clean, x, axes)
        _check(y, y_ref, elements, x.dtype.type, scale=4.0)
        assert np.isfinite(y[elements]).all()
        assert not np.isfinite(y[~elements]).all() if planted else True
        # the gradient at the forward's statistics (the clean channels' are finite)
        m = x.size // mean.size
        grads = cbn.batch_norm_backward(dy, x, mean, invstd, channel_axis=axes)
        grads_ref = reference.batch_norm_backward(dy, x, mean, invstd, channel_axis=axes)
    _check(grads[0], grads_ref[0], elements, x.dtype.type, scale=4.0 * np.sqrt(m))
    _check(grads[1], grads_ref[1], clean, x.dtype.type, scale=4.0 * m)
    _check(grads[2], grads_ref[2], clean, x.dtype.type, scale=4.0 * m)


@SETTINGS
@given(problems(), st.sampled_from([None, "relu", "sigmoid", "tanh"]))
def test_inference_matches_the_reference(problem, activation):
    x, _, axes, planted = problem
    cshape = tuple(x.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    rng = np.random.default_rng(x.size)
    rm, rv = rng.standard_normal(cshape), rng.uniform(0.5, 2.0, cshape)
    with np.errstate(all="ignore"):
        scale = float(np.nanmax(np.abs(np.where(np.isfinite(x), x, 0)))) or 1.0
        rm, rv = rm * scale, rv * scale**2
        y = cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False, channel_axis=axes,
                           activation=activation)
        y_ref = reference.batch_norm(x, running_mean=rm, running_var=rv, training=False, channel_axis=axes,
                                     activation=activation)
    finite = np.isfinite(x)  # at inference a non-finite value stays in its own element
    _check(y, y_ref, finite & np.isfinite(y_ref), x.dtype.type, scale=16.0)


@st.composite
def splits(draw):
    """(x, channel axis, pieces): a batch cut along one reduced axis into pieces, some empty."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axes = tuple(draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=min(2, ndim - 1), unique=True)))
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else axes
    cut_axis = draw(st.sampled_from([a for a in range(ndim) if a not in axes]))
    n = shape[cut_axis]
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    offset = draw(st.sampled_from([0.0, 1e3, 1e5]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    noise = np.random.default_rng(draw(st.integers(0, 2**31))).standard_normal(shape)
    x = (offset * scale + scale * noise).astype(dtype)
    bounds = [0, *cuts, n]
    pieces = [np.take(x, np.arange(lo, hi), axis=cut_axis) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return x, axis, pieces


@SETTINGS
@given(splits(), st.randoms(use_true_random=False))
def test_merged_pieces_equal_the_whole_batch(problem, random):
    """cbn.combine_stats and the reference's merge, over the pieces in two orders, give the whole batch's."""
    x, axis, pieces = problem
    expected_mean, expected_m2 = whole_stats(x, axis)
    scale = np.abs(expected_mean).max() + np.sqrt(expected_m2.max() / x.size) + 1e-300
    parts = [cbn.batch_stats_partial(p, channel_axis=axis) for p in pieces]
    results = []
    for module in (cbn, reference):
        for order in (parts, random.sample(parts, len(parts))):  # any order of the pieces
            count, mean, m2 = module.combine_stats(*zip(*order))
            assert count == x.size // expected_mean.size
            np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-14 * scale)
            np.testing.assert_allclose(m2, expected_m2, rtol=1e-9, atol=1e-20)
            results.append((mean, m2))
    for mean, m2 in results[1:]:  # agree with each other up to rounding
        np.testing.assert_allclose(mean, results[0][0], rtol=1e-13, atol=1e-14 * scale)
        np.testing.assert_allclose(m2, results[0][1], rtol=1e-10, atol=1e-20)
