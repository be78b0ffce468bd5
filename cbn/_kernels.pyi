"""Type stubs of cbn's compiled kernels (cbn/_kernels.pyx).

Bulk arrays are (A, C, B) views of float32 or float64 (one dtype per call);
per-channel arrays are contiguous float64.  Outputs are written in place.
"""
import numpy as np
import numpy.typing as npt

__test__: dict[str, str]  # Cython's docstring-test table

_Bulk = npt.NDArray[np.float32] | npt.NDArray[np.float64]
_Channels = npt.NDArray[np.float64]

def channel_stats(x: _Bulk, mean: _Channels, m2: _Channels) -> None: ...
def inference(
    x: _Bulk,
    y: _Bulk,
    mean: _Channels,
    var: _Channels,
    gamma: _Channels,
    beta: _Channels,
    eps: float,
    act: int = 0,
    slope: float = 0.0,
) -> None: ...
def forward_train(
    x: _Bulk,
    y: _Bulk,
    gamma: _Channels,
    beta: _Channels,
    eps: float,
    stats: _Channels,
    act: int = 0,
    slope: float = 0.0,
) -> None: ...
def activation_grad(
    dy: _Bulk,
    x: _Bulk,
    dz: _Bulk,
    mean: _Channels,
    scale: _Channels,
    shift: _Channels,
    act: int,
    slope: float,
) -> None: ...
def backward(
    dy: _Bulk, x: _Bulk, dx: _Bulk, stats: _Channels, sums: _Channels, act: int = 0, slope: float = 0.0
) -> None: ...
def backward_reduce(dy: _Bulk, x: _Bulk, mean: _Channels, sum_dy: _Channels, sum_dy_xmu: _Channels) -> None: ...
def backward_elemt(dy: _Bulk, x: _Bulk, dx: _Bulk, coef: _Channels) -> None: ...

# The plain-array entry points (cbn/_plain.pxi): None when the call is not recognized.  Their
# arguments are those of the public functions, in the same order, any object.
def train_plain(
    x: object, gamma: object, beta: object, running_mean: object, running_var: object, momentum: object,
    eps: object, channel_axis: object, activation: object, negative_slope: object, out: object, with_stats: bool,
) -> _Bulk | tuple[_Bulk, _Bulk, _Bulk] | None: ...
def inference_plain(
    x: object, gamma: object, beta: object, running_mean: object, running_var: object, momentum: object,
    eps: object, channel_axis: object, activation: object, negative_slope: object, out: object,
) -> _Bulk | None: ...
def backward_plain(
    dy: object, x: object, mean: object, invstd: object, gamma: object, beta: object, activation: object,
    negative_slope: object, channel_axis: object, out: object,
) -> tuple[_Bulk, _Bulk, _Bulk] | None: ...
def max_threads() -> int: ...
def openmp_info() -> tuple[int, str]: ...
def stream_bytes(nbytes: int = -2) -> int: ...
def has_stream_stores() -> bool: ...
def in_forked_child() -> bool: ...
def merge_packed(a: _Channels, b: _Channels, channels: int) -> None: ...
