"""Regenerate tests/data/golden_torch.npz: PyTorch's batch norm as an oracle.

    pip install torch==2.13.0 && python tests/data/make_golden.py

For each case: the inputs, F.batch_norm's output (training and eval), the
running statistics after one training step, aten's saved mean and invstd,
and the autograd gradients of sum(dy * y) with respect to x, weight, bias.
"""
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

CASES = {
    "nchw_f32": ((4, 3, 5, 5), np.float32),
    "nc_f64": ((16, 5), np.float64),
    "ncdhw_f32": ((2, 3, 2, 3, 4), np.float32),
    "offset_f32": ((8, 2, 4, 4), np.float32),
}


def make_case(shape, dtype, rng, offset):
    c = shape[1]
    x = (offset + rng.normal(0.0, 2.0, shape)).astype(dtype)
    weight = rng.uniform(0.5, 2.0, c).astype(dtype)
    bias = rng.normal(0.0, 1.0, c).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    running_mean = rng.normal(0.0, 1.0, c).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, c).astype(dtype)

    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True)
    tb = torch.tensor(bias, requires_grad=True)
    trm, trv = torch.tensor(running_mean), torch.tensor(running_var)
    y = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.1, eps=1e-5)
    y.backward(torch.tensor(dy))
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        torch.tensor(x), tw.detach(), tb.detach(), None, None, True, 0.1, 1e-5
    )
    y_eval = F.batch_norm(
        torch.tensor(x), torch.tensor(running_mean), torch.tensor(running_var), tw.detach(), tb.detach(), training=False
    )
    return {
        "x": x, "weight": weight, "bias": bias, "dy": dy,
        "running_mean_before": running_mean, "running_var_before": running_var,
        "y": y.detach().numpy(), "running_mean": trm.numpy(), "running_var": trv.numpy(),
        "save_mean": save_mean.numpy(), "save_invstd": save_invstd.numpy(), "y_eval": y_eval.numpy(),
        "dx": tx.grad.numpy(), "dweight": tw.grad.numpy(), "dbias": tb.grad.numpy(),
    }


def main():
    rng = np.random.default_rng(2015)
    arrays = {"torch_version": np.array(torch.__version__)}
    for name, (shape, dtype) in CASES.items():
        offset = 1000.0 if name.startswith("offset") else 1.0
        for key, value in make_case(shape, dtype, rng, offset).items():
            arrays[f"{name}/{key}"] = value
    path = pathlib.Path(__file__).with_name("golden_torch.npz")
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes) with torch {torch.__version__}")


if __name__ == "__main__":
    main()
