"""The executable specification: cbn's functions in plain NumPy.

Same signatures, argument rules and result dtypes as the compiled functions
(the checks are shared, from ``cbn._args``); the arithmetic is written out
independently, in float64, as in Ioffe & Szegedy (2015).  The tests hold the
compiled kernels to these results.  Slow and memory-hungry on purpose: it
favours being obviously right.
"""
import numpy as np

from . import _args

__all__ = [
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_stats",
    "batch_stats_partial",
    "combine_stats",
    "finalize_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]


def _channels_last(x, axes):
    """float64 copy of x with the channel axes moved to the end, in the given order."""
    n = len(axes)
    return np.moveaxis(np.asarray(x, dtype=np.float64), axes, tuple(range(-n, 0)))


def _channels_back(t, axes):
    n = len(axes)
    return np.moveaxis(t, tuple(range(-n, 0)), axes)


def _reduced_axes(t, axes):
    return tuple(range(t.ndim - len(axes)))


def _write(value, out, dtype):
    value = value.astype(dtype)
    if out is None:
        return value
    np.copyto(out, value, casting="same_kind")
    return out


def _activate(z, activation, slope):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, z * slope)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    return z


def activation_derivative(z, activation, slope):
    """d act(z) / dz, the activation's slope at the pre-activation z (also used by BatchNorm's eval backward)."""
    if activation == "relu":
        return (z > 0).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if activation in ("sigmoid", "tanh"):
        a = _activate(z, activation, slope)
        return a * (1.0 - a) if activation == "sigmoid" else 1.0 - a * a
    return np.ones_like(z)


def _stats64(t, axes):
    red = _reduced_axes(t, axes)
    mean = t.mean(axis=red)
    var = ((t - mean) ** 2).mean(axis=red)
    return mean, var


def batch_stats(x, *, channel_axis=1):
    """Per-channel mean and biased variance (see :func:`cbn.batch_stats`)."""
    x = _args.as_real_array(x, "x")
    axes, _, _ = _args.stats_axes(x.shape, channel_axis)
    work = _args.compute_dtype(_args.result_dtype(x))
    mean, var = _stats64(_channels_last(x, axes), axes)
    return mean.astype(work), var.astype(work)


def batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    *,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    eps=1e-5,
    channel_axis=1,
    activation=None,
    negative_slope=0.01,
    out=None,
):
    """Training forward returning (y, mean, invstd) (see :func:`cbn.batch_norm_forward`)."""
    act = (activation, _args.activation(activation, negative_slope)[1])
    names = ("y", "mean", "invstd")
    outs = _args.outputs(out, names, "batch_norm_forward")
    labels = _args.out_labels(names)
    return _forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs, labels)


def _forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs, labels):
    out_y, out_mean, out_invstd = outs
    x = _args.as_real_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions when training, got {x.ndim}")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    m = _args.training_count(x.shape, axes)
    gamma = np.ones(cshape) if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = np.zeros(cshape) if beta is None else _args.per_channel(beta, "beta", cshape)
    _args.running_pair(running_mean, running_var, cshape, training=True)
    momentum = _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    work = _args.compute_dtype(result)
    _args.check_out(out_y, labels[0], x.shape, result)
    _args.check_out(out_mean, labels[1], cshape, work)
    _args.check_out(out_invstd, labels[2], cshape, work)

    t = _channels_last(x, axes)
    mean, var = _stats64(t, axes)
    invstd = 1.0 / np.sqrt(var + eps)
    y = _activate(gamma * (t - mean) * invstd + beta, *act)
    if running_mean is not None:
        unbiased = var * m / (m - 1)
        running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = (1 - momentum) * running_var.astype(np.float64) + momentum * unbiased
    return (
        _write(_channels_back(y, axes), out_y, result),
        _write(mean, out_mean, work),
        _write(invstd, out_invstd, work),
    )


