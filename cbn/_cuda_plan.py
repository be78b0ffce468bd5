"""Launch shapes and kernel names for cbn/cuda/batch_norm.cu (pure Python, no CuPy).

Every launch shape is a function of the array's (A, C, B) view and element
type alone, never of the device or of where the array lies in memory, so a
reduction splits and combines its partial sums the same way on every GPU and
every run: results are bitwise reproducible.
"""
import functools
import math
from typing import NamedTuple

import numpy as np

THREADS = 256  # threads per block of the split kernels (CBN_SPLIT_THREADS in the .cu)
REDUCE_BLOCKS = 2048  # blocks a reduction aims for: a few waves on any current GPU
ELEMENTWISE_BLOCKS = 4096
ELEMENTWISE_MIN_BLOCKS = 512  # a few blocks per multiprocessor
ROWS_MIN_RUN = 32  # channels whose values come in runs at least this long are reduced by rows
ROWS_VECTORS_PER_THREAD = 4  # cbn_reduce_rows: vectors per thread below which a channel is not split further
COLS_ROWS_PER_THREAD = 8  # cbn_reduce_cols: rows per thread below which the rows are not split further
ROWS_PER_THREAD = 8  # cbn_normalize / cbn_backward_elemt: rows a thread handles, where the array is large

# element type of the kernels -> its C++ name (T in the .cu file)
CUDA_TYPES = {np.dtype(np.float16): "cbn_half", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# element type -> values in one 16-byte access (VEC of the kernels, where the shape allows it)
VECTOR = {np.dtype(np.float16): 8, np.dtype(np.float32): 4, np.dtype(np.float64): 2}
# ... in the gradient's row reduction: float64's ran 1.6x slower in 16-byte vectors than with element
# accesses (H200, NCHW 32x64x56x56: 53.2 against 33.6 us), float32's 1.2x faster (13.9 against 16.8)
GRADIENT_VECTOR = {**VECTOR, np.dtype(np.float64): 1}


# cbn_train_channel / cbn_backward_channel: values per thread held in registers, per element type
CHANNEL_VALUES = {np.dtype(np.float16): 32, np.dtype(np.float32): 32, np.dtype(np.float64): 16}
CHANNEL_THREADS = 512
SMALL_ARRAY = 1 << 18  # values: the one-block kernels take arrays up to this size (larger: the split kernels)


def name_expressions(dtype):
    """The kernel template instances cbn uses for arrays of ``dtype``."""
    t = CUDA_TYPES[np.dtype(dtype)]
    vals = CHANNEL_VALUES[np.dtype(dtype)]
    vecs = (1, VECTOR[np.dtype(dtype)])
    widths = ((0, VECTOR[np.dtype(dtype)]), (1, GRADIENT_VECTOR[np.dtype(dtype)]))
    return [
        f"cbn_train_channel<{t}, {vals}>",
        f"cbn_backward_channel<{t}, {vals}>",
        *(f"cbn_reduce_rows<{t}, {mode}, {vec}>" for mode, width in widths for vec in sorted({1, width})),
        *(f"cbn_reduce_cols<{t}, {mode}>" for mode in (0, 1)),
        f"cbn_finish_channels<{t}, 0>",
        f"cbn_finish_channels<{t}, 1>",
        *(f"cbn_{kind}<{t}, {vec}>" for kind in ("normalize", "backward_elemt") for vec in vecs),
    ]


class ReducePlan(NamedTuple):
    """How cbn_reduce_rows / cbn_reduce_cols split the A * B values of each channel."""

    by_rows: bool  # cbn_reduce_rows (True) or cbn_reduce_cols, then cbn_finish_channels
    grid: tuple
    block: tuple
    span: int  # vectors (rows kernel) or rows (cols kernel) per chunk
    n_chunks: int
    partials: int  # partial sums per channel
    vec: int  # values per vector (VEC; 1 for the cols kernel, which takes element accesses)


class ElementwisePlan(NamedTuple):
    grid: tuple
    block: tuple
    rows: int  # rows per block
    vec: int  # values per vector (VEC)


def _width(n, most):
    """The least power of two >= min(n, most)."""
    return 1 << max(0, math.ceil(math.log2(min(n, most))))


@functools.lru_cache(maxsize=256)
def reduce_plan(A, C, B, vec):
    """Split of a per-channel reduction over an (A, C, B) view with A * B > 0 and C > 0, in vectors of
    ``vec`` values where B is a multiple of it (rows kernel; the cols kernel takes element accesses)."""
    if B >= ROWS_MIN_RUN:
        vec = vec if B % vec == 0 else 1
        m = A * B // vec
        wanted = math.ceil(REDUCE_BLOCKS / C)
        n_chunks = max(1, min(wanted, m // (THREADS * ROWS_VECTORS_PER_THREAD)))
        span = math.ceil(m / n_chunks)
        n_chunks = math.ceil(m / span)
        return ReducePlan(True, (C * n_chunks,), (THREADS,), span, n_chunks, n_chunks, vec)
    vec = 1  # element accesses: 16-byte columns measured slower (H200, float32: NC 14.7 vs 13.4 us, NHWC 18.3/14.7)
    columns = C * B
    bx = _width(columns, 32)
    by = THREADS // bx
    tiles = math.ceil(columns / bx)
    n_chunks = max(1, min(math.ceil(REDUCE_BLOCKS / tiles), A // (by * COLS_ROWS_PER_THREAD)))
    span = math.ceil(A / n_chunks)
    n_chunks = math.ceil(A / span)
    return ReducePlan(False, (tiles, n_chunks), (bx, by), span, n_chunks, B * n_chunks, vec)


def one_block_per_channel(A, C, B, dtype):
    """Whether an array is small (one launch matters more than spreading a channel over blocks) and each
    channel fits one block's registers (cbn_train_channel, cbn_backward_channel)."""
    return A * B <= CHANNEL_THREADS * CHANNEL_VALUES[np.dtype(dtype)] and A * C * B <= SMALL_ARRAY


@functools.lru_cache(maxsize=256)
def elementwise_plan(A, C, B, vec):
    """Launch of cbn_normalize / cbn_backward_elemt over an (A, C, B) view with a value, in vectors of
    ``vec`` values where C * B is a multiple of it."""
    vec = vec if C * B % vec == 0 else 1
    columns = C * B // vec
    width = _width(columns, THREADS)
    height = THREADS // width
    tiles = math.ceil(columns / width)
    # up to ROWS_PER_THREAD rows per thread (each thread first reads its channels' parameters), as long as
    # that leaves ELEMENTWISE_MIN_BLOCKS blocks; at most ELEMENTWISE_BLOCKS blocks
    per_thread = max(1, min(ROWS_PER_THREAD, math.ceil(A / (height * math.ceil(ELEMENTWISE_MIN_BLOCKS / tiles)))))
    n_chunks = max(1, min(math.ceil(A / (height * per_thread)), math.ceil(ELEMENTWISE_BLOCKS / tiles)))
    rows = math.ceil(math.ceil(A / n_chunks) / height) * height  # whole thread rows
    return ElementwisePlan((tiles, math.ceil(A / rows)), (width, height), rows, vec)
