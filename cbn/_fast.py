"""The common call in a few operations: plain arrays straight to the kernels.

For small arrays the general path's checks cost more than the arithmetic.
These functions recognise, cheaply, calls that need none of its conversions:
C-contiguous, aligned, native float32/float64 ``x`` (and ``dy``), one int
channel axis, per-channel arguments that are already float64 (or, for the
gradient, float) arrays of the channel shape, Python-float scalars in range,
and an ``out`` array exactly like ``x`` that overlaps no input (or is it).
They return None for anything else, and the general path in ``cbn._api``
then checks, converts and raises as usual.  Results are bitwise those of the
general path: the same kernel gets the same views and parameters.
"""
import math

import numpy as np

from . import _kernels
from ._compute import KERNEL_DTYPES as _KERNEL_DTYPES
from ._compute import NO_PARAMETER as _NONE

_FLOAT64 = np.dtype(np.float64)


def _plain(a):
    """A C-contiguous, aligned, native float32/float64 ndarray."""
    if type(a) is not np.ndarray or a.dtype not in _KERNEL_DTYPES:
        return False
    flags = a.flags
    return flags.c_contiguous and flags.aligned


def _channel_view_shape(x, channel_axis):
    """(A, C, B) for a plain x and an int channel axis in range, else None."""
    if type(channel_axis) is not int:
        return None
    shape = x.shape
    ndim = len(shape)
    if not -ndim <= channel_axis < ndim:
        return None
    k = channel_axis % ndim
    return math.prod(shape[:k]), shape[k], math.prod(shape[k + 1 :])


def _per_channel(p, c, dtypes=(_FLOAT64,)):
    """None, or a C-contiguous 1-D array of ``c`` values of one of ``dtypes``."""
    return p is None or (type(p) is np.ndarray and p.dtype in dtypes and p.shape == (c,) and p.flags.c_contiguous)


def _target(out, x, inputs):
    """Where to write the bulk result: a new array, ``out`` itself, or None (general path)."""
    if out is None:
        return np.empty(x.shape, x.dtype)
    if _plain(out) and out.dtype == x.dtype and out.shape == x.shape and out.flags.writeable:
        if all(out is a or not np.may_share_memory(out, a) for a in inputs):
            return out
    return None


def forward(x, gamma, beta, momentum, eps, channel_axis, out_y, act=(0, 0.0)):
    """Training forward without running statistics: (y, stats (3, C) float64) or None."""
    if not _plain(x) or x.ndim < 2 or type(eps) is not float or type(momentum) is not float:
        return None
    if not (0.0 <= eps < math.inf and 0.0 <= momentum <= 1.0):
        return None
    abc = _channel_view_shape(x, channel_axis)
    if abc is None or abc[0] * abc[2] <= 1 or not (_per_channel(gamma, abc[1]) and _per_channel(beta, abc[1])):
        return None
    y = _target(out_y, x, (x,))
    if y is None:
        return None
    stats = np.empty((3, abc[1]))
    g = _NONE if gamma is None else gamma
    b = _NONE if beta is None else beta
    _kernels.forward_train(x.reshape(abc), y.reshape(abc), g, b, eps, stats, *act)
    return y, stats


def inference(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, out_y, act=(0, 0.0)):
    """Forward with running statistics: y or None."""
    if not _plain(x) or type(eps) is not float or type(momentum) is not float:
        return None
    if not (0.0 <= eps < math.inf and 0.0 <= momentum <= 1.0):
        return None
    abc = _channel_view_shape(x, channel_axis)
    if abc is None or running_mean is None or running_var is None:
        return None
    c = abc[1]
    if not all(_per_channel(p, c) for p in (gamma, beta, running_mean, running_var)):
        return None
    y = _target(out_y, x, (x,))
    if y is None:
        return None
    g = _NONE if gamma is None else gamma
    b = _NONE if beta is None else beta
    _kernels.inference(x.reshape(abc), y.reshape(abc), running_mean, running_var, g, b, eps, *act)
    return y


def backward(dy, x, mean, invstd, gamma, beta, channel_axis, out_dx, act=(0, 0.0)):
    """Training-mode gradient: (dx, sums (2, C) float64, invstd float64) or None."""
    if not (_plain(x) and _plain(dy) and dy.dtype == x.dtype and dy.shape == x.shape and x.size):
        return None
    abc = _channel_view_shape(x, channel_axis)
    if abc is None:
        return None
    c = abc[1]
    if not (_per_channel(mean, c, _KERNEL_DTYPES) and _per_channel(invstd, c, _KERNEL_DTYPES) and mean is not None
            and invstd is not None and _per_channel(gamma, c, _KERNEL_DTYPES) and _per_channel(beta, c)):
        return None
    dx = _target(out_dx, x, (dy, x))
    if dx is None or (act[0] and dx is x):
        return None
    params = np.empty((4 if act[0] else 3, c))
    params[0] = mean
    params[1] = invstd
    params[2] = 1.0 if gamma is None else gamma
    if act[0]:  # the kernel takes dy through the activation, z recomputed with beta
        params[3] = 0.0 if beta is None else beta
    sums = np.empty((2, c))
    _kernels.backward(dy.reshape(abc), x.reshape(abc), dx.reshape(abc), params, sums, *act)
    return dx, sums, params[1]
