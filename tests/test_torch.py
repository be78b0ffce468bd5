"""An independent oracle: PyTorch's F.batch_norm and its autograd gradients.

Golden vectors (tests/data/golden_torch.npz, made by tests/data/make_golden.py)
always run; when torch is importable, random cases are compared live as well.
"""
import pathlib

import numpy as np
import pytest

import cbn

GOLDEN = np.load(pathlib.Path(__file__).parent / "data" / "golden_torch.npz")
CASES = sorted({key.split("/")[0] for key in GOLDEN.files if "/" in key})

# float32 results from two float32 implementations: a few ulps of |y| ~ 4;
# the offset case (x about 1000) carries PyTorch's own float32 variance error.
RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def _tolerances(case, dtype):
    rtol = RTOL[np.dtype(dtype).type]
    return (rtol * 50, rtol * 50) if case.startswith("offset") else (rtol, rtol)


def _compare_training(case, data, got):
    y, mean, invstd, rm, rv, dx, dgamma, dbeta = got
    rtol, atol = _tolerances(case, data["x"].dtype)
    np.testing.assert_allclose(y, data["y"], rtol=rtol, atol=atol * 4)
    np.testing.assert_allclose(mean, data["save_mean"], rtol=rtol)
    np.testing.assert_allclose(invstd, data["save_invstd"], rtol=rtol)
    np.testing.assert_allclose(rm, data["running_mean"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(rv, data["running_var"], rtol=rtol, atol=atol)
    scale = np.abs(data["dx"]).max()
    np.testing.assert_allclose(dx, data["dx"], rtol=rtol * 10, atol=atol * 10 * scale)
    np.testing.assert_allclose(dgamma, data["dweight"], rtol=rtol * 10, atol=atol * 10 * np.abs(data["dweight"]).max())
    np.testing.assert_allclose(dbeta, data["dbias"], rtol=rtol * 10, atol=atol * 10 * np.abs(data["dbias"]).max())


def _run_cbn(data):
    x, w, b = data["x"], data["weight"], data["bias"]
    rm, rv = data["running_mean_before"].copy(), data["running_var_before"].copy()
    y, mean, invstd = cbn.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv)
    dx, dgamma, dbeta = cbn.batch_norm_backward(data["dy"], x, mean, invstd, w)
    return y, mean, invstd, rm, rv, dx, dgamma, dbeta


@pytest.mark.parametrize("case", CASES)
def test_matches_pytorch_golden_vectors(case):
    data = {key.split("/", 1)[1]: GOLDEN[key] for key in GOLDEN.files if key.startswith(case + "/")}
    _compare_training(case, data, _run_cbn(data))
    y_eval = cbn.batch_norm(
        data["x"], data["weight"], data["bias"],
        running_mean=data["running_mean_before"], running_var=data["running_var_before"], training=False,
    )
    rtol, atol = _tolerances(case, data["x"].dtype)
    np.testing.assert_allclose(y_eval, data["y_eval"], rtol=rtol, atol=atol * np.abs(data["y_eval"]).max())


@pytest.mark.parametrize("shape", [(32, 7), (5, 4, 9), (3, 6, 5, 7), (2, 3, 4, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_pytorch_live(shape, dtype, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    c = shape[1]
    data = {
        "x": rng.normal(2.0, 3.0, shape).astype(dtype),
        "weight": rng.uniform(0.5, 2.0, c).astype(dtype),
        "bias": rng.normal(size=c).astype(dtype),
        "dy": rng.normal(size=shape).astype(dtype),
        "running_mean_before": rng.normal(size=c).astype(dtype),
        "running_var_before": rng.uniform(0.5, 2.0, c).astype(dtype),
    }
    tx = torch.tensor(data["x"], requires_grad=True)
    tw = torch.tensor(data["weight"], requires_grad=True)
    tb = torch.tensor(data["bias"], requires_grad=True)
    trm, trv = torch.tensor(data["running_mean_before"]), torch.tensor(data["running_var_before"])
    y = F.batch_norm(tx, trm, trv, tw, tb, training=True)
    y.backward(torch.tensor(data["dy"]))
    _, mean, invstd = torch.ops.aten.native_batch_norm(torch.tensor(data["x"]), None, None, None, None, True, 0.1, 1e-5)
    data.update(
        y=y.detach().numpy(), save_mean=mean.numpy(), save_invstd=invstd.numpy(),
        running_mean=trm.numpy(), running_var=trv.numpy(),
        dx=tx.grad.numpy(), dweight=tw.grad.numpy(), dbias=tb.grad.numpy(),
    )
    _compare_training("live", data, _run_cbn(data))


def test_channels_last_matches_pytorch_on_moved_axis(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)  # NHWC
    want = torch.nn.functional.batch_norm(torch.tensor(x).permute(0, 3, 1, 2), None, None, training=True)
    got = cbn.batch_norm(x, channel_axis=-1)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=2e-5, atol=2e-5)


def test_one_value_per_channel_fails_like_pytorch():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.functional.batch_norm(torch.ones(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        cbn.batch_norm(np.ones((1, 3)))
