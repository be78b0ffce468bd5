# Included by _kernels.pyx.
#
# The common call on plain NumPy arrays, recognized and run without Python.
#
# For small arrays the general path's checks (cbn._api, cbn._args) and the
# typed-memoryview arguments cost more than the arithmetic.  These entry
# points recognize, with NumPy's C API, calls that need none of the general
# path's conversions, and run the same cores (train_views, inference_views,
# backward_views) on the same views with the same parameters: the results are
# the general path's bits.  They return None for anything else, and the
# caller then goes the general way, which checks, converts and raises.
#
# Recognized: bulk arrays (x, dy) that are exactly numpy.ndarray,
# C-contiguous, aligned, native float32 or float64, not empty; one int
# channel axis; per-channel inputs that are None or 1-D plain float32/float64
# arrays of the channel count (copied into float64 scratch first, so no
# output can overwrite them midway); Python floats in range for the scalars;
# an activation name; outputs that are None or plain writeable arrays of the
# right shape and dtype, the bulk one disjoint from every input or the very
# same array (in place).


cdef int bulk_type(object a) noexcept:
    """NPY_FLOAT or NPY_DOUBLE for a C-contiguous, aligned, native float32/float64 ndarray, else -1."""
    cdef int t, need = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if not cnp.PyArray_CheckExact(a):
        return -1
    t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE:
        return -1
    if (cnp.PyArray_FLAGS(<cnp.ndarray>a) & need) != need or not cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a):
        return -1
    return t


cdef bint is_channel_array(object a, Py_ssize_t C) noexcept:
    """A plain float32/float64 array of shape (C,)."""
    return bulk_type(a) >= 0 and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1 and cnp.PyArray_DIMS(<cnp.ndarray>a)[0] == C


cdef bint is_writeable_channel_array(object a, Py_ssize_t C) noexcept:
    return is_channel_array(a, C) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a)


cdef void read_channels(object a, Py_ssize_t C, double *dst) noexcept:
    """dst[0:C] = a as float64 (a passed is_channel_array)."""
    cdef Py_ssize_t c
    cdef void *data = cnp.PyArray_DATA(<cnp.ndarray>a)
    if cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT:
        for c in range(C):
            dst[c] = (<float *>data)[c]
    else:
        memcpy(dst, data, C * sizeof(double))


cdef void write_channels(object a, Py_ssize_t C, const double *src) noexcept:
    """a[0:C] = src, rounded to a's dtype (a passed is_channel_array)."""
    cdef Py_ssize_t c
    cdef void *data = cnp.PyArray_DATA(<cnp.ndarray>a)
    if cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.NPY_FLOAT:
        for c in range(C):
            (<float *>data)[c] = <float>src[c]
    else:
        memcpy(data, src, C * sizeof(double))


cdef object new_channels(int typenum, Py_ssize_t C, const double *src):
    """A new 1-D array of C values of src in the dtype typenum."""
    cdef cnp.npy_intp n = C
    cdef object a = cnp.PyArray_EMPTY(1, &n, typenum, 0)
    write_channels(a, C, src)
    return a


cdef bint split_axes(cnp.ndarray x, object channel_axis, Py_ssize_t *A, Py_ssize_t *C, Py_ssize_t *B) noexcept:
    """x's shape as (A, C, B) around an int channel axis in range."""
    cdef int ndim = cnp.PyArray_NDIM(x)
    cdef int k, i
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(x)
    if not PyLong_CheckExact(channel_axis) or not -ndim <= channel_axis < ndim:
        return False
    k = <int>channel_axis
    if k < 0:
        k += ndim
    A[0] = 1
    B[0] = 1
    for i in range(k):
        A[0] *= dims[i]
    C[0] = dims[k]
    for i in range(k + 1, ndim):
        B[0] *= dims[i]
    return A[0] * B[0] * C[0] > 0


