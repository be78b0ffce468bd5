"""cbn's public functions: argument checks here, then ``_compute`` drives the kernels.

Each function first offers its call to the kernels' entry points for plain
NumPy arrays (``cbn/_plain.pxi``), which run it without these checks, or
return None for the general path below."""
import numpy as np

from . import _args, _compute, _kernels
from ._layout import empty_like_layout

_EXAMPLE_SETUP = """
    >>> import numpy as np, cbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 4, 5, 5)).astype(np.float32)"""


# --------------------------------------------------------------------------
# Shared steps


_KERNEL_DTYPES = _compute.KERNEL_DTYPES
_FORWARD_OUTPUTS = ("y", "mean", "invstd")
_BACKWARD_OUTPUTS = ("dx", "dgamma", "dbeta")


def _bulk_input(value, name):
    """A bulk input as an ndarray the kernels can read (native, aligned)."""
    if type(value) is np.ndarray and value.dtype in _KERNEL_DTYPES and value.flags.aligned:
        return value  # the common case, checked cheaply
    arr = _args.as_real_array(value, name)
    if not (arr.dtype.isnative and arr.flags.aligned):
        arr = arr.astype(arr.dtype.newbyteorder("="), order="K")
    return arr


def _as_compute(arr, dtype):
    """``arr`` in the kernels' dtype; a copy only when the dtype differs."""
    return arr if arr.dtype == dtype else arr.astype(dtype, order="K")


def _same_view(a, b):
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.dtype == b.dtype
    )


def _bulk_target(out, like, dtype, inputs):
    """Where a kernel writes a bulk result: ``out`` itself when it can.

    ``out`` is used directly when it has the kernels' dtype, is native and
    aligned, and is either disjoint from every input or the very same view
    as one (in place: element i is read before element i is written).
    Otherwise the result goes through a temporary copied into ``out``.
    """
    if out is not None and out.dtype == dtype and out.dtype.isnative and out.flags.aligned:
        if all(_same_view(out, a) or not np.may_share_memory(out, a) for a in inputs):
            return out
    return empty_like_layout(like, dtype)


def _deliver(result, out, dtype):
    """Return ``result`` as ``dtype``, written into ``out`` when given."""
    if out is None:
        return result if result.dtype == dtype else result.astype(dtype, copy=False)
    if result is not out:
        np.copyto(out, result, casting="same_kind")
    return out


def _on_gpu(*values):
    """Whether an argument is a CuPy array (then the GPU path runs); CuPy is not imported to check."""
    for v in values:
        if v is None or type(v) is np.ndarray:
            continue
        if type(v) is tuple:
            if _on_gpu(*v):
                return True
        elif type(v).__module__.partition(".")[0] == "cupy":
            return True
    return False


def _gpu():
    """The GPU path (``cbn._gpu``), imported on first use: it imports CuPy."""
    from . import _gpu

    return _gpu


