"""``mpiexec -n N python -m cbn mpi-demo``: data-parallel training with ``cbn.distributed.SyncBatchNorm``.

The demo's network (three hidden layers of 100 sigmoid units, batch norm
before each sigmoid) learns the digits with SGD on batches of 60 split
unevenly over N ranks: each rank runs its rows through ``SyncBatchNorm``
layers (statistics of the whole batch), and one ``Allreduce`` sums the
gradients.  Every rank also trains the same network in one process on the
whole batches, and the two loss curves are printed side by side: they agree
to rounding, on any number of ranks.
"""
import argparse
import sys
import time

import numpy as np

from ._demo import BATCH, HIDDEN, MLP, cross_entropy, load_digits_split


def rows_of(rank, size, n):
    """This rank's rows of a batch of n: uneven parts (rank r gets about r + 1 shares)."""
    shares = np.arange(1, size + 1, dtype=float)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(shares)]) / shares.sum() * n).astype(int)
    return slice(bounds[rank], bounds[rank + 1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mpiexec -n N python -m cbn mpi-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from mpi4py import MPI

    from .distributed import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x_train, y_train, _, _ = load_digits_split(args.seed)
    sizes = (x_train.shape[1], *HIDDEN, 10)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    # the same initial weights and batches on every rank, for both networks
    parallel = MLP(sizes, np.random.default_rng(args.seed), batch_norm=True,
                   norm_layer=lambda n: SyncBatchNorm(n, comm=comm, dtype=np.float64))
    single = MLP(sizes, np.random.default_rng(args.seed), batch_norm=True)
    mine = rows_of(rank, size, BATCH)
    if rank == 0:
        counts = [int(rows_of(r, size, BATCH).stop - rows_of(r, size, BATCH).start) for r in range(size)]
        print(f"{size} ranks, rows per rank {counts} of each batch of {BATCH}")
        print(f"{'step':>6} {'loss, N ranks':>16} {'loss, 1 process':>16} {'difference':>11}")
    worst = 0.0
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(args.steps * BATCH // len(x_train) + 1)])
    for step in range(args.steps):
        batch = order[step * BATCH:(step + 1) * BATCH]
        x, labels = x_train[batch], y_train[batch]

        # N ranks: local rows; loss and gradients are sums over the whole batch / BATCH
        logits = parallel.forward(x[mine])
        local_loss, dlogits = cross_entropy(logits, labels[mine])
        n_mine = len(labels[mine])
        grads = parallel.backward(dlogits * (n_mine / BATCH))
        packed = np.concatenate([g.ravel() for g in grads] + [[local_loss * n_mine / BATCH]])
        comm.Allreduce(MPI.IN_PLACE, packed, op=MPI.SUM)
        offset = 0
        for p in parallel.parameters():
            p -= args.rate * packed[offset:offset + p.size].reshape(p.shape)
            offset += p.size
        loss_parallel = packed[-1]

        # one process, the whole batch
        loss_single, dlogits = cross_entropy(single.forward(x), labels)
        for p, g in zip(single.parameters(), single.backward(dlogits)):
            p -= args.rate * g

        worst = max(worst, abs(loss_parallel - loss_single))
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"{step + 1:6d} {loss_parallel:16.12f} {loss_single:16.12f} {loss_parallel - loss_single:11.2e}")
    worst = comm.allreduce(worst, op=MPI.MAX)
    if rank == 0:
        print(f"largest loss difference over {args.steps} steps: {worst:.2e} "
              f"({time.perf_counter() - start:.1f} s)")
    if not worst <= 1e-9:
        sys.exit("the loss curves differ")
