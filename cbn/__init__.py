"""cbn: batch normalization for NumPy arrays, fast and accurate.

The normalization of Ioffe & Szegedy (2015) and its gradient, as OpenMP
kernels for NumPy arrays and CUDA kernels for CuPy arrays.  ``cbn.reference`` holds the same functions in plain NumPy.
"""
from . import reference
from ._api import batch_norm, batch_norm_backward, batch_norm_forward, batch_stats
from ._config import show_config
from ._layer import BatchNorm
from ._partials import (
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_stats_partial,
    combine_stats,
    finalize_stats,
)
from ._version import __version__

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_stats",
    "batch_stats_partial",
    "combine_stats",
    "finalize_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "reference",
    "show_config",
    "__version__",
]
