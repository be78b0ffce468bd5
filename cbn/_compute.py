"""Drive the kernels over the views of ``cbn._layout``: statistics, forward, gradient.

Arguments arrive checked (``cbn._api``); per-channel arrays are float64.
Layouts that split a channel over several blocks are handled here, merging
block statistics in a fixed order.
"""
import numpy as np

from . import _kernels
from ._layout import plan


def chan_merge(n, mean, m2, n_b, mean_b, m2_b):
    """Merge block statistics (n_b, mean_b, m2_b) into (n, mean, m2), in place."""
    total = n + n_b
    delta = mean_b - mean
    mean += delta * (n_b / total)
    m2 += m2_b + delta * delta * (n * n_b / total)
    return total


def channel_stats(x, axes, cshape):
    """Per-channel float64 mean and M2 (sum of squared deviations from the mean)."""
    layout = plan([x], axes)
    mean = np.zeros(layout.channel_grid)
    m2 = np.zeros(layout.channel_grid)
    if layout.reduced_blocks == 1:
        for c, (xb,) in layout.blocks():
            _kernels.channel_stats(xb, mean[c], m2[c])
    else:  # one channel's values in several blocks: merge in block order
        counts = {}
        block_mean, block_m2 = np.empty(layout.channel_grid[-1]), np.empty(layout.channel_grid[-1])
        for c, (xb,) in layout.blocks():
            _kernels.channel_stats(xb, block_mean, block_m2)
            counts[c] = chan_merge(counts.get(c, 0), mean[c], m2[c], xb.shape[0] * xb.shape[2], block_mean, block_m2)
    return mean.reshape(cshape), m2.reshape(cshape)


KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the kernels take (native byte order)
NO_PARAMETER = np.empty(0)  # gamma or beta left out: the kernels use 1 and 0


def _block(values, grid, c):
    """Per-channel ``values`` (or None) as the kernels take them for channel block c."""
    return NO_PARAMETER if values is None else values.reshape(grid)[c]


def inference(x, y, axes, mean, var, gamma, beta, eps, act=(0, 0.0)):
    """y = act((x - mean) / sqrt(var + eps) * gamma + beta) with float64 running statistics."""
    if x.size == 0:
        return
    layout = plan([x, y], axes)
    grid = layout.channel_grid
    for c, (xb, yb) in layout.blocks():
        _kernels.inference(
            xb, yb, _block(mean, grid, c), _block(var, grid, c), _block(gamma, grid, c), _block(beta, grid, c), eps,
            *act,
        )


def per_block(rows, grid):
    """Per-channel rows for the kernels: shape (*grid[:-1], n, C), C-contiguous per block."""
    return np.ascontiguousarray(np.moveaxis(np.reshape(rows, (len(rows), *grid)), 0, -2))


def from_blocks(per, cshape):
    """Inverse of per_block: (n, *cshape)."""
    if per.ndim == 2 and len(cshape) == 1:
        return per
    return np.moveaxis(per, -2, 0).reshape((per.shape[-2], *cshape))


def train(x, y, axes, cshape, count, gamma, beta, eps, act=(0, 0.0)):
    """Training forward into y (activation ``act``: code, slope); returns float64 (3, *cshape): mean, var, invstd."""
    if x.size == 0:
        return np.empty((3, *cshape))
    layout = plan([x, y], axes)
    grid = layout.channel_grid
    if layout.reduced_blocks == 1:  # the kernel does it all, fused when it fits in cache
        per = np.empty((*grid[:-1], 3, grid[-1]))
        for c, (xb, yb) in layout.blocks():
            _kernels.forward_train(xb, yb, _block(gamma, grid, c), _block(beta, grid, c), eps, per[c], *act)
        return from_blocks(per, cshape)
    # a channel split over several blocks: merged statistics, then y as at inference
    stats = np.empty((3, *cshape))
    stats[0], m2 = channel_stats(x, axes, cshape)
    stats[1] = m2 / count
    with np.errstate(divide="ignore"):
        stats[2] = 1.0 / np.sqrt(stats[1] + eps)
    inference(x, y, axes, stats[0], stats[1], gamma, beta, eps, act)
    return stats


def activation_grad(dy, x, dz, axes, mean, scale, shift, act):
    """dz = dy * act'(z) with z = (x - mean) * scale + shift recomputed from x."""
    if x.size == 0:
        return
    layout = plan([dy, x, dz], axes)
    grid = layout.channel_grid
    mean, scale, shift = (p.reshape(grid) for p in (mean, scale, shift))
    for c, (dyb, xb, dzb) in layout.blocks():
        _kernels.activation_grad(dyb, xb, dzb, mean[c], scale[c], shift[c], *act)


def backward(dy, x, dx, axes, cshape, count, mean, invstd, gamma, beta, act=(0, 0.0)):
    """Gradient into dx (through the activation ``act``, if any); returns float64 (2, *cshape):
    sum(dz), sum(dz * (x - mean)) with dz = dy * act'(z).

    With an activation, dx must not share memory with x: dz goes there first.
    """
    if x.size == 0:
        return np.zeros((2, *cshape))
    layout = plan([dy, x, dx], axes)
    grid = layout.channel_grid
    if layout.reduced_blocks == 1:  # the kernel does it all, fused when it fits in cache
        params = per_block([mean, invstd, gamma, beta] if act[0] else [mean, invstd, gamma], grid)
        sums = np.empty((*grid[:-1], 2, grid[-1]))
        for c, (dyb, xb, dxb) in layout.blocks():
            _kernels.backward(dyb, xb, dxb, params[c], sums[c], *act)
        return from_blocks(sums, cshape)
    if act[0]:  # dz into dx's buffer, then the gradient of dz
        activation_grad(dy, x, dx, axes, mean, gamma * invstd, beta, act)
        dy = dx
    sums = grad_sums(dy, x, axes, cshape, mean)
    grad_elemt(dy, x, dx, axes, mean, sums[0] / count, invstd * invstd * sums[1] / count, gamma * invstd)
    return sums


def grad_sums(dy, x, axes, cshape, mean):
    """float64 (2, *cshape): sum(dy), sum(dy * (x - mean)) per channel, blocks added in a fixed order."""
    sums = np.zeros((2, *cshape))
    if x.size == 0:
        return sums
    layout = plan([dy, x], axes)
    grid = layout.channel_grid
    mean_g = mean.reshape(grid)
    sum_dy, sum_dy_xmu = sums[0].reshape(grid), sums[1].reshape(grid)
    block_dy, block_dy_xmu = np.empty(grid[-1]), np.empty(grid[-1])
    for c, (dyb, xb) in layout.blocks():
        _kernels.backward_reduce(dyb, xb, mean_g[c], block_dy, block_dy_xmu)
        sum_dy[c] += block_dy
        sum_dy_xmu[c] += block_dy_xmu
    return sums


def grad_elemt(dy, x, dx, axes, mean, dy_mean, c_xmu, k_dy):
    """dx = ((dy - dy_mean) - (x - mean) * c_xmu) * k_dy with float64 per-channel coefficients."""
    if x.size == 0:
        return
    layout = plan([dy, x, dx], axes)
    coef = per_block([mean, dy_mean, c_xmu, k_dy], layout.channel_grid)
    for c, (dyb, xb, dxb) in layout.blocks():
        _kernels.backward_elemt(dyb, xb, dxb, coef[c])


def update_running(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update: r = (1 - momentum) r + momentum b, variance unbiased (NumPy or CuPy arrays)."""
    unbiased = var * (count / (count - 1))
    running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
