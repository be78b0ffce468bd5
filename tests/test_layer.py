"""cbn.BatchNorm: PyTorch's layer semantics, state and gradients."""
import numpy as np
import pytest
from helpers import numerical_gradient

import cbn
from cbn import reference


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_training_steps_match_pytorch(shape, momentum):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    ours = cbn.BatchNorm(3, momentum=momentum, dtype=np.float64)
    theirs = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(3, momentum=momentum).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        theirs.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    for step in range(3):
        x = rng.normal(2.0, 3.0, shape)
        dy = rng.normal(size=shape)
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(dy))
        y = ours(x)
        dx = ours.backward(dy)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), rtol=1e-10)
        theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-12, err_msg=key)

    # eval mode: running statistics, and a backward with them held constant
    theirs.eval()
    ours.eval()
    x = rng.normal(2.0, 3.0, shape)
    dy = rng.normal(size=shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(ours(x), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), rtol=1e-10)


def test_pytorch_state_loads_and_gives_the_same_outputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    theirs = torch.nn.BatchNorm2d(4)
    for _ in range(3):  # give it non-trivial running statistics
        theirs(torch.tensor(rng.normal(1.0, 2.0, (8, 4, 3, 3)).astype(np.float32)))
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(rng.uniform(0.5, 2.0, 4)))
        theirs.bias.copy_(torch.tensor(rng.normal(size=4)))
    theirs.eval()
    ours = cbn.BatchNorm(4).load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()}).eval()
    assert ours.num_batches_tracked == 3
    x = rng.normal(1.0, 2.0, (5, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "channel_axis, shape, features", [(1, (5, 3, 4), 3), (-1, (5, 4, 3), 3), ((2, 1), (5, 3, 4), (4, 3))]
)
def test_layer_matches_the_functions(channel_axis, shape, features):
    rng = np.random.default_rng(2)
    layer = cbn.BatchNorm(features, channel_axis=channel_axis, dtype=np.float64)
    layer.weight[...] = rng.uniform(0.5, 2.0, layer.channel_shape)
    layer.bias[...] = rng.normal(size=layer.channel_shape)
    rm, rv = np.zeros(layer.channel_shape), np.ones(layer.channel_shape)
    for _ in range(2):
        x = rng.normal(1.0, 2.0, shape)
        want = reference.batch_norm(
            x, layer.weight, layer.bias, running_mean=rm, running_var=rv, channel_axis=channel_axis
        )
        np.testing.assert_allclose(layer(x), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-12)
    assert layer.num_batches_tracked == 2
    layer.eval()
    x = rng.normal(1.0, 2.0, shape)
    want = reference.batch_norm(
        x, layer.weight, layer.bias, running_mean=rm, running_var=rv, training=False, channel_axis=channel_axis
    )
    np.testing.assert_allclose(layer(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channel_axis, shape, features", [(1, (4, 3, 2), 3), ((2, 1), (3, 2, 4), (4, 2))])
def test_eval_backward_matches_finite_differences(channel_axis, shape, features):
    rng = np.random.default_rng(3)
    layer = cbn.BatchNorm(features, channel_axis=channel_axis, dtype=np.float64)
    layer.load_state_dict({
        "weight": rng.uniform(0.5, 2.0, layer.channel_shape),
        "bias": rng.normal(size=layer.channel_shape),
        "running_mean": rng.normal(size=layer.channel_shape),
        "running_var": rng.uniform(0.5, 2.0, layer.channel_shape),
        "num_batches_tracked": np.array(5),
    }).eval()
    x = rng.normal(size=shape)
    w = rng.normal(size=shape)

    def loss():
        return float(np.sum(w * layer(x)))

    layer(x)
    dx = layer.backward(w)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    grad_weight = layer.grad_weight.copy()
    np.testing.assert_allclose(grad_weight, numerical_gradient(loss, layer.weight), rtol=1e-6, atol=1e-8)


def test_without_affine_or_running_stats():
    x = np.random.default_rng(4).normal(3.0, 2.0, (10, 3)).astype(np.float32)
    layer = cbn.BatchNorm(3, affine=False, track_running_stats=False)
    assert layer.weight is None and layer.running_mean is None
    assert set(layer.state_dict()) == set()
    for mode in (True, False):  # batch statistics in both modes
        layer.train(mode)
        np.testing.assert_allclose(layer(x), cbn.batch_norm(x), rtol=1e-6, atol=1e-6)
    layer.backward(np.ones_like(x))
    assert layer.grad_weight is None and layer.grad_bias is None


def test_layer_errors():
    with pytest.raises(TypeError, match="num_features"):
        cbn.BatchNorm(3.0)
    with pytest.raises(ValueError, match="num_features must be positive"):
        cbn.BatchNorm(0)
    with pytest.raises(ValueError, match="does not match channel_axis"):
        cbn.BatchNorm(3, channel_axis=(1, 2))
    with pytest.raises(ValueError, match="momentum"):
        cbn.BatchNorm(3, momentum=2.0)
    with pytest.raises(TypeError, match="dtype"):
        cbn.BatchNorm(3, dtype=np.int32)
    layer = cbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, 3)))
    with pytest.raises(KeyError, match="missing"):
        layer.load_state_dict({"weight": np.ones(3)})
    state = layer.state_dict()
    state["running_var"] = np.ones(4)
    with pytest.raises(ValueError, match="running_var must have shape"):
        layer.load_state_dict(state)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        layer(np.ones((1, 3)))
    assert layer.num_batches_tracked == 0  # a failed call changes nothing (PyTorch would count it)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