def _train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs):
    """Checks and computes the training forward; returns (y, mean, invstd).

    ``outs`` holds the ``out=`` entries for (y, mean, invstd) and their labels.
    """
    x = _bulk_input(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions when training, got {x.ndim}")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    count = _args.training_count(x.shape, axes)
    gamma = None if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = None if beta is None else _args.per_channel(beta, "beta", cshape)
    running_mean, running_var = _args.running_pair(running_mean, running_var, cshape, training=True)
    momentum = _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    work = _args.compute_dtype(result)
    (out_y, out_mean, out_invstd), labels = outs
    _args.check_out(out_y, labels[0], x.shape, result)
    _args.check_out(out_mean, labels[1], cshape, work)
    _args.check_out(out_invstd, labels[2], cshape, work)

    xc = _as_compute(x, work)
    y = _bulk_target(out_y, xc, work, [xc])
    stats = _compute.train(xc, y, axes, cshape, count, gamma, beta, eps, act)
    mean, var, invstd = stats
    if running_mean is not None:
        _compute.update_running(running_mean, running_var, mean, var, count, momentum)
    if out_mean is None and out_invstd is None:  # one conversion for both
        mean, invstd = _deliver(stats[0::2], None, work)  # not the variance: it may overflow float32
    return (
        _deliver(y, out_y, result),
        _deliver(mean, out_mean, work),
        _deliver(invstd, out_invstd, work),
    )


# --------------------------------------------------------------------------
# Public functions


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
    """Batch normalization, ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``.

    Parameters
    ----------
    x : array_like
        Input, at least 2-D when training.  float16 is computed in float32
        and returned as float16; integers and bools give float64.  A
        ``cupy.ndarray`` is computed on its GPU (every array argument of the
        call must then be a CuPy array, and results are CuPy arrays).
    gamma, beta : array_like, optional
        Per-channel scale and shift, of shape ``tuple(x.shape[a] for a in
        channel_axis)``.  Default: 1 and 0.
    running_mean, running_var : ndarray, optional
        Running estimates.  When training they are updated in place as
        PyTorch does: ``r = (1 - momentum) * r + momentum * batch_stat``,
        with the unbiased batch variance.  Required when ``training=False``.
    training : bool, default True
        Normalize with the batch statistics (True) or the running ones.
    momentum : float, default 0.1
        Weight of the batch statistics in the running update, in [0, 1].
    eps : float, default 1e-5
        Added to the variance before the square root; finite and >= 0.
    channel_axis : int or tuple of ints, default 1
        The channel axis or axes; statistics reduce over all other axes.
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh"}, optional
        Applied to the normalized, scaled and shifted value in the same pass.
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` for negative inputs.
    out : ndarray or 1-tuple of ndarray, optional
        Where to write y (same shape as x; ``out=x`` works in place).

    Returns
    -------
    y : ndarray
        The normalized array, same shape as x.

    Raises
    ------
    ValueError
        Training with one value per channel, bad shapes or axes, bad scalars.
    TypeError
        Complex, object or string inputs; an ``out`` that cannot hold y.

    Examples
    --------{setup}
    >>> y = cbn.batch_norm(x)
    >>> bool(np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5))
    True
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y = cbn.batch_norm(x, running_mean=rm, running_var=rv)  # updates rm, rv
    >>> y_eval = cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False)
    """
    if training:
        y = _kernels.train_plain(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation,
                                 negative_slope, out, False)
    else:
        y = _kernels.inference_plain(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis,
                                     activation, negative_slope, out)
    if y is not None:  # plain NumPy arrays, run without the checks below
        return y
    act = _args.activation(activation, negative_slope)
    if _on_gpu(x, gamma, beta, running_mean, running_var, out):
        gpu = _gpu()
        (out_y,) = gpu.outputs(out, ("out",), "batch_norm")
        if training:
            outs = (out_y, None, None)
            return gpu.train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act,
                                     outs, ("out", None, None))[0]
        return gpu.inference(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, out_y)
    (out_y,) = _args.outputs(out, ("out",), "batch_norm")
    if training:
        outs = ((out_y, None, None), ("out", None, None))
        y, _, _ = _train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs)
        return y

    x = _bulk_input(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    gamma = None if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = None if beta is None else _args.per_channel(beta, "beta", cshape)
    mean, var = _args.running_pair(running_mean, running_var, cshape, training=False)
    _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    _args.check_out(out_y, "out", x.shape, result)

    work = _args.compute_dtype(result)
    xc = _as_compute(x, work)
    y = _bulk_target(out_y, xc, work, [xc])
    _compute.inference(xc, y, axes, mean, var, gamma, beta, eps, act)
    return _deliver(y, out_y, result)


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
    """Training forward that also returns what :func:`batch_norm_backward` needs.

    Parameters
    ----------
    x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation, negative_slope
        As for :func:`batch_norm` with ``training=True``.
    out : tuple of 3 ndarrays or None, optional
        Where to write (y, mean, invstd); entries may be None.  Statistics
        are computed in float64: float64 ``out`` arrays for mean and invstd
        keep all of it.

    Returns
    -------
    y : ndarray
        Normalized x.
    mean, invstd : ndarray
        Batch mean and ``1 / sqrt(var + eps)`` (biased variance), one per
        channel, float32 for float16/float32 input, float64 otherwise.

    Examples
    --------{setup}
    >>> y, mean, invstd = cbn.batch_norm_forward(x)
    >>> mean.shape, invstd.dtype
    ((4,), dtype('float32'))
    """
    fast = _kernels.train_plain(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation,
                                negative_slope, out, True)
    if fast is not None:  # plain NumPy arrays, run without the checks below
        return fast
    act = _args.activation(activation, negative_slope)
    if _on_gpu(x, gamma, beta, running_mean, running_var, out):
        gpu = _gpu()
        outs = gpu.outputs(out, _FORWARD_OUTPUTS, "batch_norm_forward")
        labels = _args.out_labels(_FORWARD_OUTPUTS)
        return gpu.train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs,
                                 labels)
    outs = _args.outputs(out, _FORWARD_OUTPUTS, "batch_norm_forward")
    labels = _args.out_labels(_FORWARD_OUTPUTS)
    return _train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, (outs, labels))


