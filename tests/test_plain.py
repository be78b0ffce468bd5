"""The plain-array entry points (cbn/_plain.pxi): the calls they take give the general path's bits,
and every call they do not take goes the general way.

The general path is forced by giving a per-channel argument as a list (it is
converted, so the entry points do not recognize it) or by a layout they do not
take; both paths must then agree bit for bit, outputs, running statistics and
in-place results included.
"""
import numpy as np
import pytest
from helpers import random_array

import cbn
from cbn import _kernels, reference

SHAPES = [((64, 128), 1), ((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1), ((3, 4, 2, 5), 2), ((7,), 0)]


def _data(shape, axis, dtype, channel_dtype=np.float64, seed=5):
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype, offset=3.0)
    dy = random_array(rng, shape, dtype)
    c = shape[axis]
    gamma = rng.uniform(0.5, 2.0, c).astype(channel_dtype)
    beta = rng.standard_normal(c).astype(channel_dtype)
    return x, dy, gamma, beta


def _same(fast, general):
    if isinstance(fast, tuple):
        assert len(fast) == len(general)
        for a, b in zip(fast, general):
            _same(a, b)
        return
    assert type(fast) is np.ndarray and fast.dtype == general.dtype and fast.shape == general.shape
    np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
@pytest.mark.parametrize("channel_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [s for s in SHAPES if len(s[0]) > 1])
def test_training_with_running_statistics(shape, axis, dtype, channel_dtype, activation):
    x, _, gamma, beta = _data(shape, axis, dtype, channel_dtype)
    c = shape[axis]
    runs = {}
    for path, g in (("fast", gamma), ("general", list(gamma))):
        rm = np.linspace(-1, 1, c).astype(channel_dtype)
        rv = np.linspace(0.5, 2, c).astype(channel_dtype)
        mean = np.empty(c)
        invstd = np.empty(c, np.float32)
        args = (x, g, beta)
        kw = dict(running_mean=rm, running_var=rv, momentum=0.3, channel_axis=axis, activation=activation)
        if path == "fast":
            assert _kernels.train_plain(*args, rm.copy(), rv.copy(), 0.3, 1e-5, axis, activation, 0.01, None,
                                        True) is not None
        y1 = cbn.batch_norm(*args, **kw)
        out = cbn.batch_norm_forward(*args, **kw, out=(None, mean, invstd))
        assert out[1] is mean and out[2] is invstd
        runs[path] = (y1, out[0], mean, invstd, rm, rv)
    _same(runs["fast"], runs["general"])


@pytest.mark.parametrize("activation", [None, "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("channel_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_inference_and_gradient(shape, axis, dtype, channel_dtype, activation):
    x, dy, gamma, beta = _data(shape, axis, dtype, channel_dtype)
    c = shape[axis]
    rm, rv = np.linspace(-1, 1, c).astype(channel_dtype), np.linspace(0.5, 2, c).astype(channel_dtype)
    act = dict(activation=activation, channel_axis=axis)
    assert _kernels.inference_plain(x, gamma, beta, rm, rv, 0.1, 1e-5, axis, activation, 0.01, None) is not None
    _same(cbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, **act),
          cbn.batch_norm(x, list(gamma), beta, running_mean=rm, running_var=rv, training=False, **act))
    if x.ndim < 2:
        return
    mean, invstd = (a.astype(channel_dtype) for a in cbn.batch_norm_forward(x, gamma, beta, **act)[1:])
    assert _kernels.backward_plain(dy, x, mean, invstd, gamma, beta, activation, 0.01, axis, None) is not None
    _same(cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **act),
          cbn.batch_norm_backward(dy, x, list(mean), invstd, gamma, beta, **act))
    _same(cbn.batch_norm_backward(dy, x, mean, invstd, **act),
          cbn.batch_norm_backward(dy, x, list(mean), invstd, **act))
    outs = (np.empty_like(x), np.empty(c, np.float64), np.empty(c, np.float32))
    got = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, out=outs, **act)
    assert all(a is b for a, b in zip(got, outs))
    want = cbn.batch_norm_backward(dy, x, list(mean), invstd, gamma, beta, out=tuple(np.empty_like(o) for o in outs),
                                   **act)
    _same(got, want)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_outputs(dtype, activation):
    """out=x (forward), dx into dy or x: the same bits as into a new array; dx into x with an activation
    (dz would overwrite x) goes the general way, through a temporary."""
    x, dy, gamma, beta = _data((16, 12, 9), 1, dtype)
    act = dict(activation=activation)
    y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, **act)
    xc = x.copy()
    assert cbn.batch_norm(xc, gamma, beta, out=xc, **act) is xc
    _same(xc, y)
    xc = x.copy()
    assert cbn.batch_norm(xc, gamma, beta, out=(xc,), **act) is xc
    _same(xc, y)
    rm, rv = np.zeros(12), np.ones(12)
    want = cbn.batch_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, **act)
    xc = x.copy()
    assert cbn.batch_norm(xc, gamma, beta, running_mean=rm, running_var=rv, training=False, out=xc, **act) is xc
    _same(xc, want)
    grads = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **act)
    for target in ("dy", "x"):
        dyc, xc = dy.copy(), x.copy()
        dest = dyc if target == "dy" else xc
        plain = _kernels.backward_plain(dyc.copy(), xc.copy(), mean, invstd, gamma, beta, activation, 0.01, 1,
                                        None)
        assert plain is not None
        got = cbn.batch_norm_backward(dyc, xc, mean, invstd, gamma, beta, out=(dest, None, None), **act)
        assert got[0] is dest
        _same(got, grads)


