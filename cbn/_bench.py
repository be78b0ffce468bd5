"""``python -m cbn bench``: cbn against a copy of the same bytes, PyTorch and the reference.

Everything is timed in one process, best of N after a warm-up, at one thread
count at a time (OpenMP for cbn through threadpoolctl-compatible
``omp_set_num_threads``, ``torch.set_num_threads`` for PyTorch).  The floor is
a copy of the same bytes at the same thread count: the faster of one
``np.copyto`` and the array split into one ``np.copyto`` per thread, run from
that many Python threads.  For each operation the copies, cbn and PyTorch take
turns, so that the machine's drift hits every timing of a ratio alike.  Ratios,
not absolute times, are the result: the machine may be shared and noisy.
"""
import argparse
import concurrent.futures
import json
import math
import sys
import time

import numpy as np

import cbn
from cbn import _kernels

# name, shape, channel_axis
DEFAULT_CASES = [
    ("NCHW 32x64x56x56", (32, 64, 56, 56), 1),
    ("NCHW 64x256x14x14", (64, 256, 14, 14), 1),
    ("NC 4096x1024", (4096, 1024), 1),
    ("NHWC 32x56x56x64", (32, 56, 56, 64), -1),
    ("NCDHW 8x32x16x32x32", (8, 32, 16, 32, 32), 1),
    ("NCHW 32x256x56x56", (32, 256, 56, 56), 1),  # >= 100 MB in float32
    ("NC 64x128", (64, 128), 1),
    ("NCHW 16x32x8x8", (16, 32, 8, 8), 1),
]
LARGE_BYTES = 100e6
OPS = ("train", "infer", "backward")


def _set_threads(n):
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(n, user_api="openmp")
        # idle BLAS worker threads spinning would steal cores from the timings
        threadpoolctl.threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        pass
    if _kernels.max_threads() != n and cbn.show_config(mode="dicts")["openmp"]:
        raise RuntimeError("could not set the OpenMP thread count; install threadpoolctl")


