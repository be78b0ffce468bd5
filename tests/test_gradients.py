"""batch_norm_backward against central finite differences of the forward (float64)."""
import numpy as np
import pytest
from helpers import numerical_gradient

import cbn


@pytest.mark.parametrize(
    "shape, axis",
    [((4, 3), 1), ((3, 2, 5), 1), ((3, 4, 2), -1), ((2, 3, 2, 3), (1, 3)), ((5, 2, 1, 3), 1)],
)
def test_backward_matches_finite_differences(shape, axis, rng):
    axes = axis if isinstance(axis, tuple) else (axis,)
    cshape = tuple(shape[a] for a in axes)
    x = rng.normal(1.0, 2.0, shape)
    gamma = rng.uniform(0.5, 2.0, cshape)
    beta = rng.standard_normal(cshape)
    weights = rng.standard_normal(shape)  # loss = sum(weights * y), so dL/dy = weights

    def loss():
        return float(np.sum(weights * cbn.batch_norm(x, gamma, beta, channel_axis=axis)))

    _, mean, invstd = cbn.batch_norm_forward(x, gamma, beta, channel_axis=axis)
    dx, dgamma, dbeta = cbn.batch_norm_backward(weights, x, mean, invstd, gamma, channel_axis=axis)

    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, numerical_gradient(loss, gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, numerical_gradient(loss, beta), rtol=1e-6, atol=1e-7)


def test_gradient_without_gamma_is_the_unit_scale_gradient(rng):
    x = rng.standard_normal((6, 3, 4))
    dy = rng.standard_normal((6, 3, 4))
    _, mean, invstd = cbn.batch_norm_forward(x)
    with_none = cbn.batch_norm_backward(dy, x, mean, invstd)
    with_ones = cbn.batch_norm_backward(dy, x, mean, invstd, np.ones(3))
    for a, b in zip(with_none, with_ones):
        np.testing.assert_array_equal(a, b)