cdef bint float_in(object v, double low, double high, double *out) noexcept:
    """A Python float within [low, high] (and finite) into out."""
    if not PyFloat_CheckExact(v):
        return False
    out[0] = <double>v
    return low <= out[0] <= high and out[0] != INFINITY and out[0] != -INFINITY


cdef bint act_of(object name, object negative_slope, Act *act) noexcept:
    """An activation name and a float slope, as the kernels take them."""
    if name is None:
        act.code = 0
    elif not PyUnicode_CheckExact(name):
        return False
    elif name == "relu":
        act.code = 1
    elif name == "leaky_relu":
        act.code = 2
    elif name == "sigmoid":
        act.code = 3
    elif name == "tanh":
        act.code = 4
    else:
        return False
    return float_in(negative_slope, -INFINITY, INFINITY, &act.slope)


cdef bint overlaps(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether two C-contiguous arrays' bytes overlap."""
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


cdef object bulk_output(object out, cnp.ndarray like, object in2, bint may_be_in2):
    """out itself, or a new array when out is None: an array like the input ``like`` (and in2), disjoint
    from both or the very same array as ``like`` (or as in2, when may_be_in2); else None."""
    cdef int ndim = cnp.PyArray_NDIM(like)
    if out is None:
        return cnp.PyArray_EMPTY(ndim, cnp.PyArray_DIMS(like), cnp.PyArray_TYPE(like), 0)
    if bulk_type(out) != cnp.PyArray_TYPE(like) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return None
    if cnp.PyArray_NDIM(<cnp.ndarray>out) != ndim:
        return None
    if memcmp(cnp.PyArray_DIMS(<cnp.ndarray>out), cnp.PyArray_DIMS(like), ndim * sizeof(cnp.npy_intp)):
        return None
    # same shape and C order: the same data pointer means the same array
    if overlaps(<cnp.ndarray>out, like) and cnp.PyArray_DATA(<cnp.ndarray>out) != cnp.PyArray_DATA(like):
        return None
    if in2 is not None and overlaps(<cnp.ndarray>out, <cnp.ndarray>in2):
        if not (may_be_in2 and cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>in2)):
            return None
    return out


cdef View plain_view(cnp.ndarray a, Py_ssize_t C, Py_ssize_t B) noexcept:
    """The (A, C, B) View of a C-contiguous array."""
    cdef View w
    w.data = <char *>cnp.PyArray_DATA(a)
    w.sa = C * B
    w.sc = B
    w.sb = 1
    w.stream = streams(cnp.PyArray_NBYTES(a), 2)
    return w


cdef inline bint optional_channels(object a, Py_ssize_t C) noexcept:
    return a is None or is_channel_array(a, C)