def test_overlapping_outputs_go_the_general_way():
    x, dy, gamma, beta = _data((6, 4, 5), 1, np.float64)
    y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta)
    grads = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta)
    buf = np.concatenate([x.ravel(), np.zeros(7)])
    xs, out = buf[:x.size].reshape(x.shape), buf[7:].reshape(x.shape)  # out shifted by 7 over x
    assert _kernels.train_plain(xs, gamma, beta, None, None, 0.1, 1e-5, 1, None, 0.01, out, False) is None
    assert cbn.batch_norm(xs, gamma, beta, out=out) is out
    _same(out, y)
    buf = np.concatenate([dy.ravel(), np.zeros(3)])
    dys, out = buf[3:].reshape(x.shape), buf[:x.size].reshape(x.shape)
    dys[...] = dy
    assert _kernels.backward_plain(dys, x, mean, invstd, gamma, beta, None, 0.01, 1, (out, None, None)) is None
    _same(cbn.batch_norm_backward(dys, x, mean, invstd, gamma, beta, out=(out, None, None)), grads)
    xc = x.copy()  # dx into x through an activation
    assert _kernels.backward_plain(dy, xc, mean, invstd, gamma, beta, "relu", 0.01, 1, (xc, None, None)) is None
    want = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, activation="relu")
    _same(cbn.batch_norm_backward(dy, xc, mean, invstd, gamma, beta, activation="relu", out=(xc, None, None)), want)


class _Sub(np.ndarray):
    pass


