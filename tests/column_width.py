"""How the column kernels' time depends on the row's width, at the same bytes (a diagnostic, not a test).

``python tests/column_width.py [dtype] [MiB] [--old BUILD]`` times, in one process and in turns,
the column layout's elementwise passes on (A, C) arrays of the same size for C from 256 to 4096
channels: the gradient's dx pass (``_kernels.backward_elemt``) and the inference
(``_kernels.inference``), each against a copy of the same bytes.  A row of C values reads C values
of each parameter row (4 for dx, 3 for the inference), so those rows take C * 4 * itemsize bytes
of L1 for dx: 16 KiB at C = 1024 in float32, half the L1 of AMD Zen 4, where the rows' own lines
and the output's must fit too (BENCHMARKS.md, seventh session: what that costs, and what was
tried).  With ``--old BUILD`` (a build as for ``tests/ab_kernels.py``) the same passes of that
build take turns too, and the table gives the installed build's time over the old one's.
"""
import sys
import timeit

import numpy as np
from ab_kernels import load_old

import cbn._kernels as kernels

WIDTHS = (256, 512, 1024, 2048, 4096)


def best(f, rounds=2):
    return min(min(timeit.repeat(f, number=3, repeat=3)) / 3 for _ in range(rounds))


def main(argv):
    args = list(argv[1:])
    builds = {"": kernels}
    if "--old" in args:
        at = args.index("--old")
        builds = {"old ": load_old(args[at + 1]), "": kernels}
        del args[at:at + 2]
    dtype = np.dtype(args[0] if args else "float32")
    nbytes = int(float(args[1]) * 2**20) if len(args) > 1 else 16 << 20
    print(f"threads {kernels.max_threads()}, {dtype.name}, {nbytes / 2**20:.0f} MiB per array, ms (copies)")
    rng = np.random.default_rng(0)
    for c in WIDTHS:
        shape = (nbytes // (c * dtype.itemsize), c, 1)
        x, dy = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
        out = np.empty_like(x)
        coef = np.stack([np.full(c, 0.1), np.full(c, 0.01), np.full(c, 0.9), np.ones(c)])
        mean, var, none = np.zeros(c), np.ones(c), np.empty(0)
        calls = {"copy": lambda: np.copyto(out, x)}
        for tag, k in builds.items():
            calls[tag + "dx"] = lambda k=k: k.backward_elemt(dy, x, out, coef)
            calls[tag + "inference"] = lambda k=k: k.inference(x, out, mean, var, none, none, 1e-5)
        times = {name: np.inf for name in calls}
        for _ in range(3):  # in turns, so that drift hits all alike
            for name, call in calls.items():
                times[name] = min(times[name], best(call))
        cells = "  ".join(f"{k} {times[k] * 1e3:.3f} ({times[k] / times['copy']:.2f})" for k in ("dx", "inference"))
        if len(builds) > 1:
            cells += "  new/old: " + "  ".join(f"{k} {times[k] / times['old ' + k]:.2f}" for k in ("dx", "inference"))
        print(f"C={c:5d} ({c * dtype.itemsize:5d} B rows): copy {times['copy'] * 1e3:.3f}  {cells}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
