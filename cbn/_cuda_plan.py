"""Launch shapes and kernel names for cbn/cuda/batch_norm.cu (pure Python, no CuPy).

Every launch shape is a function of the array's (A, C, B) view alone, never of
the device, so a reduction splits and combines its partial sums the same way
on every GPU and every run: results are bitwise reproducible.
"""
import functools
import math
from typing import NamedTuple

import numpy as np

THREADS = 256  # threads per block of the 1-D kernels
REDUCE_BLOCKS = 2048  # blocks a reduction aims for: a few waves on any current GPU
ELEMENTWISE_BLOCKS = 4096
ROWS_MIN_RUN = 32  # channels whose values come in runs at least this long are reduced by rows
MIN_PER_THREAD = 4  # values per thread below which a reduction stops splitting a channel (a batch of loads)
ROWS_PER_THREAD = 8  # cbn_normalize's batch of loads in flight per thread
COLS_BLOCK = (32, 8)  # cbn_reduce_cols' block shape (fixed in the kernel)

# element type of the kernels -> its C++ name (T in the .cu file)
CUDA_TYPES = {np.dtype(np.float16): "cbn_half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


# cbn_train_channel / cbn_backward_channel: values per thread held in registers, per element type
CHANNEL_VALUES = {np.dtype(np.float16): 32, np.dtype(np.float32): 32, np.dtype(np.float64): 16}
CHANNEL_THREADS = 512
SMALL_ARRAY = 1 << 20  # values: below this, a channel's layout need not be coalesced for the one-block kernels


def name_expressions(dtype):
    """The kernel template instances cbn uses for arrays of ``dtype``."""
    t = CUDA_TYPES[np.dtype(dtype)]
    vals = CHANNEL_VALUES[np.dtype(dtype)]
    return [
        f"cbn_train_channel<{t}, {vals}>",
        f"cbn_backward_channel<{t}, {vals}>",
        f"cbn_reduce_rows<{t}, 0>",
        f"cbn_reduce_rows<{t}, 1>",
        f"cbn_reduce_cols<{t}, 0>",
        f"cbn_reduce_cols<{t}, 1>",
        f"cbn_normalize<{t}>",
        f"cbn_backward_elemt<{t}>",
    ]


class ReducePlan(NamedTuple):
    """How cbn_reduce_rows / cbn_reduce_cols split the A * B values of each channel."""

    by_rows: bool  # cbn_reduce_rows (True) or cbn_reduce_cols
    grid: tuple
    block: tuple
    span: int  # values (rows kernel) or rows (cols kernel) per chunk
    n_chunks: int
    partials: int  # partial sums per channel


class ElementwisePlan(NamedTuple):
    grid: tuple
    block: tuple
    rows: int  # rows per block


@functools.lru_cache(maxsize=256)
def reduce_plan(A, C, B):
    """Split of a per-channel reduction over an (A, C, B) view with A * B > 0 and C > 0."""
    if B >= ROWS_MIN_RUN:
        m = A * B
        wanted = math.ceil(REDUCE_BLOCKS / C)
        n_chunks = max(1, min(wanted, m // (THREADS * MIN_PER_THREAD)))
        span = math.ceil(m / n_chunks)
        n_chunks = math.ceil(m / span)
        return ReducePlan(True, (C * n_chunks,), (THREADS,), span, n_chunks, n_chunks)
    tiles = math.ceil(C * B / COLS_BLOCK[0])
    wanted = math.ceil(REDUCE_BLOCKS / tiles)
    n_chunks = max(1, min(wanted, A // (COLS_BLOCK[1] * MIN_PER_THREAD)))
    span = math.ceil(A / n_chunks)
    n_chunks = math.ceil(A / span)
    return ReducePlan(False, (tiles, n_chunks), COLS_BLOCK, span, n_chunks, B * n_chunks)


def one_block_per_channel(A, C, B, dtype):
    """Whether a channel fits one block's registers (cbn_train_channel, cbn_backward_channel) and is read
    coalesced enough: runs of B >= ROWS_MIN_RUN values, or a small array."""
    fits = A * B <= CHANNEL_THREADS * CHANNEL_VALUES[np.dtype(dtype)] and A * C * B < 2**31  # 32-bit offsets
    return fits and (B >= ROWS_MIN_RUN or A * C * B <= SMALL_ARRAY)


@functools.lru_cache(maxsize=256)
def elementwise_plan(A, C, B):
    """Launch of cbn_normalize / cbn_backward_elemt over an (A, C, B) view with a value."""
    Q = C * B
    width = 32
    while width < min(Q, THREADS):
        width *= 2
    height = THREADS // width
    tiles = math.ceil(Q / width)
    n_chunks = max(1, min(math.ceil(ELEMENTWISE_BLOCKS / tiles), math.ceil(A / height)))
    rows = math.ceil(A / n_chunks)
    rows = max(ROWS_PER_THREAD, math.ceil(rows / height)) * height  # whole thread rows, a full batch of loads
    return ElementwisePlan((tiles, math.ceil(A / rows)), (width, height), rows)
