"""Batch norm over data-parallel processes with MPI (mpi4py): ``SyncBatchNorm``.

Every rank holds part of the batch, and the statistics are those of the
whole batch.  The forward merges the ranks' ``(count, mean, m2)`` partials
with one ``Allreduce`` whose operation is Chan's merge (exact for unequal
and empty local batches; never a variance rebuilt from sums of squares or
from an inverse std); the backward adds the ranks' ``(sum_dy, sum_dy_xmu)``
with one ``Allreduce``.  Everything else is local, with cbn's kernels.

``import cbn.distributed`` needs mpi4py (``pip install 'cbn[mpi]'``, with an
MPI library: the system's, or ``pip install mpich``).  Arguments are
checked on each rank before the collective; a rank that raises there leaves
the others waiting in it, as with any MPI program.
"""
import functools

import numpy as np

from . import _args, _compute, _kernels
from ._api import _as_compute, _bulk_input, batch_norm
from ._layer import BatchNorm
from ._layout import empty_like_layout
from ._partials import batch_norm_backward_elemt, batch_norm_backward_reduce, batch_stats_partial

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "cbn.distributed needs mpi4py: pip install 'cbn[mpi]' (and an MPI library, e.g. pip install mpich)"
    ) from exc

__all__ = ["SyncBatchNorm", "sync_batch_norm_forward", "sync_batch_norm_backward", "allreduce_stats"]


# --------------------------------------------------------------------------
# The two collectives


def _chan(inbuf, inoutbuf, datatype):
    """MPI reduction: Chan's merge of packed partials [n, mean (C), m2 (C)], into inoutbuf."""
    channels = (datatype.Get_size() // 8 - 1) // 2  # one packed partial is one element of the datatype
    _kernels.merge_packed(np.frombuffer(inbuf, np.float64), np.frombuffer(inoutbuf, np.float64), channels)


@functools.lru_cache(maxsize=None)
def _chan_op():
    return MPI.Op.Create(_chan, commute=True)  # merge_packed is symmetric bit for bit


@functools.lru_cache(maxsize=None)
def _packed_type(channels):
    """One partial as a single MPI element, so that MPI never splits it between calls of the operation."""
    return MPI.DOUBLE.Create_contiguous(2 * channels + 1).Commit()


def _check_comm(comm):
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (MPI.COMM_WORLD, say), got {type(comm).__name__}")
    return comm


def allreduce_stats(comm, count, mean, m2):
    """Merge every rank's partial (:func:`cbn.batch_stats_partial`) with one ``Allreduce``.

    Returns the whole batch's ``(count, mean, m2)`` (float64), the same bits
    on every rank.  ``count`` is the rank's values per channel (a scalar).
    """
    _check_comm(comm)
    mean = np.asarray(mean, dtype=np.float64)
    m2 = np.asarray(m2, dtype=np.float64)
    if np.ndim(count) != 0 or mean.shape != m2.shape:
        raise ValueError("allreduce_stats takes a scalar count and a mean and m2 of one shape")
    C = mean.size
    packed = np.empty(2 * C + 1)
    packed[0], packed[1:C + 1], packed[C + 1:] = count, mean.ravel(), m2.ravel()
    merged = np.empty_like(packed)
    comm.Allreduce([packed, 1, _packed_type(C)], [merged, 1, _packed_type(C)], op=_chan_op())
    return int(merged[0]), merged[1:C + 1].reshape(mean.shape), merged[C + 1:].reshape(mean.shape)


def _allreduce_sum(comm, *arrays):
    """The float64 sums over ranks of per-channel arrays, in one ``Allreduce``."""
    packed = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    comm.Allreduce(MPI.IN_PLACE, packed, op=MPI.SUM)
    return [part.reshape(np.shape(a)) for part, a in zip(np.split(packed, len(arrays)), arrays)]


# --------------------------------------------------------------------------
# Functional pair


def sync_batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    *,
    comm,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    eps=1e-5,
    channel_axis=1,
    activation=None,
    negative_slope=0.01,
):
    """Training forward with the statistics of the batch spread over ``comm``'s ranks.

    Parameters
    ----------
    x : array_like
        This rank's part of the batch; it may be empty (no values per
        channel) and differ in size between ranks.
    gamma, beta, running_mean, running_var, momentum, eps, channel_axis, activation, negative_slope
        As for :func:`cbn.batch_norm`; the running statistics are updated
        with the whole batch's (the same bits on every rank).
    comm : mpi4py.MPI.Intracomm
        The ranks that share the batch.

    Returns
    -------
    y : ndarray
        This rank's normalized values.
    mean, invstd : ndarray of float64
        The whole batch's statistics.
    count : int
        Values per channel in the whole batch.

    Raises
    ------
    ValueError
        On every rank, after the collective, when the whole batch holds one
        value per channel or fewer.
    """
    comm = _check_comm(comm)
    x = _bulk_input(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions when training, got {x.ndim}")
    axes = _args.channel_axes(channel_axis, x.ndim)
    cshape = _args.channel_shape(x.shape, axes)
    gamma = None if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = None if beta is None else _args.per_channel(beta, "beta", cshape)
    running_mean, running_var = _args.running_pair(running_mean, running_var, cshape, training=True)
    momentum = _args.scalar(momentum, "momentum", 0.0, 1.0)
    eps = _args.scalar(eps, "eps", 0.0, np.inf)
    _args.activation(activation, negative_slope)

    count, mean, m2 = allreduce_stats(comm, *batch_stats_partial(x, channel_axis=channel_axis))
    if count <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got {count} over {comm.Get_size()} "
                         f"ranks (this rank's input has shape {x.shape})")
    var = m2 / count
    y = batch_norm(x, gamma, beta, running_mean=mean, running_var=var, training=False, eps=eps,
                   channel_axis=channel_axis, activation=activation, negative_slope=negative_slope)
    if running_mean is not None:
        _compute.update_running(running_mean, running_var, mean, var, count, momentum)
    with np.errstate(divide="ignore"):
        return y, mean, 1.0 / np.sqrt(var + eps), count