def train_plain(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation,
                negative_slope, out, bint with_stats):
    """batch_norm (training) or, with_stats, batch_norm_forward on plain arrays; None: not recognized.

    Returns y, or (y, mean, invstd) with_stats, where ``out`` is None or a
    tuple (y, mean, invstd) whose entries may be None; without, ``out`` is
    None, y, or (y,).  Running statistics are updated as update_running does.
    """
    cdef Py_ssize_t A, C, B, c
    cdef double mom, eps_, count, unbiased
    cdef Act act
    cdef View xv, yv
    cdef Grid g
    cdef int t = bulk_type(x)
    cdef double *work
    cdef double *stats
    cdef double *params
    cdef object out_y = None, out_mean = None, out_invstd = None, y
    if t < 0 or cnp.PyArray_NDIM(<cnp.ndarray>x) < 2 or not split_axes(x, channel_axis, &A, &C, &B) or A * B < 2:
        return None
    if not (float_in(momentum, 0.0, 1.0, &mom) and float_in(eps, 0.0, INFINITY, &eps_)
            and act_of(activation, negative_slope, &act)):
        return None
    if not (optional_channels(gamma, C) and optional_channels(beta, C)):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if running_mean is not None and not (is_writeable_channel_array(running_mean, C)
                                         and is_writeable_channel_array(running_var, C)
                                         and running_mean is not running_var):  # updated one after the other
        return None
    if out is not None:
        if not PyTuple_CheckExact(out) or len(out) != (3 if with_stats else 1):
            if with_stats or not cnp.PyArray_CheckExact(out):
                return None
            out = (out,)
        out_y = out[0]
        if with_stats:
            out_mean, out_invstd = out[1], out[2]
            for o in (out_mean, out_invstd):
                if o is not None and not is_writeable_channel_array(o, C):
                    return None
    y = bulk_output(out_y, x, None, False)
    if y is None:
        return None

    work = <double *>scratch(5 * C, sizeof(double), False)  # stats (mean, var, invstd), gamma, beta
    stats, params = work, work + 3 * C
    try:
        if gamma is not None:
            read_channels(gamma, C, params)
        if beta is not None:
            read_channels(beta, C, params + C)
        xv = plain_view(x, C, B)
        yv = plain_view(y, C, B)
        g = shape_grid(A, C, B, cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
        if t == cnp.NPY_FLOAT:
            train_views[float](&xv, &yv, &g, NULL if gamma is None else params,
                               NULL if beta is None else params + C, eps_, stats, &act, NULL)
        else:
            train_views[double](&xv, &yv, &g, NULL if gamma is None else params,
                                NULL if beta is None else params + C, eps_, stats, &act, NULL)
        if running_mean is not None:  # as update_running, in the same order of operations
            count = <double>(A * B)
            read_channels(running_mean, C, params)
            read_channels(running_var, C, params + C)
            for c in range(C):
                unbiased = stats[C + c] * (count / (count - 1))
                params[c] = (1.0 - mom) * params[c] + mom * stats[c]
                params[C + c] = (1.0 - mom) * params[C + c] + mom * unbiased
            write_channels(running_mean, C, params)
            write_channels(running_var, C, params + C)
        if not with_stats:
            return y
        if out_mean is None:
            out_mean = new_channels(t, C, stats)
        else:
            write_channels(out_mean, C, stats)
        if out_invstd is None:
            out_invstd = new_channels(t, C, stats + 2 * C)
        else:
            write_channels(out_invstd, C, stats + 2 * C)
        return y, out_mean, out_invstd
    finally:
        free(work)


def inference_plain(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation,
                    negative_slope, out):
    """batch_norm (training=False) on plain arrays: y, or None when not recognized."""
    cdef Py_ssize_t A, C, B
    cdef double mom, eps_
    cdef Act act
    cdef View xv, yv
    cdef Grid g
    cdef int t = bulk_type(x)
    cdef double *params
    cdef object y
    if t < 0 or not split_axes(x, channel_axis, &A, &C, &B):
        return None
    if not (float_in(momentum, 0.0, 1.0, &mom) and float_in(eps, 0.0, INFINITY, &eps_)
            and act_of(activation, negative_slope, &act)):
        return None
    if not (optional_channels(gamma, C) and optional_channels(beta, C) and is_channel_array(running_mean, C)
            and is_channel_array(running_var, C)):
        return None
    if PyTuple_CheckExact(out) and len(out) == 1:
        out = out[0]
    y = bulk_output(out, x, None, False)
    if y is None:
        return None
    params = <double *>scratch(4 * C, sizeof(double), False)  # running mean and variance, gamma, beta
    try:
        read_channels(running_mean, C, params)
        read_channels(running_var, C, params + C)
        if gamma is not None:
            read_channels(gamma, C, params + 2 * C)
        if beta is not None:
            read_channels(beta, C, params + 3 * C)
        xv = plain_view(x, C, B)
        yv = plain_view(y, C, B)
        g = shape_grid(A, C, B, cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
        if t == cnp.NPY_FLOAT:
            inference_views[float](&xv, &yv, &g, params, params + C, NULL if gamma is None else params + 2 * C,
                                   NULL if beta is None else params + 3 * C, eps_, &act, NULL)
        else:
            inference_views[double](&xv, &yv, &g, params, params + C, NULL if gamma is None else params + 2 * C,
                                    NULL if beta is None else params + 3 * C, eps_, &act, NULL)
        return y
    finally:
        free(params)


def backward_plain(dy, x, mean, invstd, gamma, beta, activation, negative_slope, channel_axis, out):
    """batch_norm_backward on plain arrays: (dx, dgamma, dbeta), or None when not recognized.

    ``out`` is None or a tuple (dx, dgamma, dbeta) whose entries may be None.
    """
    cdef Py_ssize_t A, C, B, c
    cdef Act act
    cdef View dyv, xv, dxv
    cdef Grid g
    cdef int t = bulk_type(x)
    cdef double *work
    cdef double *stats
    cdef double *sums
    cdef object out_dx = None, out_dgamma = None, out_dbeta = None, dx
    if t < 0 or bulk_type(dy) != t or not split_axes(x, channel_axis, &A, &C, &B):
        return None
    if cnp.PyArray_NDIM(<cnp.ndarray>dy) != cnp.PyArray_NDIM(<cnp.ndarray>x) or memcmp(
            cnp.PyArray_DIMS(<cnp.ndarray>dy), cnp.PyArray_DIMS(<cnp.ndarray>x),
            cnp.PyArray_NDIM(<cnp.ndarray>x) * sizeof(cnp.npy_intp)):
        return None
    if not act_of(activation, negative_slope, &act):
        return None
    if not (is_channel_array(mean, C) and is_channel_array(invstd, C) and optional_channels(gamma, C)
            and optional_channels(beta, C)):
        return None
    if out is not None:
        if not PyTuple_CheckExact(out) or len(out) != 3:
            return None
        out_dx, out_dgamma, out_dbeta = out
        for o in (out_dgamma, out_dbeta):
            if o is not None and not is_writeable_channel_array(o, C):
                return None
    # in place into dy or x; with an activation dz goes into dx first, so not into x
    dx = bulk_output(out_dx, x, dy, True) if act.code == 0 else bulk_output(out_dx, dy, x, False)
    if dx is None:
        return None

    work = <double *>scratch(6 * C, sizeof(double), False)  # mean, invstd, gamma, beta; sums
    stats, sums = work, work + 4 * C
    try:
        read_channels(mean, C, stats)
        read_channels(invstd, C, stats + C)
        if gamma is None:
            for c in range(C):
                stats[2 * C + c] = 1.0
        else:
            read_channels(gamma, C, stats + 2 * C)
        if beta is None:
            memset(stats + 3 * C, 0, C * sizeof(double))
        else:
            read_channels(beta, C, stats + 3 * C)
        dyv = plain_view(dy, C, B)
        xv = plain_view(x, C, B)
        dxv = plain_view(dx, C, B)
        g = shape_grid(A, C, B, cnp.PyArray_ITEMSIZE(<cnp.ndarray>x))
        if t == cnp.NPY_FLOAT:
            backward_views[float](&dyv, &xv, &dxv, &g, stats, sums, &act, NULL)
        else:
            backward_views[double](&dyv, &xv, &dxv, &g, stats, sums, &act, NULL)
        for c in range(C):  # dgamma = sum(dz * (x - mean)) * invstd, in place of the second row of sums
            sums[C + c] = sums[C + c] * stats[C + c]
        if out_dgamma is None:
            out_dgamma = new_channels(t, C, sums + C)
        else:
            write_channels(out_dgamma, C, sums + C)
        if out_dbeta is None:
            out_dbeta = new_channels(t, C, sums)
        else:
            write_channels(out_dbeta, C, sums)
        return dx, out_dgamma, out_dbeta
    finally:
        free(work)
