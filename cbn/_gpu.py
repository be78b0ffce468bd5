"""cbn's public functions on CuPy arrays: the CPU path's checks, then the CUDA kernels.

Imported by ``cbn._api`` only when an argument is a ``cupy.ndarray``, so that
``import cbn`` never imports CuPy.  The kernels (``cbn/cuda/batch_norm.cu``)
are compiled once per device and element type and cached.

Layouts: the kernels read rows of ``C * B`` values (see the .cu file).  A
C-contiguous array whose channel axes are consecutive, or an F-contiguous
one with a single channel axis, is used as it is; any other layout (strided
views, channel axes out of order) goes through one copy with the channel
axes moved last, and results come back in the caller's shape.  Arguments are
never modified, except ``out=`` arrays and the running statistics.
"""
import functools
import math
from pathlib import Path

import cupy
import numpy as np

from . import _args
from . import _cuda_plan as plan
from ._compute import update_running

_SOURCE = Path(__file__).with_name("cuda") / "batch_norm.cu"
_F64 = np.dtype(np.float64)


# --------------------------------------------------------------------------
# Kernels


@functools.lru_cache(maxsize=None)
def _module(device_id, dtype):
    """The kernels for arrays of ``dtype`` on one device, compiled on first use."""
    with cupy.cuda.Device(device_id):
        code = f'#line 1 "{_SOURCE.as_posix()}"\n' + _SOURCE.read_text()
        names = plan.name_expressions(dtype)
        module = cupy.RawModule(code=code, options=("--std=c++17",), name_expressions=names)
        return {name: module.get_function(name) for name in names}


@functools.lru_cache(maxsize=None)
def _launcher(device_id, dtype):
    return _Launcher(device_id, dtype)


