"""Zero-copy 3-D views ``(A, C, B)`` of arrays of any layout, for the kernels.

Batch norm reduces over every axis but the channel axes.  The kernels take
views ``v[a, c, b]`` with arbitrary strides, where ``c`` indexes channels and
(a, b) the values sharing a channel.  This module finds such views of all the
operands of one call (x and y, or dy, x and dx), without copying:

1. Axes of length 1 are dropped; reduced axes on which x runs backwards are
   flipped in every operand (same element, same position).
2. Adjacent axes are merged, as ``numpy.nditer`` coalesces them, when the
   merge is valid in every operand: the reduced axes ordered by x's strides,
   the channel axes in the order given (the order of per-channel arrays).
3. ``B`` is the reduced group with the smallest stride when it is finer than
   the channel stride (NCHW: B = H*W); ``A`` is the largest other group.

A layout that still leaves extra groups (rare: a view with three or more
independent strides among its reduced axes, or channel axes that cannot be
merged) is visited in blocks, one kernel call per block in a fixed order.
C-contiguous arrays with one channel axis skip all this (a reshape).
"""
import itertools
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided


class Layout:
    """Views of several same-shaped operands as blocks of (A, C, B) arrays.

    ``views[i]`` has shape ``outer_shape + (A, C, B)``; ``outer_shape`` starts
    with the extra channel groups, then the extra reduced groups.  Per-channel
    arrays reshaped to ``channel_grid`` index the same channels as the views.
    """

    def __init__(self, views, n_outer_channel, channel_grid):
        self.views = views
        self.n_outer_channel = n_outer_channel
        self.channel_grid = channel_grid
        # >1 when a channel's values are spread over several blocks, whose
        # partial results must then be merged
        self.reduced_blocks = math.prod(views[0].shape[n_outer_channel:-3]) if views[0].ndim > 3 else 1

    def blocks(self):
        """Yield (channel index, views of one block), in a fixed order."""
        outer_shape = self.views[0].shape[:-3]
        if not outer_shape:
            yield (), self.views
            return
        for index in itertools.product(*map(range, outer_shape)):
            yield index[: self.n_outer_channel], tuple(v[index] for v in self.views)


def plan(operands, axes):
    """A :class:`Layout` for same-shaped ``operands`` (ndarrays), x first."""
    x = operands[0]
    shape = x.shape
    if len(axes) == 1:
        for op in operands:
            if not op.flags.c_contiguous:
                break
        else:  # the common case: a reshape
            k = axes[0]
            abc = (math.prod(shape[:k]), shape[k], math.prod(shape[k + 1 :]))
            return Layout([op.reshape(abc) for op in operands], 0, (shape[k],))

    flips = tuple(
        slice(None, None, -1) if (i not in axes and x.strides[i] < 0) else slice(None) for i in range(x.ndim)
    )
    operands = [op[flips] for op in operands]
    strides = [op.strides for op in operands]

    def group(axis):
        return [shape[axis], [s[axis] for s in strides]]

    def merged(outer, inner):
        """outer followed by inner as one axis, or None where some operand forbids it."""
        if all(so == si * inner[0] for so, si in zip(outer[1], inner[1])):
            return [outer[0] * inner[0], inner[1]]
        return None

    def coalesce(order):
        groups = []
        for axis in order:
            if shape[axis] == 1:
                continue
            g = group(axis)
            m = merged(groups[-1], g) if groups else None
            if m is None:
                groups.append(g)
            else:
                groups[-1] = m
        return groups

    reduced = [i for i in range(x.ndim) if i not in axes]
    reduced_groups = coalesce(sorted(reduced, key=lambda i: -abs(x.strides[i])))
    channel_groups = coalesce(axes) or [[1, [0] * len(operands)]]

    c_group = channel_groups[-1]
    one = [1, [0] * len(operands)]
    b_group = one
    if reduced_groups and (c_group[0] == 1 or abs(reduced_groups[-1][1][0]) < abs(c_group[1][0])):
        b_group = reduced_groups.pop()
    a_group = one
    if reduced_groups:
        a_group = reduced_groups.pop(max(range(len(reduced_groups)), key=lambda i: reduced_groups[i][0]))
    outer = channel_groups[:-1] + reduced_groups

    ordered = outer + [a_group, c_group, b_group]
    view_shape = tuple(g[0] for g in ordered)
    views = tuple(
        as_strided(op, shape=view_shape, strides=tuple(g[1][i] for g in ordered), writeable=op.flags.writeable)
        for i, op in enumerate(operands)
    )
    channel_grid = tuple(g[0] for g in channel_groups)
    return Layout(views, len(channel_groups) - 1, channel_grid)


def empty_like_layout(x, dtype):
    """An uninitialised array shaped like x whose strides mirror x's.

    Axes that run backwards in x run backwards in the result too, so that x
    and the result merge into the same (A, C, B) views.
    """
    if x.flags.c_contiguous:
        return np.empty(x.shape, dtype)
    flips = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in x.strides)
    return np.empty_like(x[flips], dtype=dtype)[flips]
