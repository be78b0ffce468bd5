"""Test helpers: array layouts, random data and tolerances."""
import numpy as np

# Absolute tolerance per result dtype, for values of order 1.
TOLERANCE = {np.float16: 4e-3, np.float32: 3e-6, np.float64: 1e-12}

LAYOUTS = ["C", "F", "strided", "negative", "transposed", "broadcast"]


def tolerance(dtype):
    return TOLERANCE[np.dtype(dtype).type]


def make_layout(base, layout):
    """An array equal to ``base`` (same shape and values) with another memory layout."""
    if layout == "C":
        return np.ascontiguousarray(base)
    if layout == "F":
        return np.asfortranarray(base)
    if layout == "strided":
        big = np.zeros(tuple(2 * n for n in base.shape), dtype=base.dtype)
        view = big[tuple(slice(None, None, 2) for _ in base.shape)]
        view[...] = base
        return view
    if layout == "negative":
        flipped = np.ascontiguousarray(base[tuple(slice(None, None, -1) for _ in base.shape)])
        return flipped[tuple(slice(None, None, -1) for _ in base.shape)]
    if layout == "transposed":
        order = tuple(range(base.ndim))[::-1]
        return np.ascontiguousarray(base.transpose(order)).transpose(order)
    if layout == "broadcast":
        # zero stride along axis 0: every batch entry is the first one
        return np.broadcast_to(base[:1], base.shape)
    raise ValueError(layout)


def random_array(rng, shape, dtype, offset=0.0, scale=1.0):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.4
    if dtype.kind in "iu":
        return rng.integers(-20, 20, size=shape).astype(dtype)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def assert_close(actual, expected, dtype, scale=1.0):
    """Equal up to the rounding of ``dtype`` on values of magnitude ``scale``."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    atol = tolerance(dtype) * max(1.0, scale)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tolerance(dtype), atol=atol)


def numerical_gradient(f, value, h=1e-6):
    """Central differences of the scalar function f() at every element of ``value`` (changed in place, restored)."""
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        saved = value[i]
        value[i] = saved + h
        up = f()
        value[i] = saved - h
        down = f()
        value[i] = saved
        grad[i] = (up - down) / (2 * h)
    return grad


def whole_stats(x, axes):
    """float64 mean and m2 over every axis but ``axes``."""
    x = np.asarray(x, dtype=np.float64)
    axes = (axes,) if isinstance(axes, int) else axes
    axes = tuple(a % x.ndim for a in axes)
    moved = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    red = tuple(range(x.ndim - len(axes)))
    mean = moved.mean(axis=red)
    return mean, ((moved - mean) ** 2).sum(axis=red)


def unaligned(a, empty):
    """A C-contiguous copy of ``a`` that does not start on a 16-byte boundary (``empty``: the array module's)."""
    buffer = empty(a.size + 1, dtype=a.dtype)
    view = buffer[1:].reshape(a.shape)
    view[...] = a
    assert view.data.ptr % 16 != 0 and view.flags.c_contiguous
    return view


# the arguments over which cbn's exponential gives a normal number, per dtype
EXP_RANGE = {np.float32: (-87, 88), np.float64: (-708, 709)}


def exp_activation_errors(run, dtype):
    """Errors of sigmoid and tanh over EXP_RANGE, densely sampled, against long double:
    (sigmoid's largest and mean error in ulp of itself, tanh's largest error in ulp of 1).
    run(z, activation) gives the activation of the pre-activation z itself."""
    low, high = EXP_RANGE[np.dtype(dtype).type]
    z = np.concatenate([np.linspace(low, high, 400_001), np.linspace(-1, 1, 100_001)]).astype(dtype)
    exact = z.astype(np.longdouble)
    want = 1 / (1 + np.exp(-exact))
    ulps = np.abs(run(z, "sigmoid") - want) / np.spacing(want.astype(dtype))
    tanh = np.abs(run(z, "tanh") - np.tanh(exact)).max() / np.finfo(dtype).eps
    return float(ulps.max()), float(ulps.mean()), float(tanh)