class _Launcher:
    """The kernels of one element type on one device, launched with typed scalars.

    ``shape`` is the (A, C, B) view; ``channels`` the per-channel arguments
    built by :func:`_channels`; ``act`` the (code, slope) of the activation.
    """

    def __init__(self, device_id, dtype):
        self.dtype = dtype
        self.t = plan.CUDA_TYPES[dtype]
        self.vals = plan.CHANNEL_VALUES[dtype]
        self.vecs = (plan.VECTOR[dtype], plan.GRADIENT_VECTOR[dtype])  # of the statistics, of the gradient
        self.work = np.dtype(np.float64 if dtype == _F64 else np.float32)
        self.kernels = _module(device_id, dtype)

    def _reduce(self, mode, x, dy, channels, shape, act, rows, running=None):
        """Per-channel results of a reduction (statistics: mode 0; gradient: mode 1), in float64 and the work
        dtype, each of shape (rows, C); see cbn_finish in the .cu file.  ``running``: :func:`_running` (None:
        no running statistics)."""
        A, C, B = shape
        p = plan.reduce_plan(A, C, B, self.vecs[mode])
        part = cupy.empty(2 * C * p.partials, dtype=_F64)
        out, out_w = cupy.empty((rows, C), dtype=_F64), cupy.empty((rows, C), dtype=self.work)
        split = (*channels, *_i64(A, C, B, p.span), np.int32(p.n_chunks))
        act_args = (np.int32(act[0]), np.float64(act[1]), part)
        results = (np.float64(A * B), out, out_w, *_running_args(running, x))
        if p.by_rows:
            self.kernels[f"cbn_reduce_rows<{self.t}, {mode}, {p.vec}>"](
                p.grid, p.block, (x, dy, *split, _aligned(x, dy), *act_args, _counters(C), *results))
        else:  # element accesses
            self.kernels[f"cbn_reduce_cols<{self.t}, {mode}>"](p.grid, p.block, (x, dy, *split, *act_args))
            self.kernels[f"cbn_finish_channels<{self.t}, {mode}>"](
                (C,), (plan.THREADS,), (x, *channels, *_i64(C, B, p.partials), part, *results))
        return out, out_w

    def stats(self, x, shape, eps, running=None):
        """(float64 rows, work-dtype rows) of mean, invstd and biased variance, shape (3, C) each; the running
        statistics (:func:`_running`) updated."""
        return self._reduce(0, x, x, _channels(None, None, False, eps, None, None, x), shape, _NO_ACT, 3, running)

    def train(self, x, y, eps, gamma, beta, shape, act, running=None):
        """Training forward into y; returns the statistics as :meth:`stats`.

        Small arrays: one launch, one read of x; larger ones: the statistics,
        then the normalize pass.
        """
        if not plan.one_block_per_channel(*shape, self.dtype):
            stats, out_w = self.stats(x, shape, eps, running)
            self.normalize(x, y, _channels(stats[0], stats[1], False, 0.0, gamma, beta, x), shape, act)
            return stats, out_w
        A, C, B = shape
        stats, out_w = cupy.empty((3, C), dtype=_F64), cupy.empty((3, C), dtype=self.work)
        self.kernels[f"cbn_train_channel<{self.t}, {self.vals}>"](
            (C,), (plan.CHANNEL_THREADS,),
            (x, y, *_channels(None, None, False, eps, gamma, beta, x), *_i64(A, C, B), np.int32(act[0]),
             np.float64(act[1]), stats, out_w, *_running_args(running, x)),
        )
        return stats, out_w

    def normalize(self, x, y, channels, shape, act):
        p = plan.elementwise_plan(*shape, self.vecs[0])
        self.kernels[f"cbn_normalize<{self.t}, {p.vec}>"](
            p.grid, p.block,
            (x, y, *channels, *_i64(*shape, p.rows), _aligned(x, y), np.int32(act[0]), np.float64(act[1])),
        )

    def backward(self, dy, x, dx, channels, shape, act):
        """dx, and the sums (float64 rows: sum dz, sum dz * (x - mean)) and (dgamma, dbeta) in the work dtype.

        Small arrays: one launch; larger ones: the reduction, then the
        elementwise pass.
        """
        if plan.one_block_per_channel(*shape, self.dtype):
            A, C, B = shape
            sums, out_w = cupy.empty((2, C), dtype=_F64), cupy.empty((2, C), dtype=self.work)
            self.kernels[f"cbn_backward_channel<{self.t}, {self.vals}>"](
                (C,), (plan.CHANNEL_THREADS,),
                (dy, x, dx, *channels, *_i64(A, C, B), np.int32(act[0]), np.float64(act[1]), sums, out_w),
            )
            return sums, out_w
        sums, out_w = self._reduce(1, x, dy, channels, shape, act, 2)
        p = plan.elementwise_plan(*shape, self.vecs[0])
        self.kernels[f"cbn_backward_elemt<{self.t}, {p.vec}>"](
            p.grid, p.block,
            (dy, x, dx, *channels, sums, np.float64(shape[0] * shape[2]), *_i64(*shape, p.rows),
             _aligned(dy, x, dx), np.int32(act[0]), np.float64(act[1])),
        )
        return sums, out_w


_COUNTERS: dict = {}  # (device, stream) -> cbn_reduce_rows' per-channel block counters


def _counters(C):
    """At least C zeros for cbn_reduce_rows' block counters, which the kernel leaves at zero.

    One buffer per device and stream: launches on one stream run one after
    the other, so they can share it; another stream gets its own.
    """
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    counters = _COUNTERS.get(key)
    if counters is None or counters.size < C:
        counters = _COUNTERS[key] = cupy.zeros(max(C, 1024), dtype=np.uint32)
    return counters


def _aligned(*arrays):
    """The kernels' ``aligned`` flag: whether every array starts on a 16-byte boundary (vector accesses)."""
    return np.int32(all(a.data.ptr % 16 == 0 for a in arrays))


_NO_ACT = (0, 0.0)
_CHANNEL_TYPES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3}  # CH_* of the .cu
_ABSENT = np.int32(0)


def _i64(*values):
    return tuple(np.int64(v) for v in values)


def _channel(values, placeholder):
    return (placeholder, _ABSENT) if values is None else (values, np.int32(_CHANNEL_TYPES[values.dtype]))


