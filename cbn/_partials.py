"""Batch norm in pieces, for a batch split over processes, chunks or hosts.

Statistics as mergeable partials ``(count, mean, m2)`` (Chan, Golub &
LeVeque 1979: merging never rebuilds a variance from sums of squares or from
an inverse standard deviation), and the backward's two local passes around
one reduction of ``(sum_dy, sum_dy_xmu)``: the decomposition PyTorch's
SyncBatchNorm uses.  ``cbn.distributed`` (MPI) and ``cbn.dask`` are built
from these functions.
"""
import numpy as np

from . import _args, _compute
from ._api import _as_compute, _bulk_input, _bulk_target, _deliver, _on_gpu

_F64 = np.dtype(np.float64)


def _host_only(func, *values):
    if _on_gpu(*values):
        raise TypeError(f"{func} takes NumPy arrays (array_like); CuPy arrays are not supported by it yet")


def batch_stats_partial(x, *, channel_axis=1):
    """This piece of a batch's statistics, ready to merge with other pieces.

    Parameters
    ----------
    x : array_like
        One piece of the batch (any number of values per channel, zero
        included: an empty piece gives count 0).
    channel_axis : int or tuple of ints, default 1
        The channel axis or axes; statistics reduce over all other axes.

    Returns
    -------
    count : numpy.int64
        Values per channel in x.
    mean, m2 : ndarray of float64
        Per-channel mean and sum of squared deviations from it, accumulated
        in float64 from deviations whatever x's dtype; 0 for an empty piece.

    See Also
    --------
    combine_stats, finalize_stats

    Examples
    --------
    >>> import numpy as np, cbn
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(10, 3, 4))
    >>> parts = [cbn.batch_stats_partial(piece) for piece in (x[:3], x[3:3], x[3:])]
    >>> mean, var = cbn.finalize_stats(*cbn.combine_stats(*zip(*parts)))
    >>> bool(np.allclose(var, x.var(axis=(0, 2))))
    True
    """
    _host_only("batch_stats_partial", x)
    x = _bulk_input(x, "x")
    axes, cshape, count = _args.partial_axes(x.shape, channel_axis)
    if count == 0 or x.size == 0:
        return np.int64(count), np.zeros(cshape), np.zeros(cshape)
    work = _args.compute_dtype(_args.result_dtype(x))
    mean, m2 = _compute.channel_stats(_as_compute(x, work), axes, cshape)
    return np.int64(count), mean, m2


def combine_stats(counts, means, m2s):
    """Merge any number of partials ``(count, mean, m2)`` into the partial of their union.

    Exact for pieces of any size, empty ones included (their mean and m2
    are ignored), and independent of the order of the pieces up to
    rounding: the merged mean is the count-weighted mean, and
    ``m2 = sum(m2_i) + sum(count_i * (mean_i - mean) ** 2)``, all in float64.

    Parameters
    ----------
    counts : sequence of ints or int arrays
        Each piece's count: one per piece, either a scalar (the same for
        every channel, as :func:`batch_stats_partial` returns) or an array
        broadcastable against the means.
    means, m2s : sequence of array_like
        Each piece's per-channel mean and m2, all of one shape.

    Returns
    -------
    count : numpy.int64 or ndarray of int64
        A scalar when every count is one, else per channel.
    mean, m2 : ndarray of float64

    Examples
    --------
    >>> import numpy as np, cbn
    >>> a, b = np.arange(6.0).reshape(3, 2), np.arange(6.0, 10.0).reshape(2, 2)
    >>> count, mean, m2 = cbn.combine_stats(*zip(cbn.batch_stats_partial(a), cbn.batch_stats_partial(b)))
    >>> int(count), mean.tolist(), m2.tolist()
    (5, [4.0, 5.0], [40.0, 40.0])
    """
    _host_only("combine_stats", counts, means, m2s)
    n_i, mean_i, m2_i, total = _args.partials(counts, means, m2s)
    n_b = n_i.astype(np.float64)
    count = n_b.sum(axis=0)
    filled = n_b > 0  # an empty piece's mean and m2 may be anything (NaN from np.mean, say): ignored
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(filled, n_b * mean_i, 0.0).sum(axis=0) / count
        mean = np.where(count > 0, mean, 0.0)
        deviation = np.where(filled, mean_i - mean, 0.0)
        m2 = np.where(filled, m2_i + n_b * deviation * deviation, 0.0).sum(axis=0)
    return total, mean, m2


