"""Two builds of cbn's kernels timed against each other in one process (a diagnostic, not a test).

This machine is shared and its speed drifts by 20-30 % within minutes, more
than most kernel changes gain or lose.  Timing the old and the new build in
separate runs then measures the drift; this loads both compiled modules into
one process and takes turns between them, best of 9, so both see the same
machine.  Build the old one from a commit into its own directory first::

    git worktree add /tmp/old COMMIT
    pip install --no-build-isolation --no-deps --target /tmp/old-build /tmp/old
    OMP_NUM_THREADS=2 python tests/ab_kernels.py /tmp/old-build [float32|float64] [AxCxB,...] [ACTIVATION]

It times the kernels themselves (training forward, inference, backward) on
(A, C, B) views: B > 1 is row mode (NCHW: A=N, B=H*W), B = 1 column mode (NC,
NHWC); the installed cbn is "new".  Ratios below 1 mean the new build is faster.
ACTIVATION (relu, leaky_relu, sigmoid, tanh) fuses that activation into all
three (until 8b840ee the inference was timed without it).

``--new NEW_BUILD`` (anywhere in the arguments) times another build as "new"
in place of the installed one: two variants of a constant, say, each built
with ``pip install --target`` from a copy of the tree.

Where a change moves buffers or loads relative to the arrays, a build's time
can depend on where the stack starts in a page, which varies from process to
process (4K aliasing is one way: a load waits for a store in flight whose
address matches it in the low 12 bits).  Pin it and move it to see that::

    for pad in 1 1500 3100; do
        P=$(head -c $pad /dev/zero | tr '\0' x) OMP_NUM_THREADS=2 \
            setarch -R python tests/ab_kernels.py /tmp/old-build float32 8192x1024x1
    done

(A variant tried for c27a4a8 took 1.01x the old build's time at one offset
and 1.32x at another.)

``python tests/ab_kernels.py --stream [dtype] [cases]`` instead compares the
installed build with itself: plain stores ("old") against non-temporal stores
forced at every size ("new"), which shows where streaming starts to pay
(``_kernels.stream_bytes``).
"""
import glob
import importlib.util
import sys
import timeit
import types

import numpy as np

import cbn._kernels as new

CASES = "32x64x3136,64x256x196,4096x1024x1,100352x64x1,8x32x16384,32x256x3136,64x128x1,16x32x64"


def load_old(build_dir, package_name="old_cbn"):
    """The _kernels module of another build, under a package name of its own."""
    path = glob.glob(f"{build_dir}/cbn/_kernels*.so")[0]
    package = types.ModuleType(package_name)
    package.__path__ = []
    sys.modules[package_name] = package
    spec = importlib.util.spec_from_file_location(f"{package_name}._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}  # codes of src_c/cbn_loops.h


def compare(variants, shape, dtype, act=0, repeat=9):
    """{op: (old seconds, new seconds)} per call, best of ``repeat`` interleaved rounds.

    variants: two (kernels module, setup) pairs, setup called before each of its timings."""
    a, c, b = shape
    name = "float" if dtype == np.float32 else "double"
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = np.empty_like(x)
    gamma, beta, stats, sums = np.ones(c), np.full(c, 0.1), np.empty((3, c)), np.empty((2, c))
    new.forward_train[name](x, y, gamma, beta, 1e-5, stats, 0, 0.0)
    params = np.stack([stats[0], stats[2], gamma, beta])  # mean, invstd, gamma, beta
    running_mean, running_var = stats[0].copy(), stats[1].copy()
    calls = {
        "train": lambda m: m.forward_train[name](x, y, gamma, beta, 1e-5, stats, act, 0.01),
        "infer": lambda m: m.inference[name](x, y, running_mean, running_var, gamma, beta, 1e-5, act, 0.01),
        "backward": lambda m: m.backward[name](dy, x, y, params, sums, act, 0.01),
    }
    number = max(3, 1_000_000 // x.size)
    result = {}
    for op, call in calls.items():
        best = [np.inf, np.inf]
        for _ in range(repeat):
            for k, (module, setup) in enumerate(variants):
                setup()
                best[k] = min(best[k], timeit.timeit(lambda: call(module), number=number) / number)
        result[op] = tuple(best)
    return result


def main(argv):
    argv = list(argv)
    newer = new
    if "--new" in argv:
        at = argv.index("--new")
        newer = load_old(argv[at + 1], "new_cbn")
        del argv[at:at + 2]
    if argv[1] == "--stream":
        setting = newer.stream_bytes()
        variants = [(newer, lambda: newer.stream_bytes(-1)), (newer, lambda: newer.stream_bytes(0))]
        print(f"{newer.__file__}: plain stores -> non-temporal stores")
    else:
        old = load_old(argv[1])
        variants = [(old, lambda: None), (newer, lambda: None)]
        print(f"old {old.__file__}\nnew {newer.__file__}")
    dtype = np.dtype(argv[2] if len(argv) > 2 else "float32")
    shapes = [tuple(int(n) for n in case.split("x")) for case in (argv[3] if len(argv) > 3 else CASES).split(",")]
    activation = argv[4] if len(argv) > 4 else "none"
    print(f"threads {newer.max_threads()}, {dtype.name}, activation {activation}, us per call")
    for shape in shapes:
        result = compare(variants, shape, dtype, ACTIVATIONS[activation])
        cells = "  ".join(f"{op} {t0 * 1e6:.1f} -> {t1 * 1e6:.1f} ({t1 / t0:.2f})" for op, (t0, t1) in result.items())
        print(f"{'x'.join(map(str, shape))} ({np.prod(shape) * dtype.itemsize / 2**20:.2f} MiB): {cells}", flush=True)
    if argv[1] == "--stream":
        newer.stream_bytes(setting)


if __name__ == "__main__":
    main(sys.argv)
