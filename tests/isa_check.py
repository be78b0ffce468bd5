"""The kernels built for one instruction set each give the installed build's bits.

The installed build compiles its loops three times (AVX-512, AVX2, baseline
x86-64; target_clones) and runs the best the CPU has; FMA contraction is off
and every reduction has a fixed order, so all three are meant to round
alike.  tests/isa_check.sh builds the kernels once per instruction set
without clones (-DCBN_NO_CLONES, plus -mavx512f, -mavx2 or nothing) and runs

    python tests/isa_check.py BUILD_DIR...

from tests/, which loads each build's _kernels next to the installed one and
compares every output bit for bit: training forward, inference, backward
(each with every activation), batch statistics and the split backward, over
row and column layouts, odd and strided shapes, fused and two-pass sizes,
plain and non-temporal stores, float32 and float64, on adversarial data (a
large offset, an outlier first in its channel, a constant channel).  Prints
one line naming the builds it compared; exits 1 on the first difference.
"""
import os
import sys

import numpy as np
from ab_kernels import ACTIVATIONS, load_old

import cbn._kernels as installed

SHAPES = [  # (A, C, B): B > 1 row mode, B == 1 column mode
    (5, 3, 7), (16, 32, 64), (977, 16, 64), (8, 3, 50001), (64, 21, 49),  # fused, short pieces, two-pass
    (4096, 100, 1), (333, 37, 1), (7, 5, 1), (3001, 70, 1),  # columns, with tails
    (515, 1030, 1),  # columns 4 KiB apart and more, summed CBN_ROWS rows at a time, 3 rows over
]


def data(shape, dtype, seed):
    """x with per-channel offsets up to 1e5, an outlier first in channel 0 and a constant channel; dy."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, (1, c, 1)) + rng.choice([0.0, 1.0, -7.5, 1e5], (1, c, 1))
    x[0, 0, 0] = 1e4
    x[:, c - 1, :] = 1e7
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


def outputs(kernels, x, dy, rng_seed, dtype):
    """Every output of every kernel entry point on (x, dy), as a list of arrays."""
    name = "float" if dtype == np.float32 else "double"
    rng = np.random.default_rng(rng_seed)
    c = x.shape[1]
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    running_mean, running_var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    got = []
    mean, m2 = np.empty(c), np.empty(c)
    kernels.channel_stats[name](x, mean, m2)
    got += [mean, m2]
    for act in ACTIVATIONS.values():
        y, stats = np.empty_like(x), np.empty((3, c))
        kernels.forward_train[name](x, y, gamma, beta, 1e-5, stats, act, 0.2)
        z = np.empty_like(x)
        kernels.inference[name](x, z, running_mean, running_var, gamma, beta, 1e-5, act, 0.2)
        dx, sums = np.empty_like(x), np.empty((2, c))
        kernels.backward[name](dy, x, dx, np.stack([stats[0], stats[2], gamma, beta]), sums, act, 0.2)
        got += [y, stats, z, dx, sums]
    sum_dy, sum_dy_xmu = np.empty(c), np.empty(c)
    kernels.backward_reduce[name](dy, x, mean, sum_dy, sum_dy_xmu)
    dx = np.empty_like(x)
    coef = np.stack([mean, sum_dy / x.size * c, rng.uniform(0.1, 1.0, c), rng.uniform(0.5, 2.0, c)])
    kernels.backward_elemt[name](dy, x, dx, coef)
    return got + [sum_dy, sum_dy_xmu, dx]


def cases():
    """(label, x, dy, seed, dtype) over shapes, dtypes and a strided view."""
    for k, shape in enumerate(SHAPES):
        for dtype in (np.float32, np.float64):
            x, dy = data(shape, dtype, k)
            yield f"{'x'.join(map(str, shape))} {np.dtype(dtype).name}", x, dy, k, dtype
    x, dy = data((6, 4, 301), np.float64, 99)
    yield "6x4x301 float32, every other value", x.astype(np.float32)[:, :, ::2], dy.astype(np.float32)[:, :, ::2], \
        99, np.float32


def main(build_dirs):
    builds = [(os.path.basename(d.rstrip("/")), load_old(d, f"isa_{i}")) for i, d in enumerate(build_dirs)]
    compared = 0
    for stream in (installed.stream_bytes(), 0):  # the default threshold, and non-temporal stores at every size
        for module in [installed] + [m for _, m in builds]:
            module.stream_bytes(stream)
        for label, x, dy, seed, dtype in cases():
            want = outputs(installed, x, dy, seed, dtype)
            for build, module in builds:
                got = outputs(module, x, dy, seed, dtype)
                for i, (g, w) in enumerate(zip(got, want)):
                    if not np.array_equal(g, w, equal_nan=True):
                        print(f"isa_check: {build} differs from the installed build on {label} "
                              f"(output {i}, stream_bytes {stream}): max |difference| "
                              f"{np.nanmax(np.abs(g.astype(float) - w)):.3g}")
                        return 1
                compared += len(got)
    print(f"isa_check: {', '.join(b for b, _ in builds)}: the installed build's bits in all {compared} outputs "
          f"({installed.max_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
