"""Outputs written with non-temporal stores (src_c/cbn_stream.h) are the same bits as plain stores.

Large outputs go through an L1 buffer and out with streaming stores, in chunks
that end on cache-line boundaries; rows that follow each other in memory are
one run, cut into chunks across rows.
`_kernels.stream_bytes` sets the size from which that happens; here it is
forced to 0 (stream everything) and -1 (never) on small arrays, so that every
chunking case is compared bitwise: runs shorter and longer than the buffer,
misaligned outputs, in-place outputs, activations, 1 and 2 threads.
"""
import contextlib

import numpy as np
import pytest
from helpers import assert_close, make_layout, random_array

import cbn
from cbn import _kernels, reference
from cbn._machine import cpu_vendor, l3_bytes, parse_size, stream_threshold

# (shape, channel axis): row mode with runs of 784 B and of 8 KB (chunks
# across and within runs), column mode with short rows and rows longer than
# the buffer, channel tiles narrower than a row (rows not contiguous: each
# its own run), whole rows in a tile (2048 rows or more: one run, row starts
# inside the chunks, where the buffer is shifted), runs below the streaming
# minimum
CASES = [
    ((3, 16, 14, 14), 1),
    ((2, 5, 47, 47), 1),
    ((4, 3, 300, 301), 1),
    ((50, 7, 9, 64), -1),
    ((37, 3000), 1),
    ((9, 300, 70), -1),
    ((2050, 300), 1),
    ((40, 30, 5), 1),
]
ACTIVATIONS = [None, "relu", "leaky_relu", "tanh"]


@contextlib.contextmanager
def streaming(nbytes):
    before = _kernels.stream_bytes()
    _kernels.stream_bytes(nbytes)
    try:
        yield
    finally:
        _kernels.stream_bytes(before)


def _run_all(x, dy, axis, activation, out_offset):
    """Every elementwise output cbn writes, for one input; outputs land in buffers that start
    out_offset elements past a 64-byte boundary, so lines are split differently."""
    cshape = x.shape[axis]
    gamma = np.linspace(0.5, 2.0, cshape).astype(x.dtype)
    beta = np.linspace(-1.0, 1.0, cshape).astype(x.dtype)

    def out_like():
        raw = np.empty(x.size + 64, x.dtype)
        skip = (-raw.ctypes.data % 64) // x.itemsize + out_offset
        return raw[skip:skip + x.size].reshape(x.shape)

    y = out_like()
    y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis, activation=activation,
                                             out=(y, None, None))
    running_mean, running_var = mean.copy(), (1.0 / invstd**2).astype(x.dtype)
    y_eval = cbn.batch_norm(x, gamma, beta, running_mean=running_mean, running_var=running_var,
                            training=False, channel_axis=axis, activation=activation, out=out_like())
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, channel_axis=axis,
                                                activation=activation, out=(out_like(), None, None))
    in_place = x.copy()
    cbn.batch_norm_forward(in_place, gamma, beta, channel_axis=axis, activation=activation,
                           out=(in_place, None, None))
    return y, mean, invstd, y_eval, dx, dgamma, dbeta, in_place


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-axis{c[1]}")
def test_streamed_outputs_are_the_same_bits(case, dtype, activation):
    shape, axis = case
    rng = np.random.default_rng(11)
    x = random_array(rng, shape, dtype, offset=3.0, scale=2.0)
    dy = random_array(rng, shape, dtype)
    with streaming(-1):
        want = _run_all(x, dy, axis, activation, out_offset=0)
    for offset in (0, 1, 3):
        with streaming(0):
            got = _run_all(x, dy, axis, activation, out_offset=offset)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["F", "strided", "transposed"])
def test_streamed_outputs_in_other_layouts_and_threads(layout, threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(5)
    shape, axis = (6, 9, 40, 41), 1
    x = make_layout(random_array(rng, shape, np.float32, offset=100.0), layout)
    dy = make_layout(random_array(rng, shape, np.float32), layout)
    with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
        with streaming(-1):
            want = _run_all(x, dy, axis, "relu", out_offset=0)
        with streaming(0):
            got = _run_all(x, dy, axis, "relu", out_offset=2)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_a_large_array_streams_correctly_at_intels_threshold():
    """An 8 MB array above Intel's threshold (4 MiB) streams: checked against the reference."""
    rng = np.random.default_rng(2)
    x = random_array(rng, (8, 16, 128, 128), np.float32, offset=50.0)
    dy = random_array(rng, x.shape, np.float32)
    with streaming(stream_threshold("GenuineIntel", None)):
        assert _kernels.stream_bytes() <= x.nbytes
        y, mean, invstd = cbn.batch_norm_forward(x)
        dx, _, _ = cbn.batch_norm_backward(dy, x, mean, invstd)
    y_ref, _, _ = reference.batch_norm_forward(x)
    assert_close(y, y_ref, np.float32, scale=4.0)
    dx_ref, _, _ = reference.batch_norm_backward(dy, x, mean, invstd)
    assert_close(dx, dx_ref, np.float32, scale=float(np.max(np.abs(dx_ref))))


def test_stream_threshold_follows_the_cpu():
    """4 MiB, or on AMD CPUs above half the L3 (whose plain stores stay fast until the arrays outgrow it)."""
    assert stream_threshold("GenuineIntel", 320 << 20) == 4 << 20
    assert stream_threshold("", None) == 4 << 20
    assert stream_threshold("AuthenticAMD", 32 << 20) == (16 << 20) + 1
    assert stream_threshold("AuthenticAMD", 4 << 20) == 4 << 20
    assert stream_threshold("AuthenticAMD", None) == 4 << 20
    assert parse_size("32768K\n") == 32 << 20 and parse_size("2M") == 2 << 20 and parse_size("512") == 512
    assert cpu_vendor() == "" or cpu_vendor().isalnum()
    assert l3_bytes() is None or l3_bytes() > 0


@pytest.mark.parametrize("size, said", [(4 << 20, "4 MiB and more"), ((16 << 20) + 1, "more than 16 MiB"),
                                         (123, "123 bytes and more"), (-1, "off")])
def test_cbn_info_says_the_streaming_size(size, said, capsys):
    if not _kernels.has_stream_stores():
        pytest.skip("this build has no non-temporal stores")
    with streaming(size):
        cbn.show_config()
    prefix = "" if size < 0 else "non-temporal stores for outputs of "
    assert f"streaming:       {prefix}{said}" in capsys.readouterr().out


def test_stream_bytes_setting():
    before = _kernels.stream_bytes()
    try:
        assert _kernels.stream_bytes(123) == 123 and _kernels.stream_bytes() == 123
        assert _kernels.stream_bytes(-1) == -1
        with pytest.raises(ValueError, match="nbytes"):
            _kernels.stream_bytes(-5)
        assert _kernels.stream_bytes() == -1
    finally:
        _kernels.stream_bytes(before)


def test_streaming_is_built_where_it_is_supported():
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert _kernels.has_stream_stores()
