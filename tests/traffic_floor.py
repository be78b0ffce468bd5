"""How close cbn's kernels come to the memory traffic they cannot avoid (a diagnostic, not a test).

``python tests/traffic_floor.py [threads,...] [repeat]`` compiles ``traffic_floor.c`` (cc with
OpenMP and AVX-512, into a temporary directory), then times, per default case of ``python -m cbn
bench`` and per thread count, in one process and in turns (``cbn._bench._best_interleaved``):

- copy: the benchmark's floor (the faster of one ``np.copyto`` and one per thread);
- floor: a C loop that moves the bytes the operation must move, in the passes cbn's kernel makes,
  with no batch-norm arithmetic and non-temporal stores: for the training forward x read twice
  (columns: twice from memory; rows: the second time from L2, a fused group of channels at a
  time, cut as cbn cuts them) and y written; for inference x read and y written; for the backward
  dy and x read twice and dx written;
- cbn: the same operation through the public API (float32, ``out=``).

All on the same 64-byte-aligned arrays.  It prints floor/copy (what the layout's passes cost
before any arithmetic: no kernel that makes these passes can go below it) and cbn/floor (what
cbn's arithmetic and loop structure add).
"""
import ctypes
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

import cbn
from cbn import _bench

HERE = pathlib.Path(__file__).resolve().parent
FUSE_BYTES = 1 << 20  # cbn/_kernels.pyx: a channel group's blocks stay in L2 up to this size
CASES = [case for case in _bench.DEFAULT_CASES if np.prod(case[1]) * 4 > 1e6 and np.prod(case[1]) * 4 < 1e8]


def build(directory):
    """traffic_floor.c as a loaded shared library."""
    lib = pathlib.Path(directory) / "traffic_floor.so"
    subprocess.run(["cc", "-O2", "-mavx512f", "-fopenmp", "-shared", "-fPIC", "-o", str(lib),
                    str(HERE / "traffic_floor.c")], check=True)
    so = ctypes.CDLL(str(lib))
    p, n, i = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int
    so.floor_two_passes.argtypes = [p, p, p, n, i]
    so.floor_groups.argtypes = [p, p, p, n, n, n, i]
    so.floor_one_pass.argtypes = [p, p, p, n, i]
    for f in (so.floor_two_passes, so.floor_groups, so.floor_one_pass):
        f.restype = ctypes.c_float
    return so


def aligned(shape, rng):
    """float32 standard normal values in an array that starts on a 64-byte line."""
    n = int(np.prod(shape))
    raw = np.empty(n + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    a = raw[start:start + n].reshape(shape)
    a[...] = rng.standard_normal(shape, dtype=np.float32)
    return a


def fused_piece(shape, arrays, threads):
    """Values per row of a fused group of channels, as cbn._kernels.fused_group cuts them (row layouts)."""
    n, c, rest = shape[0], shape[1], int(np.prod(shape[2:]))
    group = min(max(FUSE_BYTES // (arrays * n * rest * 4), 1), c)
    if threads > 1:
        group = min(group, -(-c // threads))
    return group * rest


def floors(so, shape, axis, x, dy, out, threads):
    """{op: the C loop with the traffic of cbn's kernel for that op}."""
    n = x.size
    ptr = [a.ctypes.data for a in (x, dy, out)]
    if axis == 1 and len(shape) > 2:  # row layout: fused groups of channels, each from L2 the second time
        rows, row_len = shape[0], n // shape[0]
        train_piece, backward_piece = fused_piece(shape, 1, threads), fused_piece(shape, 2, threads)
        train = lambda: so.floor_groups(ptr[0], None, ptr[2], rows, row_len, train_piece, threads)  # noqa: E731
        backward = lambda: so.floor_groups(ptr[1], ptr[0], ptr[2], rows, row_len, backward_piece, threads)  # noqa: E731
    else:
        train = lambda: so.floor_two_passes(ptr[0], None, ptr[2], n, threads)  # noqa: E731
        backward = lambda: so.floor_two_passes(ptr[1], ptr[0], ptr[2], n, threads)  # noqa: E731
    return {"train": train, "infer": lambda: so.floor_one_pass(ptr[0], None, ptr[2], n, threads), "backward": backward}


def main(argv):
    if " avx512f" not in pathlib.Path("/proc/cpuinfo").read_text():
        sys.exit("traffic_floor: needs an x86-64 CPU with AVX-512 (Linux)")
    thread_counts = [int(t) for t in (argv[1] if len(argv) > 1 else "1,2").split(",")]
    repeat = int(argv[2]) if len(argv) > 2 else 15
    with tempfile.TemporaryDirectory() as tmp:
        so = build(tmp)
        print("case                   threads op        copy ms  floor ms  cbn ms  floor/copy  cbn/floor  cbn/copy")
        for threads in thread_counts:
            _bench._set_threads(threads)
            for name, shape, axis in CASES:
                rng = np.random.default_rng(0)
                x, dy, out, spare = (aligned(shape, rng) for _ in range(4))
                c = shape[axis]
                gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
                _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
                running = (mean.copy(), np.ones(c, np.float32))
                sums = (np.empty(c, np.float32), np.empty(c, np.float32))
                ops = {
                    "train": lambda: cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis, out=(out, *sums)),
                    "infer": lambda: cbn.batch_norm(x, gamma, beta, running_mean=running[0], running_var=running[1],
                                                    training=False, channel_axis=axis, out=out),
                    "backward": lambda: cbn.batch_norm_backward(dy, x, mean, invstd, gamma, channel_axis=axis,
                                                                out=(out, *sums)),
                }
                floor = floors(so, shape, axis, x, dy, out, threads)
                with _bench.concurrent.futures.ThreadPoolExecutor(threads) as pool:
                    copies = _bench._copies(x, spare, threads, pool)
                    for op, call in ops.items():
                        times = _bench._best_interleaved([*copies, floor[op], call], repeat)
                        copy, t_floor, t_cbn = min(times[:-2]), times[-2], times[-1]
                        print(f"{name:22s} {threads:7d} {op:8s} {copy * 1e3:8.3f} {t_floor * 1e3:9.3f} "
                              f"{t_cbn * 1e3:7.3f} {t_floor / copy:11.2f} {t_cbn / t_floor:10.2f} "
                              f"{t_cbn / copy:9.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
