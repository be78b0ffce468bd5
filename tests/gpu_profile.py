"""Where the GPU path's time goes (a diagnostic for tests/gpu_check.sh, not a test).

Prints each kernel's device time for the default benchmark cases (float32,
the split-channel kernels, with 16-byte vectors and with element accesses;
the one-block kernels where a channel fits one) and the host's per-call
profile of a small training forward and inference.
"""
import cProfile
import io
import pstats

import cupy
import numpy as np

import cbn
from cbn import _bench_gpu, _gpu
from cbn import _cuda_plan as plan
from cbn._bench import DEFAULT_CASES

F32 = np.dtype(np.float32)
timer = _bench_gpu._Timer(cupy, 7)


def us(func):
    return timer(func)[1] * 1e6


def kernel_times(x, axis, dtype=F32):
    layout = _gpu._Layout([x], (axis % x.ndim,))
    k = _gpu._launcher_for(dtype)
    view = layout.view
    none = _gpu._channels(None, None, False, 0.0, None, None, x)
    stats, _ = k.stats(x, view, 1e-5)
    ch = _gpu._channels(stats[0], stats[1], False, 0.0, None, None, x)
    y, dy, dx = cupy.empty_like(x), cupy.ones_like(x), cupy.empty_like(x)
    times = {}
    for label, vecs in (("", k.vecs), (" el", (1, 1))):  # 16-byte vectors, and element accesses (" el")
        k.vecs = vecs
        try:
            times["reduce0" + label] = us(lambda: k._reduce(0, x, x, none, view, (0, 0.0), 3))
            times["normalize" + label] = us(lambda: k.normalize(x, y, ch, view, (0, 0.0)))
            times["reduce1" + label] = us(lambda: k._reduce(1, x, dy, ch, view, (0, 0.0), 2))
        finally:
            k.vecs = (plan.VECTOR[dtype], plan.GRADIENT_VECTOR[dtype])
    # the split kernels against the one-block kernels, where a channel fits one block (SMALL_ARRAY's choice)
    saved = plan.one_block_per_channel
    for label, one_block in (("", False), (" 1blk", True)):
        if one_block and view[0] * view[2] > plan.CHANNEL_THREADS * plan.CHANNEL_VALUES[dtype]:
            continue
        plan.one_block_per_channel = lambda *args: one_block
        try:
            times["train" + label] = us(lambda: k.train(x, y, 1e-5, None, None, view, (0, 0.0)))
            times["backward" + label] = us(lambda: k.backward(dy, x, dx, ch, view, (0, 0.0)))
        finally:
            plan.one_block_per_channel = saved
    return times


rng = cupy.random.default_rng(0)
print("device us per kernel group (copy = device-to-device copy of x; el: the kernels with element\n"
      "accesses instead of 16-byte vectors; 1blk: the one-block kernels instead of the split ones)")
cases = [c for c in DEFAULT_CASES if np.prod(c[1]) * 4 < 100e6] + [("NCHW 64x64x14x14", (64, 64, 14, 14), 1)]
for name, shape, axis, dtype in [(*c, np.float32) for c in cases] + [(*c, np.float64) for c in cases[:6]]:
    x = rng.standard_normal(shape).astype(dtype)
    dst = cupy.empty_like(x)
    copy = us(lambda: dst.data.copy_from_device_async(x.data, x.nbytes))
    layout = _gpu._Layout([x], (axis % x.ndim,))
    print(f"{name:22} {np.dtype(dtype).name} copy {copy:6.1f}  "
          + "  ".join(f"{k} {v:6.1f}" for k, v in kernel_times(x, axis, np.dtype(dtype)).items()))


x = rng.standard_normal((64, 128), dtype=np.float32)
y = cupy.empty_like(x)
rm, rv = cupy.zeros(128), cupy.ones(128)
for label, call in [
    ("train", lambda: cbn.batch_norm_forward(x, out=(y, None, None))),
    ("infer", lambda: cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False, out=y)),
]:
    call()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        call()
    profile.disable()
    cupy.cuda.Device().synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
    print(f"host profile, 2000 x {label} 64x128 float32")
    print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
