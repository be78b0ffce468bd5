"""Batch norm of Dask arrays: statistics merged over chunks, then a chunkwise normalize.

``batch_stats`` reduces each chunk to a ``(count, mean, m2)`` partial
(:func:`cbn.batch_stats_partial`) and merges them in a tree with
:func:`cbn.combine_stats` (``dask.array.reduction``); ``batch_norm``
normalizes each chunk with cbn's kernels (``dask.array.blockwise``).  Both
are lazy, work with any chunking (the channel axes may be chunked too), and
run on any Dask scheduler: threads, processes, or a ``distributed`` cluster.

``import cbn.dask`` needs Dask (``pip install 'cbn[dask]'``).
"""
import functools

import numpy as np

from . import _args
from ._api import batch_norm as _batch_norm
from ._partials import batch_stats_partial, combine_stats

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("cbn.dask needs Dask: pip install 'cbn[dask]'") from exc

__all__ = ["batch_norm", "batch_stats"]

# one chunk's (or several chunks') statistics, per channel
PARTIAL = np.dtype([("count", np.int64), ("mean", np.float64), ("m2", np.float64)])


def _as_dask(x):
    if not isinstance(x, da.Array):
        x = da.asarray(x)
    _args.check_real_dtype(x.dtype, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension")
    return x


def _chunk_partial(block, axis, keepdims, channels):
    """A chunk's partial, shaped like the chunk with the reduced axes kept at length 1."""
    count, mean, m2 = batch_stats_partial(block, channel_axis=channels)
    out = np.empty(tuple(1 if i in axis else n for i, n in enumerate(block.shape)), PARTIAL)
    out["count"], out["mean"], out["m2"] = count, mean.reshape(out.shape), m2.reshape(out.shape)
    return out


def _merge(partials, axis, keepdims):
    """Partials concatenated along the reduced axes, merged into one per channel."""
    pieces = np.moveaxis(partials, axis, tuple(range(len(axis))))
    pieces = pieces.reshape((-1, *pieces.shape[len(axis):]))
    count, mean, m2 = combine_stats(pieces["count"], pieces["mean"], pieces["m2"])
    shape = tuple(1 if i in axis else n for i, n in enumerate(partials.shape)) if keepdims else mean.shape
    out = np.empty(shape, PARTIAL)
    out["count"], out["mean"], out["m2"] = count.reshape(shape), mean.reshape(shape), m2.reshape(shape)
    return out


def _whole_stats(x, axes):
    """Lazy per-channel float64 (mean, biased var), channels in increasing axis order."""
    channels = tuple(sorted(axes))
    reduced = tuple(i for i in range(x.ndim) if i not in axes)
    count = _args.values_per_channel(x.shape, axes)
    if count == 0:  # NaN (unknown chunk sizes) passes: it fails when computed
        raise ValueError(f"x has no values per channel (shape {x.shape}); statistics are undefined")
    stats = da.reduction(
        x, functools.partial(_chunk_partial, channels=channels), _merge, combine=_merge, axis=reduced,
        keepdims=False, dtype=PARTIAL, concatenate=True, name="cbn-batch-stats",
        meta=np.empty((0,) * len(axes), PARTIAL),
    )
    return stats["mean"], stats["m2"] / stats["count"]


def _given_order(per_channel, axes):
    """Per-channel arrays from increasing axis order to channel_axis's order."""
    order = tuple(np.argsort(np.argsort(axes)))
    return per_channel if order == tuple(range(len(axes))) else per_channel.transpose(order)


def batch_stats(x, *, channel_axis=1):
    """Per-channel mean and biased variance of a Dask array, lazily (see :func:`cbn.batch_stats`).

    Parameters
    ----------
    x : dask.array.Array or array_like
    channel_axis : int or tuple of ints, default 1

    Returns
    -------
    mean, var : dask.array.Array
        Shape ``tuple(x.shape[a] for a in channel_axis)``; float32 for
        float16/float32 input, float64 otherwise (merged in float64).

    Examples
    --------
    >>> import dask.array as da, numpy as np, cbn.dask
    >>> x = da.from_array(np.arange(24.0).reshape(4, 3, 2), chunks=(3, 2, 1))
    >>> mean, var = cbn.dask.batch_stats(x)
    >>> mean.compute().tolist(), var.compute().tolist()
    ([9.5, 11.5, 13.5], [45.25, 45.25, 45.25])
    """
    x = _as_dask(x)
    axes = _args.channel_axes(channel_axis, x.ndim)
    work = _args.compute_dtype(_args.result_dtype(x))
    mean, var = _whole_stats(x, axes)
    return _given_order(mean, axes).astype(work), _given_order(var, axes).astype(work)


def _per_channel(value, name, cshape, axes):
    """A per-channel argument as a Dask array with its axes in increasing axis order."""
    if not isinstance(value, da.Array):
        value = da.from_array(_args.per_channel(value, name, cshape))
    elif value.shape != cshape:
        raise ValueError(f"{name} must have shape {cshape} (one value per channel), got shape {value.shape}")
    _args.check_real_dtype(value.dtype, name)
    order = tuple(int(i) for i in np.argsort(axes))
    return value.transpose(order) if order != tuple(range(len(axes))) else value


def _normalize_chunk(x, mean, var, gamma, beta, *, eps, channels, activation, negative_slope):
    return _batch_norm(x, gamma, beta, running_mean=mean, running_var=var, training=False, eps=eps,
                       channel_axis=channels, activation=activation, negative_slope=negative_slope)


def batch_norm(
    x,
    gamma=None,
    beta=None,
    *,
    running_mean=None,
    running_var=None,
    training=True,
    eps=1e-5,
    channel_axis=1,
    activation=None,
    negative_slope=0.01,
):
    """Batch normalization of a Dask array, lazily (see :func:`cbn.batch_norm`).

    When training, x is normalized with its own statistics, merged over all
    chunks in float64 (two passes over x when computed: statistics, then
    the normalize).  Running statistics are read (``training=False``), never
    updated: update them from :func:`batch_stats` once computed.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Chunked any way, the channel axes included.
    gamma, beta, running_mean, running_var : array_like or dask.array.Array, optional
        Per-channel arrays of shape ``tuple(x.shape[a] for a in channel_axis)``.
    training, eps, channel_axis, activation, negative_slope
        As for :func:`cbn.batch_norm`.

    Returns
    -------
    y : dask.array.Array
        Same shape and chunks as x; dtype as :func:`cbn.batch_norm` gives.

    Examples
    --------
    >>> import dask.array as da, numpy as np, cbn, cbn.dask
    >>> x = np.random.default_rng(0).normal(size=(64, 3, 8))
    >>> y = cbn.dask.batch_norm(da.from_array(x, chunks=(16, 2, 4)))
    >>> bool(np.allclose(y.compute(), cbn.batch_norm(x)))
    True
    """
    x = _as_dask(x)
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    _args.activation(activation, negative_slope)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if training:
        if running_mean is not None:
            raise ValueError("cbn.dask.batch_norm does not update running statistics (a lazy graph may run "
                             "any number of times); update them from cbn.dask.batch_stats, or pass training=False")
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions when training, got {x.ndim}")
        if _args.values_per_channel(x.shape, axes) == 1:
            raise ValueError(f"expected more than 1 value per channel when training, got input of shape {x.shape}")
        mean, var = _whole_stats(x, axes)  # float64, channels in increasing axis order
    else:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when training=False")
        mean = _per_channel(running_mean, "running_mean", cshape, axes)
        var = _per_channel(running_var, "running_var", cshape, axes)
    gamma = None if gamma is None else _per_channel(gamma, "gamma", cshape, axes)
    beta = None if beta is None else _per_channel(beta, "beta", cshape, axes)

    index = tuple(range(x.ndim))
    channel_index = tuple(sorted(axes))
    per_channel = [(None, None) if p is None else (p, channel_index) for p in (mean, var, gamma, beta)]
    result = _args.result_dtype(x)
    return da.blockwise(
        _normalize_chunk, index, x, index, *(v for pair in per_channel for v in pair),
        dtype=result, meta=np.empty((0,) * x.ndim, result), token="cbn-batch-norm",
        eps=eps, channels=channel_index, activation=activation, negative_slope=negative_slope,
    )