def _not_taken():
    """(name, x, kwargs) of calls the entry points leave to the general path, which takes them."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    c = 4
    return [
        ("Fortran order", np.asfortranarray(x), {}),
        ("strided", rng.standard_normal((6, 4, 10)).astype(np.float32)[:, :, ::2], {}),
        ("byte-swapped", x.astype(">f4"), {}),
        ("subclass", x.view(_Sub), {}),
        ("float16", x.astype(np.float16), {}),
        ("int momentum", x, dict(momentum=0)),
        ("int eps", x, dict(eps=0)),
        ("numpy float eps", x, dict(eps=np.float64(1e-5))),
        ("tuple axis", x, dict(channel_axis=(1,))),
        ("float16 gamma", x, dict(gamma=np.ones(c, np.float16))),
        ("strided gamma", x, dict(gamma=np.ones(2 * c)[::2])),
        ("int slope", x, dict(activation="leaky_relu", negative_slope=0)),
        ("float16 running", x, dict(running_mean=np.zeros(c, np.float16), running_var=np.ones(c, np.float16))),
    ]


@pytest.mark.parametrize("case", range(len(_not_taken())), ids=[c[0] for c in _not_taken()])
def test_calls_not_taken_match_the_reference(case):
    _, x, kw = _not_taken()[case]
    kw = dict(kw)
    gamma = kw.pop("gamma", None)
    axis = kw.get("channel_axis", 1)
    rm = kw.pop("running_mean", None)
    rv = kw.pop("running_var", None)
    args = (x, gamma, None, rm, rv, kw.get("momentum", 0.1), kw.get("eps", 1e-5), axis,
            kw.get("activation"), kw.get("negative_slope", 0.01), None, False)
    assert _kernels.train_plain(*args) is None
    rms = [None if r is None else r.copy() for r in (rm, rv)]
    got = cbn.batch_norm(x, gamma, running_mean=rm, running_var=rv, **kw)
    want = reference.batch_norm(np.asarray(x), gamma, running_mean=rms[0], running_var=rms[1], **kw)
    assert got.dtype == want.dtype.newbyteorder("=")  # results are native, as NumPy's
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-3, atol=2e-3)
    if rm is not None:
        np.testing.assert_allclose(rm.astype(np.float64), rms[0].astype(np.float64), rtol=2e-3)


@pytest.mark.parametrize("bad", [
    dict(eps=-1.0), dict(eps=float("nan")), dict(momentum=1.5), dict(channel_axis=3), dict(channel_axis=10**30),
    dict(activation="gelu"), dict(negative_slope=float("inf"), activation="leaky_relu"),
    dict(out=[None]), dict(out=(None, None)), dict(gamma=np.ones(5)), dict(gamma=np.ones((1, 4))),
    dict(running_mean=np.zeros(4)),
])
def test_bad_calls_are_left_to_the_general_path_which_raises(bad):
    x = np.random.default_rng(0).standard_normal((6, 4, 5))
    kw = dict(dict(gamma=None, running_mean=None, running_var=None, momentum=0.1, eps=1e-5, channel_axis=1,
                   activation=None, negative_slope=0.01, out=None), **bad)
    args = (x, kw["gamma"], None, kw["running_mean"], kw["running_var"], kw["momentum"], kw["eps"],
            kw["channel_axis"], kw["activation"], kw["negative_slope"], kw["out"])
    assert _kernels.train_plain(*args, False) is None
    assert _kernels.inference_plain(*args) is None
    with pytest.raises((TypeError, ValueError)):
        cbn.batch_norm(x, **{k: v for k, v in kw.items() if k != "gamma" or v is not None})


def test_read_only_outputs_go_the_general_way():
    x = np.random.default_rng(0).standard_normal((6, 4, 5))
    out = np.empty_like(x)
    out.flags.writeable = False
    assert _kernels.train_plain(x, None, None, None, None, 0.1, 1e-5, 1, None, 0.01, out, False) is None
    with pytest.raises(ValueError, match="read-only"):
        cbn.batch_norm(x, out=out)
    rm, rv = np.zeros(4), np.ones(4)
    rv.flags.writeable = False
    assert _kernels.train_plain(x, None, None, rm, rv, 0.1, 1e-5, 1, None, 0.01, None, False) is None
    with pytest.raises(ValueError, match="read-only"):
        cbn.batch_norm(x, running_mean=rm, running_var=rv)
    assert not rm.any()  # untouched by the failed call


def test_one_array_for_both_running_statistics_goes_the_general_way():
    """The general path updates running_mean, then running_var: the same array gets both, in that order."""
    x = np.random.default_rng(0).standard_normal((6, 4, 5))
    r = np.ones(4)
    assert _kernels.train_plain(x, None, None, r, r, 0.1, 1e-5, 1, None, 0.01, None, False) is None
    want = np.ones(4)
    reference.batch_norm(x, running_mean=want, running_var=want)
    cbn.batch_norm(x, running_mean=r, running_var=r)
    np.testing.assert_allclose(r, want, rtol=1e-12)
