"""``mpiexec -n N python -m cbn mpi-bench``: SyncBatchNorm's cost on N ranks, a fixed batch per rank (weak scaling).

Times, per training step (forward + backward) and as the slowest rank sees
it, best of ``--repeat`` after a warm-up: cbn's one-process
``batch_norm_forward`` + ``batch_norm_backward`` on the rank's own batch
(the baseline, in the same processes), the distributed pair
``sync_batch_norm_forward`` + ``sync_batch_norm_backward`` on it, and the two
all-reduces alone (the statistics' Chan merge and the gradient sums), with
the bytes each moves.
"""
import argparse
import time

import numpy as np


def _slowest(comm, fn, repeat):
    """Best over repetitions of the slowest rank's time for fn(), ranks started together."""
    from mpi4py import MPI

    fn()  # warm-up
    best = np.inf
    for _ in range(repeat):
        comm.Barrier()
        start = time.perf_counter()
        fn()
        best = min(best, comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpiexec -n N python -m cbn mpi-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32x64x28x28", help="the batch on each rank, NCHW (default 32x64x28x28)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    from mpi4py import MPI

    import cbn
    from cbn.distributed import allreduce_stats, sync_batch_norm_backward, sync_batch_norm_forward

    comm = MPI.COMM_WORLD
    shape = tuple(int(n) for n in args.shape.split("x"))
    C = shape[1]
    rng = np.random.default_rng(comm.Get_rank())
    x = rng.normal(3.0, 2.0, shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    gamma, beta = np.ones(C), np.zeros(C)
    f64 = (None, np.empty(C), np.empty(C))

    def local_step():
        _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, out=f64)
        cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)

    def sync_step():
        _, mean, invstd, count = sync_batch_norm_forward(x, gamma, beta, comm=comm)
        sync_batch_norm_backward(dy, x, mean, invstd, count, gamma, beta, comm=comm)

    partial = cbn.batch_stats_partial(x)
    sums = np.zeros(2 * C)
    times = {
        "local": _slowest(comm, local_step, args.repeat),
        "sync": _slowest(comm, sync_step, args.repeat),
        "stats": _slowest(comm, lambda: allreduce_stats(comm, *partial), args.repeat * 5),
        "sums": _slowest(comm, lambda: comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM), args.repeat * 5),
    }
    if comm.Get_rank() == 0:
        mb = x.nbytes / 1e6
        print(f"{comm.Get_size()} ranks, {args.shape} {args.dtype} per rank ({mb:.1f} MB), "
              f"cbn {cbn.__version__}, {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'ranks':>5} {'local ms':>9} {'sync ms':>8} {'sync/local':>10} {'stats all-reduce us':>20} "
              f"{'bytes':>6} {'sums all-reduce us':>19} {'bytes':>6}")
        print(f"{comm.Get_size():5d} {times['local'] * 1e3:9.3f} {times['sync'] * 1e3:8.3f} "
              f"{times['sync'] / times['local']:10.2f} {times['stats'] * 1e6:20.1f} {(2 * C + 1) * 8:6d} "
              f"{times['sums'] * 1e6:19.1f} {2 * C * 8:6d}")
