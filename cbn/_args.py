"""Argument checking and dtype rules shared by cbn and cbn.reference.

Everything here runs before any computation, so a bad call raises without
touching caller data.  Errors name the argument at fault.
"""
import functools
import math
import operator

import numpy as np

_UNSUPPORTED_KINDS = {
    "c": "complex",
    "O": "object",
    "U": "string",
    "S": "bytes",
    "V": "structured/void",
    "M": "datetime",
    "m": "timedelta",
}


def as_real_array(value, name):
    """``np.asarray(value)``, rejecting dtypes that are not real numbers."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to an array of numbers: {exc}") from None
    check_real_dtype(arr.dtype, name)
    return arr


def check_real_dtype(dtype, name):
    """Reject dtypes that are not real numbers cbn can compute with."""
    kind = dtype.kind
    if kind in _UNSUPPORTED_KINDS:
        raise TypeError(f"{name} has {_UNSUPPORTED_KINDS[kind]} dtype {dtype}; cbn needs real numbers")
    if kind == "f" and dtype.itemsize > 8:
        raise TypeError(f"{name} has dtype {dtype}; cbn supports float16, float32 and float64")


def result_dtype(*arrays):
    """dtype of the bulk result, as for ``np.true_divide``.

    float16, float32 and float64 stay themselves (the widest of the inputs);
    bool and integer inputs give float64.
    """
    dtype = arrays[0].dtype if len(arrays) == 1 else np.result_type(*(a.dtype for a in arrays))
    return np.dtype(np.float64) if dtype.kind in "biu" else dtype


def compute_dtype(result):
    """dtype the kernels run in: float16 computes in float32."""
    return np.dtype(np.float32) if result == np.float16 else result


def channel_axes(channel_axis, ndim):
    """Normalize ``channel_axis`` (int or tuple of ints) to non-negative ints."""
    if type(channel_axis) is int and -ndim <= channel_axis < ndim:
        return (channel_axis % ndim,)
    axes = channel_axis if isinstance(channel_axis, tuple) else (channel_axis,)
    if not axes:
        raise ValueError("channel_axis must name at least one axis")
    normalized = []
    for axis in axes:
        try:
            axis = operator.index(axis)
        except TypeError:
            raise TypeError(f"channel_axis must be an int or a tuple of ints, got {channel_axis!r}") from None
        if not -ndim <= axis < ndim:
            raise ValueError(f"channel_axis {axis} is out of bounds for an input with {ndim} dimensions")
        normalized.append(axis % ndim)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"channel_axis {channel_axis!r} repeats an axis")
    return tuple(normalized)


def channel_shape(shape, axes):
    return tuple(shape[a] for a in axes)


def values_per_channel(shape, axes):
    """How many values share each channel (product of the reduced extents)."""
    count = 1
    for i, n in enumerate(shape):
        if i not in axes:
            count *= n
    return count


def per_channel(value, name, cshape):
    """A per-channel argument as a C-contiguous float64 array of shape ``cshape``."""
    arr = as_real_array(value, name)
    if arr.shape != cshape:
        raise ValueError(f"{name} must have shape {cshape} (one value per channel), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _writeable(arr):
    """False for a read-only NumPy array; CuPy arrays have no such flag and are always writeable."""
    return getattr(arr.flags, "writeable", True)


def running_stat(value, name, cshape, array_type=np.ndarray):
    """A running statistic updated in place: a writeable float array of ``array_type``."""
    if not isinstance(value, array_type):
        kind = f"{array_type.__module__.split('.')[0]}.{array_type.__name__}"
        raise TypeError(f"{name} must be a {kind} (it is updated in place), got {type(value).__name__}")
    if value.dtype.kind != "f" or value.dtype.itemsize > 8:
        raise TypeError(f"{name} must have a float16, float32 or float64 dtype, got {value.dtype}")
    if value.shape != cshape:
        raise ValueError(f"{name} must have shape {cshape} (one value per channel), got shape {value.shape}")
    if not _writeable(value):
        raise ValueError(f"{name} is read-only; it is updated in place in training")
    return value


def stats_axes(shape, channel_axis):
    """(axes, channel shape, values per channel) of a statistics call, which needs a value per channel."""
    if len(shape) < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = channel_axes(channel_axis, len(shape))
    count = values_per_channel(shape, axes)
    if count == 0:
        raise ValueError(f"x has no values per channel (shape {shape}); statistics are undefined")
    return axes, channel_shape(shape, axes), count


def gradient_axes(dy_shape, shape, channel_axis):
    """(axes, channel shape, values per channel) of a gradient call: dy shaped like x."""
    if dy_shape != shape:
        raise ValueError(f"dy and x must have the same shape, got {dy_shape} and {shape}")
    if len(shape) < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = channel_axes(channel_axis, len(shape))
    return axes, channel_shape(shape, axes), values_per_channel(shape, axes)


def training_count(shape, axes):
    """Values per channel, of which training needs more than one."""
    count = values_per_channel(shape, axes)
    if count <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {shape}")
    return count


def running_pair(running_mean, running_var, cshape, training, check_stat=running_stat, check_channel=per_channel):
    """The running statistics of a call: both or neither, required at inference.

    Training updates them in place (each checked by ``check_stat``);
    inference reads them (``check_channel``).  The GPU path passes its own
    checks for CuPy arrays.
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is None:
        if not training:
            raise ValueError("running_mean and running_var are required when training=False")
        return None, None
    check = check_stat if training else check_channel
    return check(running_mean, "running_mean", cshape), check(running_var, "running_var", cshape)


