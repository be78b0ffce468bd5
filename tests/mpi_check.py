"""cbn.distributed under MPI: run as ``mpiexec -n P python tests/mpi_check.py`` (P = 1, 2, 3, ...).

Every rank builds the same whole batch, keeps its own rows (unequal parts,
and an empty one from 3 ranks on), and checks that the distributed forward,
backward and layer equal single-process batch norm on the whole batch, and
that the merged statistics and running statistics are the same bits on every
rank.  Prints "mpi_check: P ranks OK" on rank 0; any failure aborts every
rank with a non-zero exit status.
"""
import sys
import traceback

import numpy as np
from mpi4py import MPI

import cbn
from cbn.distributed import SyncBatchNorm, allreduce_stats, sync_batch_norm_backward, sync_batch_norm_forward

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def abort_on_failure(kind, value, tb):
    """A failing rank takes every rank down (the others may be waiting in a collective)."""
    sys.stderr.write(f"rank {rank} of {size}: " + "".join(traceback.format_exception(kind, value, tb)))
    sys.stderr.flush()
    comm.Abort(1)


sys.excepthook = abort_on_failure


def my_rows(n):
    """This rank's slice of n rows: unequal parts, the second rank's empty when there are 3 ranks or more."""
    weights = np.array([3 + 2 * r for r in range(size)], dtype=float)
    if size >= 3:
        weights[1] = 0
    bounds = np.concatenate([[0], np.round(np.cumsum(weights) / weights.sum() * n)]).astype(int)
    return slice(bounds[rank], bounds[rank + 1])


def same_on_every_rank(*arrays):
    for a in arrays:
        gathered = comm.allgather(np.ascontiguousarray(a).tobytes())
        assert all(g == gathered[0] for g in gathered), "ranks disagree"


def close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


def check_functions(shape, axis, dtype, offset, activation):
    rng = np.random.default_rng(42)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    cshape = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    gamma, beta = rng.uniform(0.5, 2, cshape), rng.normal(size=cshape)
    rows = my_rows(shape[0])
    # output rounding, plus the merged mean's rounding (relative to |mean|) seen through invstd
    tol = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype] + 1e-15 * offset

    rm_full, rv_full = np.zeros(cshape), np.ones(cshape)
    f64 = (None, np.empty(cshape), np.empty(cshape))
    y_full, mean_full, invstd_full = cbn.batch_norm_forward(
        x, gamma, beta, running_mean=rm_full, running_var=rv_full, channel_axis=axis, activation=activation, out=f64)
    dx_full, dgamma_full, dbeta_full = cbn.batch_norm_backward(
        dy, x, mean_full, invstd_full, gamma, beta, channel_axis=axis, activation=activation,
        out=(None, np.empty(cshape), np.empty(cshape)))

    rm, rv = np.zeros(cshape), np.ones(cshape)
    y, mean, invstd, count = sync_batch_norm_forward(
        x[rows], gamma, beta, comm=comm, running_mean=rm, running_var=rv, channel_axis=axis, activation=activation)
    assert count == x.size // np.prod(cshape) and y.dtype == y_full.dtype and y.shape == x[rows].shape
    label = f"{shape} axis {axis} {np.dtype(dtype).name} offset {offset} {activation}"
    close(y, y_full[rows], tol, f"y, {label}")
    close(mean, mean_full, 1e-15, f"mean, {label}")
    spread_tol = 1e-12 + 1e-16 * offset  # rounding of the pieces' means, relative to the spread
    close(invstd, invstd_full, spread_tol, f"invstd, {label}")
    close(rm, rm_full, 1e-15, f"running_mean, {label}")
    close(rv, rv_full, spread_tol, f"running_var, {label}")
    same_on_every_rank(mean, invstd, rm, rv)

    dx, dgamma, dbeta = sync_batch_norm_backward(
        dy[rows], x[rows], mean, invstd, count, gamma, beta, comm=comm, channel_axis=axis, activation=activation)
    assert dx.dtype == dx_full.dtype and dx.shape == x[rows].shape
    close(dx, dx_full[rows], 5 * tol, f"dx, {label}")
    close(comm.allreduce(dgamma), dgamma_full, 1e-9, f"dgamma, {label}")
    close(comm.allreduce(dbeta), dbeta_full, 1e-9, f"dbeta, {label}")


