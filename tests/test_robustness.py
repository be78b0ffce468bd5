"""Threads, fork, interrupted callers, 64-bit indexing and memory: cbn stays correct and usable."""
import _thread
import concurrent.futures
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import _kernels

BIG = (32, 16, 24, 24)  # 1.2 MB in float32: large enough for the parallel loops


def _calls(rng, n):
    """n (x, dy) pairs of several shapes and layouts, with the serial results of every function."""
    cases = []
    for i in range(n):
        shape, axis = [(BIG, 1), ((4096, 96), 1), ((16, 20, 20, 32), -1), ((7, 5, 3), (0, 2))][i % 4]
        x = (rng.standard_normal(shape) * (i + 1) + i).astype(np.float32 if i % 2 else np.float64)
        dy = rng.standard_normal(shape).astype(x.dtype)
        cases.append((x, dy, axis))
    return cases


def _run(x, dy, axis):
    y, mean, invstd = cbn.batch_norm_forward(x, channel_axis=axis, activation="tanh")
    grads = cbn.batch_norm_backward(dy, x, mean, invstd, channel_axis=axis, activation="tanh")
    return (y, mean, invstd, *grads, *cbn.batch_stats(x, channel_axis=axis))


def test_eight_python_threads_give_the_serial_bits(rng):
    cases = _calls(rng, 16)
    serial = [_run(*case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            threaded = list(pool.map(lambda case: _run(*case), cases))
            for got, want in zip(threaded, serial):
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)


def test_the_kernels_release_the_gil():
    # one long call (2**28 values through a zero-stride view: no memory): a thread that holds the GIL across it
    # would let the ticker run only before and after, a kernel that releases it lets it tick throughout
    base = np.arange(16, dtype=np.float32)
    x = np.lib.stride_tricks.as_strided(base, shape=(2**24, 1, 16), strides=(0, 0, 4), writeable=False)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        before = len(ticks)
        start = time.perf_counter()
        cbn.batch_stats(x)
        seconds = time.perf_counter() - start
        during = len(ticks) - before
    finally:
        stop.set()
        ticker.join()
    assert seconds > 0.02  # long enough to tell
    assert during >= 5, (during, seconds)


def _child_result(queue, x):
    queue.put((_kernels.in_forked_child(), float(cbn.batch_norm(x).astype(np.float64).sum()),
               cbn.batch_stats(x)[1].tolist()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_completes_after_the_parent_ran_threads():
    x = np.random.default_rng(1).standard_normal((64, 64, 32, 32)).astype(np.float32)
    expected = cbn.batch_stats(x)[1].tolist()  # the parent's OpenMP threads have run
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_result, args=(queue, x))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in cbn (OpenMP after fork)")
    in_child, total, variances = queue.get(timeout=10)
    assert in_child and not _kernels.in_forked_child()
    assert abs(total) < 1.0  # y has zero mean per channel
    assert variances == expected  # one thread gives the same bits


def test_an_exception_in_another_thread_leaves_cbn_working(rng):
    x = rng.standard_normal(BIG).astype(np.float32)
    expected = cbn.batch_norm(x)
    errors = []

    def bad_caller():
        try:
            cbn.batch_norm(x, eps=-1.0)
        except ValueError as exc:
            errors.append(exc)
        raise RuntimeError("a caller's thread dies")

    old_hook = threading.excepthook
    threading.excepthook = lambda args: None  # the deliberate RuntimeError is not a test failure
    try:
        threads = [threading.Thread(target=bad_caller) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(3):
            np.testing.assert_array_equal(cbn.batch_norm(x), expected)
        for t in threads:
            t.join()
    finally:
        threading.excepthook = old_hook
    assert len(errors) == 4
    np.testing.assert_array_equal(cbn.batch_norm(x), expected)


def test_a_keyboard_interrupt_between_calls_leaves_cbn_working(rng):
    x = rng.standard_normal(BIG).astype(np.float32)
    expected = cbn.batch_norm_forward(x)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever ran before
    try:
        # what is tested is cbn after a Ctrl-C; one CI run (2026-11-28) saw the Ctrl-C not arrive at all, so
        # up to 3 tries, each a new Ctrl-C while the main thread is busy in cbn (no stray one left behind)
        for _ in range(3):
            timer = threading.Timer(0.05, _thread.interrupt_main)
            timer.start()
            try:
                for _ in range(100_000):
                    cbn.batch_norm_forward(x)
            except KeyboardInterrupt:
                break
            finally:
                timer.join()
        else:
            pytest.fail("no Ctrl-C arrived in 3 tries")
    finally:
        signal.signal(signal.SIGINT, old_handler)
    for got, want in zip(cbn.batch_norm_forward(x), expected):
        np.testing.assert_array_equal(got, want)


def test_more_than_2_31_values_in_one_channel_use_64_bit_indexing():
    # 3 distinct values repeated through a zero-stride axis: 2**31 + 21 values per channel, no memory
    base = np.array([1.0, 2.0, 6.0], dtype=np.float32)
    rows = 2**31 // 3 + 7
    x = np.lib.stride_tricks.as_strided(base, shape=(rows, 1, 3), strides=(0, 0, 4), writeable=False)
    assert x.size > 2**31
    mean, var = cbn.batch_stats(x, channel_axis=1)
    np.testing.assert_allclose(mean, [3.0], rtol=1e-7)
    np.testing.assert_allclose(var, [14.0 / 3.0], rtol=1e-7)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mixed_calls(rng, n):
    x = rng.standard_normal((8, 4, 5)).astype(np.float32)
    dy = rng.standard_normal((8, 4, 5)).astype(np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = np.empty_like(x)
    for i in range(n):
        kind = i % 6
        if kind == 0:
            _, mean, invstd = cbn.batch_norm_forward(x, running_mean=rm, running_var=rv, out=(y, None, None))
        elif kind == 1:
            cbn.batch_norm_backward(dy, x, mean, invstd, activation="sigmoid")
        elif kind == 2:
            cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False, activation="relu")
        elif kind == 3:
            cbn.batch_stats(x.astype(np.float16), channel_axis=(1, 2))
        else:  # error paths
            with pytest.raises((ValueError, TypeError)):
                cbn.batch_norm(x, np.ones(3) if kind == 4 else None, eps=-1.0 if kind == 5 else 1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
@pytest.mark.skipif(bool(os.environ.get("CBN_SANITIZED")), reason="ASan's quarantine holds freed memory")
def test_memory_stays_flat_over_100000_mixed_calls(rng):
    _mixed_calls(rng, 20_000)  # warm-up: caches and the allocator's arenas settle
    gc.collect()
    tracemalloc.start()  # Python-level allocations (NumPy's buffers included), on a short stretch: it is slow
    try:
        _mixed_calls(rng, 3_000)
        gc.collect()
        traced_before, _ = tracemalloc.get_traced_memory()
        _mixed_calls(rng, 3_000)
        gc.collect()
        traced_after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert traced_after - traced_before < 16 * 1024
    _mixed_calls(rng, 34_000)
    gc.collect()
    rss_before = _rss_bytes()
    _mixed_calls(rng, 40_000)  # native memory too: a leak of 26 bytes per call would show
    gc.collect()
    assert _rss_bytes() - rss_before < 2**20


def test_nan_and_inf_stay_in_their_channel_and_through_every_activation():
    x = np.random.default_rng(3).standard_normal((6, 3, 4))
    x[2, 1, 3] = np.nan
    x[4, 2, 0] = np.inf
    rm, rv = np.zeros(3), np.ones(3)
    for activation in (None, "relu", "leaky_relu", "sigmoid", "tanh"):
        y = cbn.batch_norm(x, activation=activation)
        assert np.isfinite(y[:, 0]).all() and np.isnan(y[:, 1:]).all()  # training: the channel's statistics
        y = cbn.batch_norm(x, running_mean=rm, running_var=rv, training=False, activation=activation)
        assert np.isnan(y[2, 1, 3])  # inference: only the element itself
        assert np.isfinite(np.delete(y.reshape(-1), [2 * 12 + 1 * 4 + 3, 4 * 12 + 2 * 4])).all()


# --------------------------------------------------------------------------
# Adversarial numbers, forward and gradient, against float64 on the same inputs


def _reference64(x, dy, gamma, eps=1e-5):
    """The float64 reference of forward and backward on x's own values."""
    from cbn import reference

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y, mean, invstd = reference.batch_norm_forward(x64, gamma, eps=eps)
    return y, reference.batch_norm_backward(dy64, x64, mean, invstd, gamma)


@pytest.mark.parametrize("case", ["offset 1e4", "scale 1e30", "scale 1e-30", "tiny variance, eps 1e-12"])
def test_forward_and_gradient_stay_accurate_on_adversarial_float32(case, rng):
    shape, eps = (16, 3, 9, 9), 1e-5
    base = rng.standard_normal(shape)
    x = {"offset 1e4": 1e4 + base, "scale 1e30": 1e30 * base, "scale 1e-30": 1e-30 * base,
         "tiny variance, eps 1e-12": 1.0 + 1e-3 * base}[case].astype(np.float32)
    if case.startswith("tiny"):
        eps = 1e-12
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = np.array([0.5, 1.0, 2.0])
    # float64 statistics (out=), as a float32 mean near 1e4 is off by up to half an ulp (5e-4 of sigma) and the
    # gradient at a rounded mean is off by as much (the same holds for PyTorch's saved statistics)
    mean, invstd = np.empty(3), np.empty(3)
    y, _, _ = cbn.batch_norm_forward(x, gamma, eps=eps, out=(None, mean, invstd))
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, invstd, gamma)
    y_ref, (dx_ref, dgamma_ref, dbeta_ref) = _reference64(x, dy, gamma, eps)
    assert np.isfinite(mean).all() and np.isfinite(invstd).all()
    np.testing.assert_allclose(y, y_ref, atol=2e-5 * np.abs(y_ref).max())
    unit = invstd.max()  # dx scales with invstd (1e30 and 1e-30 here): compare in its unit
    np.testing.assert_allclose(dx / unit, dx_ref / unit, atol=5e-5 * np.abs(dx_ref / unit).max())
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-4, atol=1e-4 * np.abs(dgamma_ref).max())
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5 * np.abs(dbeta_ref).max())


def test_float16_results_beyond_its_range_are_inf_as_numpy_casts(rng):
    x = rng.standard_normal((64, 2, 8)).astype(np.float16)
    gamma = np.array([1.0, 3e4])  # the second channel's y exceeds float16's 65504
    with pytest.warns(RuntimeWarning, match="overflow"):  # as NumPy warns when a cast overflows
        y = cbn.batch_norm(x, gamma)
    y_ref = cbn.reference.batch_norm(x.astype(np.float64), gamma)
    with np.errstate(over="ignore"):
        expected = y_ref.astype(np.float16)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(np.isinf(y), np.isinf(expected))
    assert np.isinf(y[:, 1]).any() and np.isfinite(y[:, 0]).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(y[finite].astype(np.float64), expected[finite].astype(np.float64), rtol=2e-3)
