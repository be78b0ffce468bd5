"""``python -m cbn bench --device gpu``: cbn on CuPy arrays against a device copy and PyTorch (cuDNN).

Two times per call, from CUDA events, best of N after a warm-up:

* call: a loop of calls (about a millisecond's worth), host work included:
  what a Python loop pays per call, launch and argument checks included;
* device: the same loop queued behind a spinning kernel, so that the host has
  launched every call before the device starts: the device's own time for the
  call's kernels, which is what the copy floor is compared with.

The floor is a device-to-device copy of the same bytes (``cudaMemcpyAsync``);
PyTorch runs ``torch.nn.functional.batch_norm`` on CUDA tensors (cuDNN where it
applies) and its autograd backward.
"""
import math
import sys
import time

import numpy as np

import cbn

OPS = ("train", "infer", "backward")
_SPIN = r"""
extern "C" __global__ void cbn_bench_spin(long long cycles)
{
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}
"""


class _Timer:
    def __init__(self, cupy, repeat):
        self.cupy = cupy
        self.repeat = repeat
        self.spin = cupy.RawKernel(_SPIN, "cbn_bench_spin")
        start, end = cupy.cuda.Event(), cupy.cuda.Event()  # calibration: the time of 1e7 cycles
        self.spin((1,), (1,), (np.int64(1e6),))  # warm-up (compiles)
        start.record()
        self.spin((1,), (1,), (np.int64(1e7),))
        end.record()
        end.synchronize()
        self.cycles_per_s = 1e7 / (cupy.cuda.get_elapsed_time(start, end) * 1e-3)

    def _loop(self, func, n, spin_s=0.0):
        cupy = self.cupy
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        if spin_s:
            self.spin((1,), (1,), (np.int64(spin_s * self.cycles_per_s),))
        start.record()
        host = time.perf_counter()
        for _ in range(n):
            func()
        host = time.perf_counter() - host
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) * 1e-3 / n, host

    def __call__(self, func):
        """(call, device) seconds per call, each the best of ``repeat`` loops."""
        func()  # warm-up (and first-use compilation)
        self.cupy.cuda.Device().synchronize()
        once, _ = self._loop(func, 1)
        n = max(1, min(100, math.ceil(1e-3 / max(once, 1e-7))))
        call = min(self._loop(func, n)[0] for _ in range(self.repeat))
        device = math.inf
        spin_s = 2e-3 + 2 * n * call
        for _ in range(self.repeat):
            t, host = self._loop(func, n, spin_s)
            if host > 0.5 * spin_s:  # the device may have caught up with the host: spin longer, measure again
                spin_s *= 4
                continue
            device = min(device, t)
        return call, (device if device < math.inf else call)  # a host that never got ahead: call is the bound


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
    _, copy = best(lambda: dst.data.copy_from_device_async(x.data, x.nbytes))
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
    records = []
    for op in OPS:
        cbn_call, cbn_device = best(calls[op])
        torch_call, torch_device = best(torch_calls[op]) if torch_calls else (None, None)
        records.append({
            "case": name, "shape": list(shape), "channel_axis": axis, "dtype": np.dtype(dtype).name, "op": op,
            "bytes": x.nbytes, "copy_s": copy, "cbn_s": cbn_device, "cbn_call_s": cbn_call,
            "torch_s": torch_device, "torch_call_s": torch_call,
        })
    return records


def run(cases, dtypes, repeat, progress=True):
    import cupy

    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None
    best = _Timer(cupy, repeat)
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
    """The table: device times (us) against the copy and PyTorch, then per-call times with the host's work."""
    header = (f"{'case':22} {'dtype':7} {'op':8} {'copy':>7} {'cbn':>7} {'cbn/copy':>8} {'torch':>7} {'torch/cbn':>9}"
              f" | {'cbn call':>8} {'torch call':>10}")
    print("device time per call in us (host work hidden); call: per call in a Python loop, host included", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in records:
        torch_us = f"{r['torch_s'] * 1e6:7.1f}" if r["torch_s"] else "      -"
        ratio = f"{r['torch_s'] / r['cbn_s']:9.2f}" if r["torch_s"] else "        -"
        torch_call = f"{r['torch_call_s'] * 1e6:10.1f}" if r["torch_call_s"] else "         -"
        print(f"{r['case']:22} {r['dtype']:7} {r['op']:8} {r['copy_s'] * 1e6:7.1f} {r['cbn_s'] * 1e6:7.1f}"
              f" {r['cbn_s'] / r['copy_s']:8.2f} {torch_us} {ratio} | {r['cbn_call_s'] * 1e6:8.1f} {torch_call}",
              file=out)
    print(file=out)
    for dtype in sorted({r["dtype"] for r in records}):
        rows = [r for r in records if r["dtype"] == dtype]
        worst = {op: max(r["cbn_s"] / r["copy_s"] for r in rows if r["op"] == op and r["bytes"] >= 1e6)
                 for op in OPS}
        line = f"{dtype}: worst cbn/copy (>= 1 MB) " + ", ".join(f"{op} {v:.2f}" for op, v in worst.items())
        speedups = [r["torch_s"] / r["cbn_s"] for r in rows if r["torch_s"]]
        if speedups:
            geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
            line += f"; torch/cbn (device) geometric mean {geo:.2f}, min {min(speedups):.2f}"
        print(line, file=out)