def _best(func, repeat, warmup=1):
    """Best wall time of ``repeat`` calls after ``warmup`` calls, in seconds."""
    for _ in range(warmup):
        func()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def _best_interleaved(funcs, repeat):
    """Best wall time of each function, the functions taking turns, so that drift hits them alike.

    The order rotates from one round to the next: a small array's call right
    after another function's (a copy that evicted it from L1, say) is slower
    than one right after its own, and every function gets every place."""
    for func in funcs:
        func()
    best = [math.inf] * len(funcs)
    n = len(funcs)
    for r in range(max(repeat, n)):
        for i in (*range(r % n, n), *range(r % n)):
            start = time.perf_counter()
            funcs[i]()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _copies(src, dst, threads, pool):
    """The floor's candidates: one np.copyto, and (threads > 1) one np.copyto per thread."""
    funcs = [lambda: np.copyto(dst, src)]
    if threads > 1:
        flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
        bounds = np.linspace(0, flat_src.size, threads + 1).astype(int)
        pieces = [(flat_dst[a:b], flat_src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        funcs.append(lambda: list(pool.map(lambda p: np.copyto(*p), pieces)))
    return funcs


class _Torch:
    """PyTorch CPU through aten's batch-norm ops, or None when not importable."""

    def __init__(self):
        import torch

        self.torch = torch
        self.version = torch.__version__

    def prepare(self, x, channel_axis, dy):
        torch = self.torch
        tx = torch.from_numpy(x)
        tdy = torch.from_numpy(dy)
        if channel_axis != 1:  # PyTorch's channel is dim 1: channels_last memory format
            order = (0, x.ndim - 1, *range(1, x.ndim - 1))
            tx, tdy = tx.permute(order), tdy.permute(order)
        c = tx.shape[1]
        w, b = torch.ones(c, dtype=tx.dtype), torch.zeros(c, dtype=tx.dtype)
        rm, rv = torch.zeros(c, dtype=tx.dtype), torch.ones(c, dtype=tx.dtype)
        _, mean, invstd = torch.ops.aten.native_batch_norm(tx, w, b, None, None, True, 0.1, 1e-5)
        aten = torch.ops.aten
        mask = [True, True, True]
        return {
            "train": lambda: aten.native_batch_norm(tx, w, b, None, None, True, 0.1, 1e-5),
            "infer": lambda: aten.native_batch_norm(tx, w, b, rm, rv, False, 0.1, 1e-5),
            "backward": lambda: aten.native_batch_norm_backward(
                tdy, tx, w, None, None, mean, invstd, True, 1e-5, mask
            ),
        }

    def set_threads(self, n):
        self.torch.set_num_threads(n)


def _cbn_calls(x, channel_axis, dy, module, activation=None):
    cshape = (x.shape[channel_axis],)
    gamma, beta = np.ones(cshape), np.zeros(cshape)
    rm, rv = np.zeros(cshape), np.ones(cshape)
    y, dx = np.empty_like(x), np.empty_like(x)
    kw = dict(channel_axis=channel_axis)
    if activation is not None:
        kw["activation"] = activation
    _, mean, invstd = module.batch_norm_forward(x, gamma, beta, **kw)
    grad_args = (gamma,) if activation is None else (gamma, beta)
    return {
        "train": lambda: module.batch_norm_forward(x, gamma, beta, out=(y, None, None), **kw),
        "infer": lambda: module.batch_norm(
            x, gamma, beta, running_mean=rm, running_var=rv, training=False, out=y, **kw
        ),
        "backward": lambda: module.batch_norm_backward(dy, x, mean, invstd, *grad_args, out=(dx, None, None), **kw),
    }


def run(cases, dtypes, threads, repeat, with_reference=True, progress=True, activation=None):
    """Time every case; returns a list of records (dicts).

    With an ``activation``, cbn runs with it fused, ``plain_s`` times cbn
    without it, and PyTorch (which has no fused activation) is left out.
    """
    try:
        torch = _Torch() if activation is None else None
    except ImportError:
        torch = None
    pool = concurrent.futures.ThreadPoolExecutor(max(threads))
    jobs = [(c, d, t) for c in cases for d in dtypes for t in threads]
    records = []
    rng = np.random.default_rng(0)
    for k, ((name, shape, axis), dtype, n) in enumerate(jobs, 1):
        if progress:
            label = f"{name} {np.dtype(dtype).name} {n} thread(s)"
            print(f"\r[{k}/{len(jobs)}] {label}   ", end="", file=sys.stderr, flush=True)
        x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        _set_threads(n)
        big = x.nbytes >= LARGE_BYTES
        reps = max(3, repeat // 2) if big else repeat
        copies = _copies(x, np.empty_like(x), n, pool)
        calls = _cbn_calls(x, axis, dy, cbn, activation)
        plain_calls = _cbn_calls(x, axis, dy, cbn) if activation is not None else None
        ref_calls = _cbn_calls(x, axis, dy, cbn.reference, activation) if with_reference and not big else None
        torch_calls = None
        if torch is not None:
            torch.set_threads(n)
            torch_calls = torch.prepare(x, axis, dy)
        for op in OPS:
            # the copies, cbn, PyTorch and cbn without the activation take turns, so that drift of
            # this shared machine's speed hits every timing of a ratio alike
            others = [f[op] for f in (torch_calls, plain_calls) if f]
            times = _best_interleaved([*copies, calls[op], *others], reps)
            copy, cbn_s = min(times[: len(copies)]), times[len(copies)]
            others_s = iter(times[len(copies) + 1 :])
            torch_s = next(others_s) if torch_calls else None
            plain_s = next(others_s) if plain_calls else None
            record = {
                "case": name, "shape": list(shape), "channel_axis": axis, "dtype": np.dtype(dtype).name,
                "threads": n, "op": op, "bytes": x.nbytes, "copy_s": copy,
                "cbn_s": cbn_s,
                "torch_s": torch_s,
                "reference_s": _best(ref_calls[op], 2, warmup=0) if ref_calls else None,
                "activation": activation,
                "plain_s": plain_s,
            }
            records.append(record)
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    pool.shutdown()
    return records


def _ratio(a, b):
    return f"{a / b:6.2f}" if a is not None and b is not None else "     -"


def report(records, out=sys.stdout):
    """Print the table and the geometric means of torch/cbn."""
    with_plain = any(r.get("plain_s") for r in records)
    header = (f"{'case':22} {'dtype':7} {'thr':>3} {'op':8} {'copy ms':>8} {'cbn ms':>8} {'cbn/copy':>8}"
              f" {'torch ms':>8} {'torch/cbn':>9} {'ref/cbn':>7}" + (f" {'act/plain':>9}" if with_plain else ""))
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in records:
        torch_ms = f"{r['torch_s'] * 1e3:8.3f}" if r["torch_s"] else "       -"
        print(f"{r['case']:22} {r['dtype']:7} {r['threads']:>3} {r['op']:8} {r['copy_s'] * 1e3:8.3f}"
              f" {r['cbn_s'] * 1e3:8.3f} {_ratio(r['cbn_s'], r['copy_s']):>8} {torch_ms}"
              f" {_ratio(r['torch_s'], r['cbn_s']):>9} {_ratio(r['reference_s'], r['cbn_s']):>7}"
              + (f" {_ratio(r['cbn_s'], r.get('plain_s')):>9}" if with_plain else ""), file=out)
    groups = sorted({(r["dtype"], r["threads"]) for r in records})
    print(file=out)
    for dtype, n in groups:
        rows = [r for r in records if r["dtype"] == dtype and r["threads"] == n]
        speedups = [r["torch_s"] / r["cbn_s"] for r in rows if r["torch_s"]]
        worst = {op: max(r["cbn_s"] / r["copy_s"] for r in rows if r["op"] == op) for op in OPS}
        line = f"{dtype} {n} thread(s): worst cbn/copy " + ", ".join(f"{op} {v:.2f}" for op, v in worst.items())
        if speedups:
            geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
            line += f"; torch/cbn geometric mean {geo:.2f}, min {min(speedups):.2f}"
        print(line, file=out)


def sweep_cases(sizes=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8)):
    """(name, shape, axis) with about n elements: N x 16 channels x 64 values."""
    return [(f"sweep {n:.0e}", (max(1, round(n / 1024)), 16, 64), 1) for n in sizes]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cbn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--dtype", default="float32,float64", help="comma-separated dtypes")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no >= 100 MB case")
    parser.add_argument("--sweep", action="store_true", help="time a size sweep (1e3 to 1e8 elements) instead")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (best is kept)")
    parser.add_argument("--activation", choices=["relu", "leaky_relu", "sigmoid", "tanh"],
                        help="time cbn with this fused activation against cbn without it")
    parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: cbn on CuPy arrays, timed with CUDA events against a device copy and cuDNN")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        return _main_gpu(args)

    most = _kernels.max_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, most})
    dtypes = [np.dtype(d).type for d in args.dtype.split(",")]
    cases = sweep_cases() if args.sweep else list(DEFAULT_CASES)
    if args.quick:
        cases = [c for c in cases if np.prod(c[1]) * 8 < LARGE_BYTES]
    repeat = args.repeat or (3 if args.quick else 9)

    info = cbn.show_config(mode="dicts")
    print(f"cbn {info['cbn']} (OpenMP {'on' if info['openmp'] else 'off'}), NumPy {info['numpy']}, "
          f"Python {info['python']}, {info['cpu']}, best of {repeat}")
    records = run(cases, dtypes, threads, repeat, with_reference=not args.sweep, activation=args.activation)
    report(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": info, "records": records}, f, indent=1)


def _main_gpu(args):
    from . import _bench_gpu

    info = cbn.show_config(mode="dicts")
    if not info["gpu"].startswith("CuPy"):
        raise SystemExit(f"no GPU benchmark: the GPU path is {info['gpu']}")
    dtypes = [np.dtype(d).type for d in args.dtype.split(",")]
    cases = list(DEFAULT_CASES)
    if args.quick:
        cases = [c for c in cases if np.prod(c[1]) * 8 < LARGE_BYTES]
    repeat = args.repeat or (5 if args.quick else 15)
    print(f"cbn {info['cbn']} on {info['gpu']}, best of {repeat}")
    records = _bench_gpu.run(cases, dtypes, repeat)
    _bench_gpu.report(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": info, "records": records}, f, indent=1)
