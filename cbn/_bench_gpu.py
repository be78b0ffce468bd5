"""``python -m cbn bench --device gpu``: cbn on CuPy arrays against a device copy and PyTorch (cuDNN).

Times come from CUDA events around a loop of calls (enough calls to fill about
a millisecond, so that small cases measure the per-call cost, host work
included), best of N after a warm-up.  The floor is a device-to-device copy
of the same bytes (``cudaMemcpyAsync``); PyTorch runs
``torch.nn.functional.batch_norm`` on CUDA tensors (cuDNN where it applies)
and its autograd backward.
"""
import math
import sys

import numpy as np

import cbn

OPS = ("train", "infer", "backward")


def _timer(cupy, repeat):
    def best(func):
        func()  # warm-up (and first-use compilation)
        cupy.cuda.Device().synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        func()
        end.record()
        end.synchronize()
        once = cupy.cuda.get_elapsed_time(start, end) * 1e-3
        inner = max(1, min(1000, math.ceil(1e-3 / max(once, 1e-7))))
        times = []
        for _ in range(repeat):
            start.record()
            for _ in range(inner):
                func()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / inner)
        return min(times)

    return best


def _torch_calls(torch, x, axis, dy):
    """PyTorch's batch norm on the same device memory (channels_last for a last channel axis)."""
    tx = torch.as_tensor(x, device="cuda")
    tdy = torch.as_tensor(dy, device="cuda")
    if axis != 1:
        order = (0, x.ndim - 1, *range(1, x.ndim - 1))
        tx, tdy = tx.permute(order), tdy.permute(order)
    c = tx.shape[1]
    w = torch.ones(c, device="cuda", dtype=tx.dtype, requires_grad=True)
    b = torch.zeros(c, device="cuda", dtype=tx.dtype, requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda", dtype=tx.dtype), torch.ones(c, device="cuda", dtype=tx.dtype)
    F = torch.nn.functional
    tx_grad = tx.detach().requires_grad_(True)
    y = F.batch_norm(tx_grad, None, None, w, b, training=True, momentum=0.1, eps=1e-5)

    def train():
        with torch.no_grad():
            F.batch_norm(tx, None, None, w, b, training=True, momentum=0.1, eps=1e-5)

    def infer():
        with torch.no_grad():
            F.batch_norm(tx, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5)

    def backward():
        torch.autograd.grad(y, (tx_grad, w, b), tdy, retain_graph=True)

    return {"train": train, "infer": infer, "backward": backward}


def _time_case(cupy, torch, best, rng, name, shape, axis, dtype):
    """Records of one case: train, infer and backward, each with the copy floor and PyTorch."""
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    dst = cupy.empty_like(x)
    copy = best(lambda: dst.data.copy_from_device_async(x.data, x.nbytes))
    c = shape[axis]
    gamma, beta = cupy.ones(c), cupy.zeros(c)
    rm, rv = cupy.zeros(c), cupy.ones(c)
    y, dx = cupy.empty_like(x), cupy.empty_like(x)
    _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    calls = {
        "train": lambda: cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis, out=(y, None, None)),
        "infer": lambda: cbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False,
                                        channel_axis=axis, out=y),
        "backward": lambda: cbn.batch_norm_backward(dy, x, mean, invstd, gamma, channel_axis=axis,
                                                    out=(dx, None, None)),
    }
    torch_calls = None
    if torch is not None:
        try:
            torch_calls = _torch_calls(torch, x, axis, dy)
        except Exception as exc:  # report, keep timing cbn
            print(f"\ntorch unavailable for {name}: {exc}", file=sys.stderr)
    return [
        {
            "case": name, "shape": list(shape), "channel_axis": axis, "dtype": np.dtype(dtype).name, "op": op,
            "bytes": x.nbytes, "copy_s": copy, "cbn_s": best(calls[op]),
            "torch_s": best(torch_calls[op]) if torch_calls else None,
        }
        for op in OPS
    ]


def run(cases, dtypes, repeat, progress=True):
    import cupy

    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    best = _timer(cupy, repeat)
    records = []
    jobs = [(c, d) for c in cases for d in dtypes]
    rng = cupy.random.default_rng(0)
    for k, ((name, shape, axis), dtype) in enumerate(jobs, 1):
        if progress:
            print(f"\r[{k}/{len(jobs)}] {name} {np.dtype(dtype).name}   ", end="", file=sys.stderr, flush=True)
        records += _time_case(cupy, torch, best, rng, name, shape, axis, dtype)
        cupy.get_default_memory_pool().free_all_blocks()
    if progress:
        print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
    return records


def report(records, out=sys.stdout):
    header = (f"{'case':22} {'dtype':7} {'op':8} {'copy ms':>8} {'cbn ms':>8} {'cbn/copy':>8} {'torch ms':>8}"
              f" {'torch/cbn':>9}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in records:
        torch_ms = f"{r['torch_s'] * 1e3:8.3f}" if r["torch_s"] else "       -"
        ratio = f"{r['torch_s'] / r['cbn_s']:9.2f}" if r["torch_s"] else "        -"
        print(f"{r['case']:22} {r['dtype']:7} {r['op']:8} {r['copy_s'] * 1e3:8.3f} {r['cbn_s'] * 1e3:8.3f}"
              f" {r['cbn_s'] / r['copy_s']:8.2f} {torch_ms} {ratio}", file=out)
    print(file=out)
    for dtype in sorted({r["dtype"] for r in records}):
        rows = [r for r in records if r["dtype"] == dtype]
        worst = {op: max(r["cbn_s"] / r["copy_s"] for r in rows if r["op"] == op and r["bytes"] >= 1e6)
                 for op in OPS}
        line = f"{dtype}: worst cbn/copy (>= 1 MB) " + ", ".join(f"{op} {v:.2f}" for op, v in worst.items())
        speedups = [r["torch_s"] / r["cbn_s"] for r in rows if r["torch_s"]]
        if speedups:
            geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
            line += f"; torch/cbn geometric mean {geo:.2f}, min {min(speedups):.2f}"
        print(line, file=out)