def batch_norm(
    x,
    gamma=None,
    beta=None,
    *,
    running_mean=None,
    running_var=None,
    training=True,
    momentum=0.1,
    eps=1e-5,
    channel_axis=1,
    activation=None,
    negative_slope=0.01,
    out=None,
):
    """Batch normalization (see :func:`cbn.batch_norm`)."""
    act = (activation, _args.activation(activation, negative_slope)[1])
    (out_y,) = _args.outputs(out, ("out",), "batch_norm")
    if training:
        outs = (out_y, None, None)
        labels = ("out", None, None)
        return _forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs, labels)[0]
    x = _args.as_real_array(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    gamma = np.ones(cshape) if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = np.zeros(cshape) if beta is None else _args.per_channel(beta, "beta", cshape)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    mean = _args.per_channel(running_mean, "running_mean", cshape)
    var = _args.per_channel(running_var, "running_var", cshape)
    _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    _args.check_out(out_y, "out", x.shape, result)

    t = _channels_last(x, axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = _activate(gamma * (t - mean) / np.sqrt(var + eps) + beta, *act)
    return _write(_channels_back(y, axes), out_y, result)


def batch_norm_backward(
    dy, x, mean, invstd, gamma=None, beta=None, *, activation=None, negative_slope=0.01, channel_axis=1, out=None
):
    """Gradient of the training forward (see :func:`cbn.batch_norm_backward`)."""
    slope = _args.activation(activation, negative_slope)[1]
    names = ("dx", "dgamma", "dbeta")
    out_dx, out_dgamma, out_dbeta = _args.outputs(out, names, "batch_norm_backward")
    labels = _args.out_labels(names)
    dy = _args.as_real_array(dy, "dy")
    x = _args.as_real_array(x, "x")
    axes, cshape, m = _args.gradient_axes(dy.shape, x.shape, channel_axis)
    mean = _args.per_channel(mean, "mean", cshape)
    invstd = _args.per_channel(invstd, "invstd", cshape)
    gamma = np.ones(cshape) if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = np.zeros(cshape) if beta is None else _args.per_channel(beta, "beta", cshape)
    result = _args.result_dtype(dy, x)
    work = _args.compute_dtype(result)
    _args.check_out(out_dx, labels[0], x.shape, result)
    _args.check_out(out_dgamma, labels[1], cshape, work)
    _args.check_out(out_dbeta, labels[2], cshape, work)

    xhat = (_channels_last(x, axes) - mean) * invstd
    g = _channels_last(dy, axes) * activation_derivative(gamma * xhat + beta, activation, slope)
    red = _reduced_axes(g, axes)
    dbeta = g.sum(axis=red)
    dgamma = (g * xhat).sum(axis=red)
    dx = gamma * invstd / m * (m * g - dbeta - xhat * dgamma) if m else g
    return (
        _write(_channels_back(dx, axes), out_dx, result),
        _write(dgamma, out_dgamma, work),
        _write(dbeta, out_dbeta, work),
    )


# --------------------------------------------------------------------------
# Batch norm in pieces (see cbn._partials)


def batch_stats_partial(x, *, channel_axis=1):
    """(count, mean, m2) of one piece of a batch (see :func:`cbn.batch_stats_partial`)."""
    x = _args.as_real_array(x, "x")
    axes, cshape, n = _args.partial_axes(x.shape, channel_axis)
    if n == 0 or x.size == 0:
        return np.int64(n), np.zeros(cshape), np.zeros(cshape)
    t = _channels_last(x, axes)
    red = _reduced_axes(t, axes)
    mean = t.mean(axis=red)
    return np.int64(n), mean, ((t - mean) ** 2).sum(axis=red)


def combine_stats(counts, means, m2s):
    """Partials merged one after the other with Chan's update (see :func:`cbn.combine_stats`)."""
    n_i, mean_i, m2_i, total = _args.partials(counts, means, m2s)
    n, mean, m2 = np.zeros(mean_i.shape[1:]), np.zeros(mean_i.shape[1:]), np.zeros(mean_i.shape[1:])
    for nb, mb, m2b in zip(n_i.astype(np.float64), mean_i, m2_i):
        merged = n + nb
        safe = np.where(merged > 0, merged, 1.0)
        delta = np.where(nb > 0, mb - mean, 0.0)
        mean = mean + delta * nb / safe
        m2 = m2 + np.where(nb > 0, m2b, 0.0) + delta * delta * n * nb / safe
        n = merged
    return total, mean, m2


def finalize_stats(count, mean, m2, *, ddof=0):
    """Mean and ``m2 / (count - ddof)`` (see :func:`cbn.finalize_stats`)."""
    n, mean, m2, ddof = _args.finalize_args(count, mean, m2, ddof)
    return mean, m2 / (n - ddof)


def _piece_gradient(dy, x, mean, channel_axis):
    dy = _args.as_real_array(dy, "dy")
    x = _args.as_real_array(x, "x")
    axes, cshape, _ = _args.gradient_axes(dy.shape, x.shape, channel_axis)
    mean = _args.per_channel(mean, "mean", cshape)
    return dy, x, axes, cshape, mean


def batch_norm_backward_reduce(dy, x, mean, invstd, *, channel_axis=1):
    """sum(dy) and sum(dy * (x - mean)) per channel (see :func:`cbn.batch_norm_backward_reduce`)."""
    dy, x, axes, cshape, mean = _piece_gradient(dy, x, mean, channel_axis)
    _args.per_channel(invstd, "invstd", cshape)
    g = _channels_last(dy, axes)
    red = _reduced_axes(g, axes)
    return g.sum(axis=red), (g * (_channels_last(x, axes) - mean)).sum(axis=red)


def batch_norm_backward_elemt(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, *, channel_axis=1, out=None):
    """dx from the whole batch's sums (see :func:`cbn.batch_norm_backward_elemt`)."""
    dy, x, axes, cshape, mean = _piece_gradient(dy, x, mean, channel_axis)
    invstd, gamma, sum_dy, sum_dy_xmu, m = _args.elemt_args(cshape, invstd, gamma, sum_dy, sum_dy_xmu, count)
    (out_dx,) = _args.outputs(out, ("out",), "batch_norm_backward_elemt")
    result = _args.result_dtype(dy, x)
    _args.check_out(out_dx, "out", x.shape, result)
    xhat = (_channels_last(x, axes) - mean) * invstd
    dx = gamma * invstd / m * (m * _channels_last(dy, axes) - sum_dy - xhat * sum_dy_xmu * invstd)
    return _write(_channels_back(dx, axes), out_dx, result)