def check_layer():
    """Three SGD steps of SyncBatchNorm on the ranks' rows against BatchNorm on the whole batch."""
    rng = np.random.default_rng(7)
    options = dict(momentum=None, activation="tanh", dtype=np.float64)
    whole, mine = cbn.BatchNorm(6, **options), SyncBatchNorm(6, comm=comm, **options)
    for step in range(3):
        x = rng.normal(5.0, 3.0, (17, 6, 4))
        dy = rng.standard_normal(x.shape)
        rows = my_rows(len(x))
        close(mine(x[rows]), whole(x)[rows], 1e-12, f"layer y, step {step}")
        close(mine.backward(dy[rows]), whole.backward(dy)[rows], 1e-11, f"layer dx, step {step}")
        grad_w, grad_b = comm.allreduce(mine.grad_weight), comm.allreduce(mine.grad_bias)
        close(grad_w, whole.grad_weight, 1e-11, "layer grad_weight")
        close(grad_b, whole.grad_bias, 1e-11, "layer grad_bias")
        for layer, gw, gb in ((whole, whole.grad_weight, whole.grad_bias), (mine, grad_w, grad_b)):
            layer.weight -= 0.1 * gw
            layer.bias -= 0.1 * gb
    assert mine.num_batches_tracked == whole.num_batches_tracked == 3
    same_on_every_rank(mine.running_mean, mine.running_var)
    close(mine.running_mean, whole.running_mean, 1e-14, "layer running_mean")
    close(mine.running_var, whole.running_var, 1e-13, "layer running_var")
    x = rng.normal(5.0, 3.0, (9, 6, 4))
    close(mine.eval()(x), whole.eval()(x), 1e-12, "layer eval y")
    state = mine.state_dict()
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]


def check_layer_without_state():
    """No affine parameters, no running statistics (batch statistics in eval mode too), channels last."""
    rng = np.random.default_rng(8)
    options = dict(channel_axis=-1, affine=False, track_running_stats=False, dtype=np.float32)
    whole, mine = cbn.BatchNorm(5, **options), SyncBatchNorm(5, comm=comm, **options)
    x = rng.normal(-2.0, 0.5, (13, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    rows = my_rows(len(x))
    close(mine(x[rows]), whole(x)[rows], 1e-5, "stateless layer y")
    close(mine.backward(dy[rows]), whole.backward(dy)[rows], 1e-5, "stateless layer dx")
    assert mine.grad_weight is None and mine.running_mean is None and mine.state_dict() == {}
    # eval: this rank's own batch, no collective, so ranks may evaluate alone (rank 0 only, here)
    if rank == 0:
        local = cbn.BatchNorm(5, **options).eval()
        x = rng.normal(1.0, 2.0, (6, 3, 5)).astype(np.float32)
        close(mine.eval()(x), local(x), 1e-6, "stateless layer eval y")
        close(mine.backward(dy[:6]), local.backward(dy[:6]), 1e-6, "stateless layer eval dx")
        mine.train()


def check_stats_bits():
    """Merged statistics: the same bits on every rank, at any offset, with empty ranks."""
    rng = np.random.default_rng(rank)
    for offset in (0.0, 1e5, 1e12):
        n = [0, 1, 7, 1000][rank % 4]
        x = offset + rng.standard_normal((n, 5))
        count, mean, m2 = allreduce_stats(comm, *cbn.batch_stats_partial(x))
        same_on_every_rank(np.array(count), mean, m2)
        whole = np.concatenate(comm.allgather(x)) - offset  # exact: x is within a factor 2 of offset
        assert count == len(whole)
        if count:  # the pieces' means round at |offset| * 1.1e-16, which the merged m2 sees
            close(mean, offset + whole.mean(axis=0), 2e-15, "merged mean")
            close(m2, ((whole - whole.mean(axis=0)) ** 2).sum(axis=0), 1e-12 + 1e-16 * offset, "merged m2")


def check_too_few_values():
    """One value per channel over all ranks: ValueError on every rank, after the collective."""
    x = np.ones((1 if rank == 0 else 0, 3))
    try:
        sync_batch_norm_forward(x, comm=comm)
    except ValueError as exc:
        assert "more than 1 value per channel" in str(exc)
    else:
        raise AssertionError("no ValueError")


def check_bad_comm():
    for bad in (None, "world", MPI.COMM_WORLD.py2f()):
        try:
            sync_batch_norm_forward(np.ones((4, 2)), comm=bad)
        except TypeError as exc:
            assert "comm must be an mpi4py intracommunicator" in str(exc)
        else:
            raise AssertionError(f"comm={bad!r} accepted")


for case in [
    ((11, 4, 3, 5), 1, np.float32, 1e4, None),
    ((11, 4, 3, 5), 1, np.float32, 0.0, "relu"),
    ((9, 3, 5, 4), -1, np.float64, 1e6, "sigmoid"),
    ((7, 3, 2, 4), (1, 3), np.float64, 0.0, "leaky_relu"),
    ((13, 8), 1, np.float16, 3.0, None),
]:
    check_functions(*case)
check_layer()
check_layer_without_state()
check_stats_bits()
check_too_few_values()
check_bad_comm()
comm.Barrier()
if rank == 0:
    print(f"mpi_check: {size} ranks OK")