def _running(running_mean, running_var, momentum, placeholder):
    """The kernels' running-statistics arguments (CBN_RUNNING_PARAMS); None: no update."""
    return (*_channel(running_mean, placeholder), *_channel(running_var, placeholder), np.float64(momentum))


def _running_args(running, placeholder):
    """``running`` (:func:`_running`), or the arguments of no running statistics to update."""
    return running or _running(None, None, 0.0, placeholder)


def _updatable_in_place(running, others):
    """Whether the kernels can update the running statistics themselves: C-contiguous, and sharing no memory
    with an array the call reads or writes (the CPU path updates them after computing y)."""
    return all(r.flags.c_contiguous for r in running) and not any(
        cupy.may_share_memory(r, a) for r in running for a in others if a is not None)


def _channels(mean, spread, spread_is_var, eps, gamma, beta, placeholder):
    """The kernels' per-channel arguments (CBN_CHANNEL_PARAMS); None entries read as the defaults."""
    return (
        *_channel(mean, placeholder), *_channel(spread, placeholder), np.int32(spread_is_var), np.float64(eps),
        *_channel(gamma, placeholder), *_channel(beta, placeholder),
    )


# --------------------------------------------------------------------------
# Arguments


def _require_cupy(named, on_gpu_name):
    """Every array argument of a GPU call must be a cupy.ndarray on x's device."""
    device = None
    for name, value in named.items():
        if value is None:
            continue
        if not isinstance(value, cupy.ndarray):
            kind = f"{type(value).__module__}.{type(value).__name__}"
            raise TypeError(
                f"{name} is a {kind} but {on_gpu_name} is a cupy.ndarray; pass all arrays of a call on the same "
                f"device (cupy.asarray({name}) or cupy.asnumpy({on_gpu_name}))"
            )
        if device is None:
            device = value.device.id
        elif value.device.id != device:
            raise ValueError(f"{name} is on GPU {value.device.id} but the other arrays are on GPU {device}")


def _first_cupy(named):
    return next(name for name, value in named.items() if isinstance(value, cupy.ndarray))


def _check_dtype(arr, name):
    _args.check_real_dtype(arr.dtype, name)
    return arr


def _per_channel(value, name, cshape):
    """A per-channel argument as a C-contiguous float CuPy array (any float dtype: the kernels read each)."""
    if value is None:
        return None
    _check_dtype(value, name)
    if value.shape != cshape:
        raise ValueError(f"{name} must have shape {cshape} (one value per channel), got shape {value.shape}")
    if value.dtype in _CHANNEL_TYPES:
        return value if value.flags.c_contiguous else cupy.ascontiguousarray(value)
    return cupy.ascontiguousarray(value, dtype=_F64)  # integers, bools


def _running_pair(running_mean, running_var, cshape, training):
    running_stat = functools.partial(_args.running_stat, array_type=cupy.ndarray)
    return _args.running_pair(running_mean, running_var, cshape, training, running_stat, _per_channel)


def outputs(out, names, func):
    """``out=`` split per output, as ``cbn._args.outputs``, each entry a cupy.ndarray or None."""
    return _args.outputs(out, names, func, array_type=cupy.ndarray)


# --------------------------------------------------------------------------
# Layouts