def sync_batch_norm_backward(
    dy, x, mean, invstd, count, gamma=None, beta=None, *, comm, activation=None, negative_slope=0.01, channel_axis=1
):
    """Gradient of :func:`sync_batch_norm_forward` for this rank's part of the batch.

    Parameters
    ----------
    dy, x : array_like
        This rank's gradient and input.
    mean, invstd, count
        What the forward returned.
    gamma, beta, activation, negative_slope, channel_axis
        As in the forward.
    comm : mpi4py.MPI.Intracomm

    Returns
    -------
    dx : ndarray
        This rank's input gradient (dtype of dy and x combined).
    dgamma, dbeta : ndarray of float64
        This rank's contributions, as PyTorch's SyncBatchNorm gives them:
        sum them over the ranks (with the other parameters' gradients) for
        the whole batch's.
    """
    comm = _check_comm(comm)
    act = _args.activation(activation, negative_slope)
    dy_in, x_in = _bulk_input(dy, "dy"), _bulk_input(x, "x")
    axes, cshape, _ = _args.gradient_axes(dy_in.shape, x_in.shape, channel_axis)
    mean = _args.per_channel(mean, "mean", cshape)
    invstd = _args.per_channel(invstd, "invstd", cshape)
    gamma = np.ones(cshape) if gamma is None else _args.per_channel(gamma, "gamma", cshape)
    beta = np.zeros(cshape) if beta is None else _args.per_channel(beta, "beta", cshape)
    _args.batch_count(count, cshape)
    result = _args.result_dtype(dy_in, x_in)
    if act[0]:  # dz = dy * act'(z), z recomputed from x
        work = _args.compute_dtype(result)
        x_in = _as_compute(x_in, work)
        dz = empty_like_layout(x_in, work)
        _compute.activation_grad(_as_compute(dy_in, work), x_in, dz, axes, mean, gamma * invstd, beta, act)
        dy_in = dz

    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy_in, x_in, mean, invstd, channel_axis=channel_axis)
    dgamma, dbeta = sum_dy_xmu * invstd, sum_dy
    total_dy, total_dy_xmu = _allreduce_sum(comm, sum_dy, sum_dy_xmu)
    dx = batch_norm_backward_elemt(dy_in, x_in, mean, invstd, gamma, total_dy, total_dy_xmu, count,
                                   channel_axis=channel_axis)
    return dx.astype(result, copy=False), dgamma, dbeta


# --------------------------------------------------------------------------
# The layer


class SyncBatchNorm(BatchNorm):
    """:class:`cbn.BatchNorm` whose batch statistics are those of the batch over all of ``comm``'s ranks.

    Parameters
    ----------
    num_features : int or tuple of ints
    comm : mpi4py.MPI.Intracomm, default MPI.COMM_WORLD
        The ranks that share each batch.
    **options
        As for :class:`cbn.BatchNorm` (channel_axis, eps, momentum, affine,
        track_running_stats, activation, negative_slope, dtype).

    Notes
    -----
    Training costs one ``Allreduce`` of ``2 * C + 1`` float64 values per
    forward and one of ``2 * C`` per backward (C channels), whatever the
    batch size.  Running statistics come out the same on every rank.
    ``grad_weight`` and ``grad_bias`` are this rank's contributions (as in
    PyTorch): sum them over the ranks with the other gradients.  In eval
    mode nothing is communicated: running statistics when tracked, else this
    rank's own batch statistics (as PyTorch), so ranks may evaluate on their
    own.  NumPy arrays only.

    Examples
    --------
    Run with ``mpiexec -n 2 python script.py``::

        from mpi4py import MPI
        import numpy as np
        from cbn.distributed import SyncBatchNorm

        layer = SyncBatchNorm(16, comm=MPI.COMM_WORLD)
        x = np.random.default_rng(MPI.COMM_WORLD.rank).normal(size=(32, 16))
        y = layer(x)            # normalized with the statistics of all 64 rows
        dx = layer.backward(np.ones_like(y))
    """

    def __init__(self, num_features, *, comm=None, **options):
        super().__init__(num_features, **options)
        self.comm = _check_comm(MPI.COMM_WORLD if comm is None else comm)
        self._count = None

    def __repr__(self):
        return super().__repr__().replace("BatchNorm(", "SyncBatchNorm(", 1)[:-1] + f", ranks={self.comm.Get_size()})"

    def _forward_batch(self, x, momentum, running):
        if not self.training:  # eval without running statistics: this rank's batch, no collective (as PyTorch)
            self._count = None
            return super()._forward_batch(x, momentum, running)
        y, mean, invstd, self._count = sync_batch_norm_forward(
            x, self.weight, self.bias, comm=self.comm, momentum=momentum, eps=self.eps,
            channel_axis=self.channel_axis, activation=self.activation, negative_slope=self.negative_slope, **running,
        )
        return y, mean, invstd

    def _backward_batch(self, dy, x, mean, invstd):
        if self._count is None:
            return super()._backward_batch(dy, x, mean, invstd)
        return sync_batch_norm_backward(
            dy, x, mean, invstd, self._count, self.weight, self.bias, comm=self.comm, activation=self.activation,
            negative_slope=self.negative_slope, channel_axis=self.channel_axis,
        )
