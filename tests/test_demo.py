"""The demo network: gradients by finite differences, and batch norm's effect."""
import io

import numpy as np
import pytest
from helpers import numerical_gradient

from cbn import _demo


@pytest.mark.parametrize("batch_norm", [False, True])
def test_network_gradient_matches_finite_differences(batch_norm):
    rng = np.random.default_rng(0)
    net = _demo.MLP((5, 4, 4, 3), rng, batch_norm=batch_norm)
    if batch_norm:  # non-trivial scale and shift
        for norm in net.norms:
            norm.weight[...] = rng.uniform(0.5, 2.0, norm.weight.shape)
            norm.bias[...] = rng.normal(size=norm.bias.shape)
    x = rng.normal(size=(6, 5))
    labels = rng.integers(0, 3, 6)

    def loss():
        for norm in net.norms:  # keep the running statistics out of the comparison
            if norm is not None:
                norm.running_mean[...] = 0.0
                norm.running_var[...] = 1.0
        return _demo.cross_entropy(net.forward(x), labels)[0]

    loss()
    _, dlogits = _demo.cross_entropy(net.forward(x), labels)
    grads = net.backward(dlogits)
    params = net.parameters()
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g, numerical_gradient(loss, p), rtol=1e-5, atol=1e-8)


def test_batch_norm_trains_faster_and_runs_are_reproducible():
    pytest.importorskip("sklearn")
    first = _demo.run(epochs=4, seed=0, rates=(1.0,), progress=False, out=io.StringIO())
    with_bn, without = _demo.steps_to(first[1.0, True]), _demo.steps_to(first[1.0, False])
    assert with_bn is not None
    assert without is None or with_bn < without
    again = _demo.run(epochs=4, seed=0, rates=(1.0,), progress=False, out=io.StringIO())
    for key in first:
        assert first[key]["accuracy"] == again[key]["accuracy"]
        np.testing.assert_array_equal(first[key]["percentiles"], again[key]["percentiles"])


def test_demo_command_writes_the_figure(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    _demo.main(["--epochs", "2", "--out", str(tmp_path)])
    assert (tmp_path / "cbn_demo.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "steps to 90% test accuracy" in printed
