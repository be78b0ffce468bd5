"""cbn and PyTorch timed in turns, one call at a time (a diagnostic, not a test).

``python -m cbn bench`` times PyTorch as users call it: each call writes its
result into new memory, whose pages the kernel has just zeroed, so their lines
are in cache when PyTorch writes them.  This also times PyTorch writing into
one output of its own, as cbn is timed (``out=``), and a copy of the same
bytes, taking turns call by call, best of N::

    OMP_NUM_THREADS=T python tests/torch_turns.py [OP] [SHAPE] [DTYPE] [N]

OP is train, infer or backward (default infer); SHAPE like 4096x1024 (channel
axis 1; default 4096x1024); DTYPE float32 or float64; N the rounds (default 30).
Prints microseconds per call.  Run it outside the source checkout, or with the
installed cbn first on the path.
"""
import sys
import time

import numpy as np
import torch

import cbn


def calls(op, x, dy):
    """{name: function} for cbn, PyTorch and PyTorch with out= of one operation."""
    c = x.shape[1]
    y = np.empty_like(x)
    g, b, rm, rv = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
    _, mean, invstd = cbn.batch_norm_forward(x, g, b)
    tx, tdy, ty = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(y)
    tw, tb = torch.ones(c, dtype=tx.dtype), torch.zeros(c, dtype=tx.dtype)
    trm, trv = torch.zeros(c, dtype=tx.dtype), torch.ones(c, dtype=tx.dtype)
    tm, ti = torch.from_numpy(mean.astype(x.dtype)), torch.from_numpy(invstd.astype(x.dtype))
    aten, unused = torch.ops.aten, (torch.empty(0, dtype=tx.dtype), torch.empty(0, dtype=tx.dtype))
    if op == "train":
        return {
            "cbn": lambda: cbn.batch_norm_forward(x, g, b, out=(y, None, None)),
            "torch": lambda: aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5),
            "torch out=": lambda: aten.native_batch_norm.out(tx, tw, tb, None, None, True, 0.1, 1e-5, out=ty,
                                                             save_mean=unused[0], save_invstd=unused[1]),
        }
    if op == "infer":
        return {
            "cbn": lambda: cbn.batch_norm(x, g, b, running_mean=rm, running_var=rv, training=False, out=y),
            "torch": lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5),
            "torch out=": lambda: aten.native_batch_norm.out(tx, tw, tb, trm, trv, False, 0.1, 1e-5, out=ty,
                                                             save_mean=unused[0], save_invstd=unused[1]),
        }
    mask = [True, True, True]
    return {
        "cbn": lambda: cbn.batch_norm_backward(dy, x, mean, invstd, g, out=(y, None, None)),
        "torch": lambda: aten.native_batch_norm_backward(tdy, tx, tw, None, None, tm, ti, True, 1e-5, mask),
    }


def main(argv):
    op = argv[1] if len(argv) > 1 else "infer"
    shape = tuple(int(n) for n in (argv[2] if len(argv) > 2 else "4096x1024").split("x"))
    dtype = np.dtype(argv[3] if len(argv) > 3 else "float32")
    rounds = int(argv[4]) if len(argv) > 4 else 30
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    copy_out = np.empty_like(x)
    funcs = {"copy": lambda: np.copyto(copy_out, x), **calls(op, x, dy)}
    torch.set_num_threads(cbn._kernels.max_threads())
    best = dict.fromkeys(funcs, np.inf)
    for _ in range(rounds):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            best[name] = min(best[name], time.perf_counter() - start)
    cells = ", ".join(f"{name} {t * 1e6:.1f}" for name, t in best.items())
    print(f"{op} {'x'.join(map(str, shape))} {dtype.name}, {cbn._kernels.max_threads()} thread(s), us: {cells}")


if __name__ == "__main__":
    main(sys.argv)