class _Layout:
    """How the kernels see the bulk arrays of a call: (A, C, B) and where results go."""

    def __init__(self, arrays, axes):
        shape = arrays[0].shape
        self.shape = shape
        self.perm = None
        k0, k1 = axes[0], axes[-1] + 1
        if axes == tuple(range(k0, k1)):
            if all(a.flags.c_contiguous for a in arrays):
                self.order, self.view = "C", (math.prod(shape[:k0]), math.prod(shape[k0:k1]), math.prod(shape[k1:]))
                return
            if len(axes) == 1 and all(a.flags.f_contiguous for a in arrays):
                self.order, self.view = "F", (math.prod(shape[k1:]), shape[k0], math.prod(shape[:k0]))
                return
        # anything else: one copy with the reduced axes first and the channel axes last, in order
        self.order = None
        self.perm = tuple(i for i in range(len(shape)) if i not in axes) + tuple(axes)
        self.view = (math.prod(shape[i] for i in self.perm[: -len(axes)]), math.prod(shape[a] for a in axes), 1)

    def input(self, a, dtype):
        """``a`` as the kernels read it, in ``dtype`` (a copy only when needed)."""
        if self.order is None:
            return cupy.ascontiguousarray(a.transpose(self.perm), dtype=dtype)
        return a.astype(dtype, copy=False)

    def fits(self, a):
        return (self.order == "C" and a.flags.c_contiguous) or (self.order == "F" and a.flags.f_contiguous)

    def target(self, out, dtype, inputs):
        """Where a kernel writes a bulk result: ``out`` itself when it can, else a new array."""
        if out is not None and out.dtype == dtype and self.fits(out):
            inputs = {id(a): a for a in inputs}.values()
            if all(_same_view(out, a) or not cupy.may_share_memory(out, a) for a in inputs):
                return out
        if self.order is None:
            return cupy.empty(tuple(self.shape[i] for i in self.perm), dtype=dtype)
        return cupy.empty(self.shape, dtype=dtype, order=self.order)

    def deliver(self, result, out):
        """The result in the caller's shape, written into ``out`` when given."""
        if self.order is None:
            result = result.transpose(tuple(np.argsort(self.perm)))
        if out is None or result is out:
            return result
        cupy.copyto(out, result, casting="same_kind")
        return out


def _same_view(a, b):
    return a.data.ptr == b.data.ptr and a.strides == b.strides and a.dtype == b.dtype


def _channel_result(rows, row, cshape):
    """Row ``row`` of per-channel results (the work dtype), shaped ``cshape``: a view.

    Only the rows returned are indexed: each CuPy index or reshape costs the
    host about 2 us, a noticeable part of a small call.
    """
    result = rows[row]
    return result if result.shape == cshape else result.reshape(cshape)


def _channel_into(out, exact, cshape):
    """A float64 per-channel result written into ``out=``."""
    cupy.copyto(out, exact.reshape(cshape), casting="same_kind")
    return out


def _launcher_for(dtype):
    return _launcher(cupy.cuda.runtime.getDevice(), dtype)


# --------------------------------------------------------------------------
# The public functions (arguments as in cbn._api)