def finalize_stats(count, mean, m2, *, ddof=0):
    """Mean and variance ``m2 / (count - ddof)`` of merged statistics.

    Parameters
    ----------
    count, mean, m2
        A partial (:func:`batch_stats_partial`, :func:`combine_stats`).
    ddof : int, default 0
        0 for the biased variance that batch norm normalizes with, 1 for the
        unbiased one of the running statistics.

    Returns
    -------
    mean, var : ndarray of float64

    Raises
    ------
    ValueError
        When a channel's count is not greater than ``ddof``.

    Examples
    --------
    >>> import numpy as np, cbn
    >>> mean, var = cbn.finalize_stats(4, np.array([1.0]), np.array([6.0]), ddof=1)
    >>> var.tolist()
    [2.0]
    """
    _host_only("finalize_stats", count, mean, m2)
    n, mean, m2, ddof = _args.finalize_args(count, mean, m2, ddof)
    return mean, m2 / (n - ddof).astype(np.float64)


def _gradient_args(func, dy, x, mean, channel_axis):
    _host_only(func, dy, x, mean)
    dy = _bulk_input(dy, "dy")
    x = _bulk_input(x, "x")
    axes, cshape, _ = _args.gradient_axes(dy.shape, x.shape, channel_axis)
    mean = _args.per_channel(mean, "mean", cshape)
    result = _args.result_dtype(dy, x)
    work = _args.compute_dtype(result)
    return _as_compute(dy, work), _as_compute(x, work), axes, cshape, mean, result, work


def batch_norm_backward_reduce(dy, x, mean, invstd, *, channel_axis=1):
    """The backward's local reductions: per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``.

    Summed over all pieces of the batch, they give
    :func:`batch_norm_backward_elemt` what it needs, and
    ``dbeta = sum_dy``, ``dgamma = sum_dy_xmu * invstd``.

    Parameters
    ----------
    dy, x : array_like
        This piece's gradient and input, of one shape (the piece may be empty).
    mean, invstd : array_like
        The whole batch's per-channel mean and ``1 / sqrt(var + eps)``
        (invstd is checked but the sums do not depend on it).
    channel_axis : int or tuple of ints, default 1

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray of float64
        Accumulated in float64 whatever the input dtype.

    Examples
    --------
    >>> import numpy as np, cbn
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    >>> mean, var = x.mean(axis=0), x.var(axis=0)
    >>> invstd = 1 / np.sqrt(var + 1e-5)
    >>> halves = [cbn.batch_norm_backward_reduce(dy[s], x[s], mean, invstd) for s in (slice(0, 5), slice(5, 8))]
    >>> sum_dy, sum_dy_xmu = np.sum(halves, axis=0)    # what an all-reduce would give
    >>> dx = np.concatenate([cbn.batch_norm_backward_elemt(dy[s], x[s], mean, invstd, None, sum_dy, sum_dy_xmu, 8)
    ...                      for s in (slice(0, 5), slice(5, 8))])
    >>> bool(np.allclose(dx, cbn.batch_norm_backward(dy, x, mean, invstd)[0]))
    True
    """
    dy, x, axes, cshape, mean, _, _ = _gradient_args("batch_norm_backward_reduce", dy, x, mean, channel_axis)
    _args.per_channel(invstd, "invstd", cshape)
    sums = _compute.grad_sums(dy, x, axes, cshape, mean)
    return sums[0], sums[1]


def batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, *, channel_axis=1, out=None):
    """The backward's elementwise pass, from the whole batch's reduced sums.

    ``dx = gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count)``

    Parameters
    ----------
    dy, x : array_like
        This piece's gradient and input, of one shape.
    mean, invstd : array_like
        The whole batch's statistics.
    gamma : array_like or None
        The scale (None: 1).
    sum_dy, sum_dy_xmu : array_like
        :func:`batch_norm_backward_reduce` summed over every piece.
    count : int or array_like of ints
        Values per channel in the whole batch (> 0).
    channel_axis : int or tuple of ints, default 1
    out : ndarray or 1-tuple of ndarray, optional
        Where to write dx; may be dy or x itself (in place).

    Returns
    -------
    dx : ndarray
        Same shape as x, dtype of dy and x combined (float16 stays float16).

    Examples
    --------
    See :func:`batch_norm_backward_reduce`.
    """
    dy, x, axes, cshape, mean, result, work = _gradient_args("batch_norm_backward_elemt", dy, x, mean, channel_axis)
    _host_only("batch_norm_backward_elemt", invstd, gamma, sum_dy, sum_dy_xmu, count, out)
    invstd, gamma, sum_dy, sum_dy_xmu, n = _args.elemt_args(cshape, invstd, gamma, sum_dy, sum_dy_xmu, count)
    (out_dx,) = _args.outputs(out, ("out",), "batch_norm_backward_elemt")
    _args.check_out(out_dx, "out", x.shape, result)
    dx = _bulk_target(out_dx, x, work, [dy, x])
    _compute.grad_elemt(dy, x, dx, axes, mean, sum_dy / n, invstd * invstd * sum_dy_xmu / n, gamma * invstd)
    return _deliver(dx, out_dx, result)
