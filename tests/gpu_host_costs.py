"""What one call of the GPU path costs the host, piece by piece (a diagnostic, not a test).

cbn's per-call time from Python is 2-4x PyTorch's on small arrays (BENCHMARKS.md,
GPU): the host, not the GPU, sets it.  This times, per call in a plain loop
(float32 NC 64x128), the CuPy operations cbn's launcher uses and the whole
public calls, so that the next change to the launcher knows where the
microseconds go.  Run on the device machine after installing cbn:
``python tests/gpu_host_costs.py``.
"""
import time

import cupy
import numpy as np

import cbn
from cbn import _gpu


def per_call_us(func, calls=2000, repeat=5):
    """Best over ``repeat`` loops of the mean host time per call, in microseconds (GPU synchronized after)."""
    func()
    cupy.cuda.Device().synchronize()
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            func()
        cupy.cuda.Device().synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main():
    x = cupy.random.standard_normal((64, 128), dtype=np.float32)
    y = cupy.empty_like(x)
    stats = cupy.empty((3, 128), dtype=np.float64)
    mean, var = cupy.zeros(128), cupy.ones(128)
    launcher = _gpu._launcher_for(np.dtype(np.float32))
    view = (64, 128, 1)
    channels = _gpu._channels(mean, var, True, 1e-5, None, None, x)
    labels = ("out[0] (y)", "out[1] (mean)", "out[2] (invstd)")
    stats_w = cupy.empty((3, 128), dtype=np.float32)
    train_kernel = launcher.kernels[f"cbn_train_channel<{launcher.t}, {launcher.vals}>"]
    train_args = (x, y, *_gpu._channels(None, None, False, 1e-5, None, None, x), *_gpu._i64(*view), np.int32(0),
                  np.float64(0.0), stats, stats_w)

    def device_context():
        with x.device:
            pass

    rows = [
        ("cupy.empty((3, 128))", lambda: cupy.empty((3, 128), dtype=np.float64)),
        ("with x.device: pass", device_context),
        ("cupy.cuda.runtime.getDevice()", cupy.cuda.runtime.getDevice),
        ("x.reshape(64, 128, 1)", lambda: x.reshape(64, 128, 1)),
        ("stats[0]", lambda: stats[0]),
        ("stats[0].astype(float32)", lambda: stats[0].astype(np.float32)),
        ("_gpu._channels(...)", lambda: _gpu._channels(mean, var, True, 1e-5, None, None, x)),
        ("_gpu._Layout([x], (1,))", lambda: _gpu._Layout([x], (1,))),
        ("one launch: normalize kernel", lambda: launcher.normalize(x, y, channels, view, (0, 0.0))),
        ("one launch: train kernel", lambda: launcher.train(x, y, 1e-5, None, None, view, (0, 0.0))),
        ("  of which the bare launch", lambda: train_kernel((128,), (512,), train_args)),
        ("_gpu.train_forward", lambda: _gpu.train_forward(x, None, None, None, None, 0.1, 1e-5, 1, (0, 0.0),
                                                          (None, None, None), labels)),
        ("cbn.batch_norm (inference)", lambda: cbn.batch_norm(x, running_mean=mean, running_var=var,
                                                               training=False)),
        ("cbn.batch_norm_forward", lambda: cbn.batch_norm_forward(x)),
    ]
    try:
        import torch

        tx = torch.as_tensor(x, device="cuda")
        rows += [
            ("torch F.batch_norm training", lambda: torch.nn.functional.batch_norm(tx, None, None, training=True)),
            ("torch tensor.reshape", lambda: tx.reshape(64, 128, 1)),
        ]
    except ImportError:
        pass
    print(f"host us per call, float32 NC 64x128, {_gpu.device_info()[1]}")
    for label, func in rows:
        print(f"{label:36} {per_call_us(func):8.2f}")


if __name__ == "__main__":
    main()
