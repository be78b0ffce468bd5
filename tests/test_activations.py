"""Fused activations: forward, gradient through them, against the reference and finite differences."""
import numpy as np
import pytest
from helpers import assert_close, exp_activation_errors, make_layout, numerical_gradient, random_array

import cbn
from cbn import reference

ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape, axis, layout",
    [((6, 4, 5, 3), 1, "C"), ((6, 4, 5, 3), -1, "C"), ((6, 4, 5, 3), 1, "F"), ((200, 3), 1, "strided"),
     ((4, 3, 300, 301), 1, "C"), ((3001, 70), 1, "C"), ((2103, 1100), 1, "C")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_activation_matches_reference(shape, axis, layout, dtype, activation):
    rng = np.random.default_rng(5)
    x = make_layout(random_array(rng, shape, dtype, offset=1.0, scale=2.0), layout)
    dy = make_layout(random_array(rng, shape, dtype), layout)
    c = shape[axis]
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    kw = dict(channel_axis=axis, activation=activation, negative_slope=0.2)
    y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, **kw)
    y_ref, _, _ = reference.batch_norm_forward(x, gamma, beta, **kw)
    assert_close(y, y_ref, dtype, scale=4.0)
    assert_close(cbn.batch_norm(x, gamma, beta, **kw), y_ref, dtype, scale=4.0)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    eval_kw = dict(running_mean=rm, running_var=rv, training=False, **kw)
    assert_close(cbn.batch_norm(x, gamma, beta, **eval_kw), reference.batch_norm(x, gamma, beta, **eval_kw), dtype,
                 scale=8.0)
    got = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **kw)
    want = reference.batch_norm_backward(dy, x, mean, invstd, gamma, beta, **kw)
    for g, w in zip(got, want):
        assert_close(g, w, dtype, scale=float(np.max(np.abs(w))))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, axis", [((5, 3, 4), 1), ((4, 3, 2), -1)])
def test_gradient_through_activation_matches_finite_differences(shape, axis, activation):
    rng = np.random.default_rng(6)
    axes = (axis % len(shape),)
    c = shape[axes[0]]
    x = rng.normal(0.5, 2.0, shape)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    weights = rng.normal(size=shape)
    kw = dict(channel_axis=axis, activation=activation, negative_slope=0.2)

    def loss():
        return float(np.sum(weights * cbn.batch_norm(x, gamma, beta, **kw)))

    _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, **kw)
    dx, dgamma, dbeta = cbn.batch_norm_backward(weights, x, mean, invstd, gamma, beta, **kw)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, numerical_gradient(loss, gamma), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, numerical_gradient(loss, beta), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_matches_pytorch(activation):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 3, 5, 5))
    gamma, beta, dy = rng.uniform(0.5, 2.0, 3), rng.normal(size=3), rng.normal(size=x.shape)
    act = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "sigmoid": torch.sigmoid,
           "tanh": torch.tanh}[activation]
    tx = torch.tensor(x, requires_grad=True)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    ty = act(F.batch_norm(tx, None, None, tg, tb, training=True))
    ty.backward(torch.tensor(dy))
    y, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, activation=activation, negative_slope=0.2)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, activation=activation,
                                                negative_slope=0.2)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-9)


def test_layer_with_activation_trains_like_the_functions():
    rng = np.random.default_rng(8)
    x, dy = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    layer = cbn.BatchNorm(4, activation="tanh", dtype=np.float64)
    y = layer(x)
    np.testing.assert_allclose(y, reference.batch_norm(x, activation="tanh"), rtol=1e-12)
    _, mean, invstd = reference.batch_norm_forward(x)
    want = reference.batch_norm_backward(dy, x, mean, invstd, activation="tanh")
    np.testing.assert_allclose(layer.backward(dy), want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, want[1], rtol=1e-10, atol=1e-12)


def test_bad_activation_arguments():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="activation must be one of"):
        cbn.batch_norm(x, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        cbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), activation=3)
    with pytest.raises(ValueError, match="negative_slope"):
        cbn.batch_norm_forward(x, activation="leaky_relu", negative_slope=float("nan"))
    with pytest.raises(ValueError, match="activation must be one of"):
        cbn.BatchNorm(3, activation="swish")
    with pytest.raises(ValueError, match="beta must have shape"):
        cbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), None, np.zeros(2), activation="relu")


@pytest.mark.parametrize("target", ["dy", "x", "new"])
def test_gradient_through_activation_in_place(target):
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(7, 3, 4)), rng.normal(size=(7, 3, 4))
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.normal(size=3)
    _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, activation="relu")
    want = cbn.batch_norm_backward(dy.copy(), x.copy(), mean, invstd, gamma, beta, activation="relu")
    out = {"dy": dy, "x": x, "new": np.empty_like(x)}[target]
    got = cbn.batch_norm_backward(dy, x, mean, invstd, gamma, beta, activation="relu", out=(out, None, None))
    assert got[0] is out
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("shape, axis", [((4, 3, 40), 1), ((50, 3), 1), ((4, 40, 3), -1), ((3, 4, 1000), 1)])
def test_non_finite_dy_where_the_activation_is_flat(shape, axis, activation):
    """dy * act'(z) as in the reference: an inf in dy where z <= 0 is inf * 0 = NaN (not dropped)."""
    rng = np.random.default_rng(11)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    moved = np.moveaxis(x, axis, -1)
    spot = np.unravel_index(np.argmin(moved[..., 1]), moved.shape[:-1]) + (1,)  # channel 1's lowest value: z < 0
    np.moveaxis(dy, axis, -1)[spot] = np.inf
    kw = dict(channel_axis=axis, activation=activation, negative_slope=0.2)
    _, mean, invstd = reference.batch_norm_forward(x, **kw)
    with np.errstate(invalid="ignore"):
        want = reference.batch_norm_backward(dy, x, mean, invstd, **kw)
        got = cbn.batch_norm_backward(dy, x, mean, invstd, **kw)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=1e-9, atol=1e-12)
    assert np.isnan(np.take(got[0], 1, axis=axis)).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_tanh_accuracy_over_the_exponential_range(dtype):
    """cbn's own exponential (src_c/cbn_loops.h), sampled densely over the range where its result is
    a normal number: sigmoid within 4 ulp of itself, tanh within 2 ulp of 1 (it is 1 - 2 / (exp(2 z) + 1))."""
    if dtype == np.float64 and np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("no extended precision for a float64 reference")
    eps = 2.0**-10  # running_var + eps is exactly 1: the pre-activation is z itself
    kw = dict(running_mean=np.zeros(1), running_var=np.array([1 - eps]), eps=eps, training=False)
    sigmoid_max, _, tanh_max = exp_activation_errors(
        lambda z, act: cbn.batch_norm(z[:, None], activation=act, **kw)[:, 0], dtype)
    assert sigmoid_max <= 4
    assert tanh_max <= 2