def scalar(value, name, low, high):
    """A real scalar within [low, high]."""
    if type(value) is float and low <= value <= high and abs(value) != math.inf:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return number


ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}  # codes of src_c/cbn_loops.h


def activation(name, negative_slope):
    """(code, slope) for an ``activation=`` name and ``negative_slope``."""
    if not (name is None or isinstance(name, str)) or name not in ACTIVATIONS:
        choices = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of {choices}; got {name!r}")
    return ACTIVATIONS[name], scalar(negative_slope, "negative_slope", -math.inf, math.inf)


def outputs(out, names, func, array_type=np.ndarray):
    """Split ``out=`` into one entry (None or ``array_type``) per output, ufunc-style.

    One output: an array, or a 1-tuple.  Several outputs: a tuple with one
    entry per output, entries may be None.
    """
    n = len(names)
    if out is None:
        return (None,) * n
    if isinstance(out, tuple):
        if len(out) != n:
            raise ValueError(f"{func}: out must have {n} entries ({', '.join(names)}), got {len(out)}")
    elif n == 1:
        out = (out,)
    else:
        raise TypeError(f"{func}: out must be a tuple of {n} arrays or None ({', '.join(names)})")
    for entry, label in zip(out, out_labels(names)):
        if entry is not None and not isinstance(entry, array_type):
            kind = f"{array_type.__module__.split('.')[0]}.{array_type.__name__}"
            raise TypeError(f"{func}: {label} must be a {kind} or None, got {type(entry).__name__}")
    return out


@functools.lru_cache(maxsize=None)
def out_labels(names):
    """How errors name each ``out=`` entry: ``out``, or ``out[1] (mean)``."""
    if len(names) == 1:
        return ("out",)
    return tuple(f"out[{i}] ({name})" for i, name in enumerate(names))


def check_out(arr, label, shape, dtype):
    """An ``out=`` array must match in shape, be writeable, and accept ``dtype``."""
    if arr is None:
        return None
    if arr.shape != shape:
        raise ValueError(f"{label} must have shape {shape}, got {arr.shape}")
    if not np.can_cast(dtype, arr.dtype, casting="same_kind"):
        raise TypeError(f"{label} has dtype {arr.dtype}, which cannot hold the {dtype} result")
    if not _writeable(arr):
        raise ValueError(f"{label} is read-only")
    return arr