def train_forward(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, outs, labels):
    """Training forward on the GPU: (y, mean, invstd)."""
    named = dict(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    named.update({label: o for label, o in zip(labels, outs)})
    _require_cupy(named, _first_cupy(named))
    _check_dtype(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions when training, got {x.ndim}")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    count = _args.training_count(x.shape, axes)
    gamma = _per_channel(gamma, "gamma", cshape)
    beta = _per_channel(beta, "beta", cshape)
    running_mean, running_var = _running_pair(running_mean, running_var, cshape, training=True)
    momentum = _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    work = _args.compute_dtype(result)
    out_y, out_mean, out_invstd = outs
    _args.check_out(out_y, labels[0], x.shape, result)
    _args.check_out(out_mean, labels[1], cshape, work)
    _args.check_out(out_invstd, labels[2], cshape, work)

    with x.device:
        layout = _Layout([x], axes)
        xk = layout.input(x, result)
        y = layout.target(out_y, result, [x, xk])
        C = math.prod(cshape)
        in_kernel = (running_mean is not None and x.size > 0
                     and _updatable_in_place((running_mean, running_var), (x, y, gamma, beta, *outs[1:])))
        running = _running(running_mean, running_var, momentum, x) if in_kernel else None
        if x.size == 0:
            stats, stats_w = cupy.zeros((3, C), dtype=_F64), cupy.zeros((3, C), dtype=work)
        else:
            stats, stats_w = _launcher_for(result).train(xk, y, eps, gamma, beta, layout.view, act, running)
        if running_mean is not None and not in_kernel:  # the CPU path's update, on CuPy arrays
            update_running(running_mean, running_var, stats[0].reshape(cshape), stats[2].reshape(cshape), count,
                           momentum)
        return (
            layout.deliver(y, out_y),
            _channel_result(stats_w, 0, cshape) if out_mean is None else _channel_into(out_mean, stats[0], cshape),
            _channel_result(stats_w, 1, cshape) if out_invstd is None else _channel_into(out_invstd, stats[1], cshape),
        )


def inference(x, gamma, beta, running_mean, running_var, momentum, eps, channel_axis, act, out_y):
    """Inference forward on the GPU (running statistics): y."""
    named = dict(x=x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var, out=out_y)
    _require_cupy(named, _first_cupy(named))
    _check_dtype(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    gamma = _per_channel(gamma, "gamma", cshape)
    beta = _per_channel(beta, "beta", cshape)
    mean, var = _running_pair(running_mean, running_var, cshape, training=False)
    _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    result = _args.result_dtype(x)
    _args.check_out(out_y, "out", x.shape, result)

    with x.device:
        layout = _Layout([x], axes)
        xk = layout.input(x, result)
        y = layout.target(out_y, result, [x, xk])
        if x.size:
            _launcher_for(result).normalize(xk, y, _channels(mean, var, True, eps, gamma, beta, xk), layout.view, act)
        return layout.deliver(y, out_y)


def backward(dy, x, mean, invstd, gamma, beta, act, channel_axis, outs, labels):
    """Gradient on the GPU: (dx, dgamma, dbeta)."""
    named = dict(dy=dy, x=x, mean=mean, invstd=invstd, gamma=gamma, beta=beta)
    named.update({label: o for label, o in zip(labels, outs)})
    _require_cupy(named, _first_cupy(named))
    _check_dtype(dy, "dy")
    _check_dtype(x, "x")
    axes, cshape, _ = _args.gradient_axes(dy.shape, x.shape, channel_axis)
    mean = _per_channel(mean, "mean", cshape)
    invstd = _per_channel(invstd, "invstd", cshape)
    gamma = _per_channel(gamma, "gamma", cshape)
    beta = _per_channel(beta, "beta", cshape)
    result = _args.result_dtype(dy, x)
    work = _args.compute_dtype(result)
    out_dx, out_dgamma, out_dbeta = outs
    _args.check_out(out_dx, labels[0], x.shape, result)
    _args.check_out(out_dgamma, labels[1], cshape, work)
    _args.check_out(out_dbeta, labels[2], cshape, work)

    with x.device:
        layout = _Layout([dy, x], axes)
        dyk, xk = layout.input(dy, result), layout.input(x, result)
        dx = layout.target(out_dx, result, [dy, x, dyk, xk])
        C = math.prod(cshape)
        if x.size == 0:
            sums, grads_w = cupy.zeros((2, C), dtype=_F64), cupy.zeros((2, C), dtype=work)
        else:
            channels = _channels(mean, invstd, False, 0.0, gamma, beta, xk)
            sums, grads_w = _launcher_for(result).backward(dyk, xk, dx, channels, layout.view, act)
        if out_dgamma is None:
            dgamma = _channel_result(grads_w, 0, cshape)
        else:  # from the float64 sums
            dgamma = _channel_into(out_dgamma, sums[1] * invstd.reshape(-1).astype(_F64), cshape)
        dbeta = _channel_result(grads_w, 1, cshape) if out_dbeta is None else _channel_into(out_dbeta, sums[0], cshape)
        return layout.deliver(dx, out_dx), dgamma, dbeta


def batch_stats(x, channel_axis):
    """Per-channel mean and biased variance on the GPU."""
    _check_dtype(x, "x")
    axes, cshape, _ = _args.stats_axes(x.shape, channel_axis)
    result = _args.result_dtype(x)
    work = _args.compute_dtype(result)
    with x.device:
        if x.size == 0:  # no channels
            return cupy.empty(cshape, dtype=work), cupy.empty(cshape, dtype=work)
        layout = _Layout([x], axes)
        _, stats_w = _launcher_for(result).stats(layout.input(x, result), layout.view, 0.0)
        return _channel_result(stats_w, 0, cshape), _channel_result(stats_w, 2, cshape)


def device_info():
    """(CuPy version, device name, compute capability) of the current device."""
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    if isinstance(name, bytes):
        name = name.decode()
    return cupy.__version__, name, device.compute_capability
