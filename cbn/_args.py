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


def partial_axes(shape, channel_axis):
    """(axes, channel shape, values per channel) of a piece of a batch, which may hold no values."""
    if len(shape) < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = channel_axes(channel_axis, len(shape))
    return axes, channel_shape(shape, axes), values_per_channel(shape, axes)


def counts(value, name="counts"):
    """Counts of values as int64, rejecting negative or fractional ones."""
    arr = as_real_array(value, name)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError(f"{name} must be whole numbers")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0")
    return arr.astype(np.int64)


def partials(counts_, means, m2s):
    """Pieces' statistics for merging: (counts int64, means, m2s), each stacked along a first axis
    of one entry per piece and broadcast to one shape, and the total count (int64, a scalar when
    every piece's count is one)."""
    pieces = []
    for v in (counts_, means, m2s):
        if not (isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim)):
            raise TypeError("counts, means and m2s must each be a sequence with one entry per piece")
        pieces.append(len(v))
    if len(set(pieces)) != 1:
        raise ValueError(f"counts, means and m2s must have one entry per piece each, got {pieces[0]}, "
                         f"{pieces[1]} and {pieces[2]} entries")
    if pieces[0] == 0:
        raise ValueError("combine_stats needs at least one partial")
    shapes = {np.shape(m) for v in (means, m2s) for m in v}
    if len(shapes) != 1:
        raise ValueError(f"every piece's mean and m2 must have the same shape, got shapes {sorted(shapes)}")
    mean_i = as_real_array(means, "means").astype(np.float64)
    m2_i = as_real_array(m2s, "m2s").astype(np.float64)
    n_given = n_i = counts(counts_)
    scalar_counts = n_i.ndim == 1
    try:
        n_i = np.broadcast_to(n_i.reshape(n_i.shape + (1,) * (mean_i.ndim - 1)) if scalar_counts else n_i,
                              mean_i.shape)
    except ValueError:
        raise ValueError(f"counts of shape {n_i.shape[1:]} per piece do not broadcast against means of shape "
                         f"{mean_i.shape[1:]}") from None
    total = np.int64(n_given.sum()) if scalar_counts else n_i.sum(axis=0)
    return n_i, mean_i, m2_i, total


def batch_count(count, cshape):
    """The whole batch's values per channel (> 0), as float64 of shape ``cshape``."""
    n = counts(count, "count")
    if np.any(n <= 0):
        raise ValueError(f"count must be positive (values per channel in the whole batch), got {count!r}")
    try:
        return np.broadcast_to(n, cshape).astype(np.float64)
    except ValueError:
        raise ValueError(f"count must be an int or broadcast to shape {cshape}, got shape {n.shape}") from None


def elemt_args(cshape, invstd, gamma, sum_dy, sum_dy_xmu, count):
    """Per-channel arguments of batch_norm_backward_elemt, checked: float64 arrays of ``cshape``
    (gamma None is 1) and the whole batch's count as float64."""
    return (
        per_channel(invstd, "invstd", cshape),
        np.ones(cshape) if gamma is None else per_channel(gamma, "gamma", cshape),
        per_channel(sum_dy, "sum_dy", cshape),
        per_channel(sum_dy_xmu, "sum_dy_xmu", cshape),
        batch_count(count, cshape),
    )


def finalize_args(count, mean, m2, ddof):
    """Checked (count int64, mean, m2 float64, ddof) of merged statistics, every count above ddof."""
    try:
        ddof = operator.index(ddof)
    except TypeError:
        raise TypeError(f"ddof must be an int, got {ddof!r}") from None
    n = counts(count, "count")
    mean = as_real_array(mean, "mean").astype(np.float64)
    m2 = as_real_array(m2, "m2").astype(np.float64)
    if mean.shape != m2.shape:
        raise ValueError(f"mean and m2 must have the same shape, got {mean.shape} and {m2.shape}")
    if np.any(n <= ddof):
        raise ValueError(f"count must be greater than ddof={ddof} for every channel, got {np.min(n)}")
    return n, mean, m2, ddof


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