def batch_norm_backward(
    dy, x, mean, invstd, gamma=None, beta=None, *, activation=None, negative_slope=0.01, channel_axis=1, out=None
):
    """Gradient of the training-mode batch norm with respect to x, gamma and beta.

    With ``xhat = (x - mean) * invstd`` and m values per channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)

    With an activation, ``dy`` is first taken through it: ``dy * act'(z)``
    with the pre-activation ``z = gamma * xhat + beta`` recomputed from x.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y, same shape as x.  CuPy
        arrays (all of them) are computed on the GPU.
    x : array_like
        The forward's input.
    mean, invstd : array_like
        Per-channel values returned by :func:`batch_norm_forward`.
    gamma, beta : array_like, optional
        The forward's scale and shift (default 1 and 0); beta matters only
        with an activation.
    activation, negative_slope
        The forward's activation (see :func:`batch_norm`).
    channel_axis : int or tuple of ints, default 1
        As in the forward.
    out : tuple of 3 ndarrays or None, optional
        Where to write (dx, dgamma, dbeta); entries may be None.  ``dx`` may
        be ``dy`` or ``x`` itself (in place).

    Returns
    -------
    dx : ndarray
        Same shape as x, dtype of dy and x combined (float16 stays float16).
    dgamma, dbeta : ndarray
        One per channel, float32 for float16/float32 input, float64 otherwise.

    Examples
    --------{setup}
    >>> y, mean, invstd = cbn.batch_norm_forward(x)
    >>> dx, dgamma, dbeta = cbn.batch_norm_backward(np.ones_like(y), x, mean, invstd)
    >>> bool(np.allclose(dx, 0, atol=1e-5))  # a constant gradient is absorbed by the mean
    True
    """
    fast = _kernels.backward_plain(dy, x, mean, invstd, gamma, beta, activation, negative_slope, channel_axis, out)
    if fast is not None:  # plain NumPy arrays, run without the checks below
        return fast
    act = _args.activation(activation, negative_slope)
    if _on_gpu(dy, x, mean, invstd, gamma, beta, out):
        gpu = _gpu()
        outs = gpu.outputs(out, _BACKWARD_OUTPUTS, "batch_norm_backward")
        return gpu.backward(dy, x, mean, invstd, gamma, beta, act, channel_axis, outs,
                            _args.out_labels(_BACKWARD_OUTPUTS))
    out_dx, out_dgamma, out_dbeta = _args.outputs(out, _BACKWARD_OUTPUTS, "batch_norm_backward")
    labels = _args.out_labels(_BACKWARD_OUTPUTS)
    dy = _bulk_input(dy, "dy")
    x = _bulk_input(x, "x")
    axes, cshape, count = _args.gradient_axes(dy.shape, x.shape, channel_axis)
    mean = _args.per_channel(mean, "mean", cshape)
    invstd = _args.per_channel(invstd, "invstd", cshape)
    gamma = np.ones(cshape) if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = np.zeros(cshape) if beta is None else _args.per_channel(beta, "beta", cshape)
    result = _args.result_dtype(dy, x)
    work = _args.compute_dtype(result)
    _args.check_out(out_dx, labels[0], x.shape, result)
    _args.check_out(out_dgamma, labels[1], cshape, work)
    _args.check_out(out_dbeta, labels[2], cshape, work)

    dyc = _as_compute(dy, work)
    xc = _as_compute(x, work)
    dx = _bulk_target(out_dx, xc, work, [dyc, xc])
    if act[0] and np.may_share_memory(dx, xc):  # dz goes into dx first: it must not overwrite x
        dx = empty_like_layout(xc, work)
    sum_dy, sum_dy_xmu = _compute.backward(dyc, xc, dx, axes, cshape, count, mean, invstd, gamma, beta, act)
    dgamma = sum_dy_xmu * invstd
    return (
        _deliver(dx, out_dx, result),
        _deliver(dgamma, out_dgamma, work),
        _deliver(sum_dy, out_dbeta, work),
    )


def batch_stats(x, *, channel_axis=1):
    """Per-channel mean and biased variance over all axes but the channel axes.

    Accumulated in float64 from deviations, whatever x's dtype.

    Parameters
    ----------
    x : array_like
        Input with at least one value per channel (a ``cupy.ndarray`` is
        computed on its GPU).
    channel_axis : int or tuple of ints, default 1
        The channel axis or axes.

    Returns
    -------
    mean, var : ndarray
        Shape ``tuple(x.shape[a] for a in channel_axis)``; float32 for
        float16/float32 input, float64 otherwise.

    Examples
    --------{setup}
    >>> mean, var = cbn.batch_stats(x)
    >>> bool(np.allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-5))
    True
    """
    if _on_gpu(x):
        return _gpu().batch_stats(x, channel_axis)
    x = _bulk_input(x, "x")
    axes, cshape, count = _args.stats_axes(x.shape, channel_axis)
    work = _args.compute_dtype(_args.result_dtype(x))
    mean, m2 = _compute.channel_stats(_as_compute(x, work), axes, cshape)
    return mean.astype(work), (m2 / count).astype(work)


for _f in (batch_norm, batch_norm_forward, batch_norm_backward, batch_stats):
    _f.__doc__ = (_f.__doc__ or "").replace("{setup}", _EXAMPLE_SETUP)
del _f
