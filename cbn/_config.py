"""Build and runtime configuration, as printed by ``python -m cbn info``."""
import importlib.util
import platform
import sys

import numpy as np

from . import _kernels, _machine
from ._version import __version__

# _OPENMP macro value (yyyymm of the specification) -> OpenMP version.
_OPENMP_SPECS = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0", 201511: "4.5", 201811: "5.0",
                 202011: "5.1", 202111: "5.2", 202411: "6.0"}


def _gpu_status():
    """The GPU path's device, or why it is unavailable (imports CuPy when installed)."""
    if importlib.util.find_spec("cupy") is None:
        return "unavailable (CuPy is not installed; cbn's GPU path needs it: pip install cupy-cuda12x)"
    try:
        import cupy

        if not cupy.is_available():
            return f"unavailable (CuPy {cupy.__version__} finds no usable CUDA device)"
        from . import _gpu

        version, name, capability = _gpu.device_info()
    except Exception as exc:  # a broken CUDA install: say why rather than fail
        return f"unavailable ({type(exc).__name__}: {exc})"
    major, minor = capability[:-1], capability[-1:]
    return f"CuPy {version}, {name} (compute capability {major}.{minor})"


def _cpu():
    """The CPU's model and L3 size, as far as this platform tells (the kernels' defaults follow them)."""
    model, l3 = _machine.cpu_model() or platform.machine(), _machine.l3_bytes()
    return f"{model}, L3 {l3 / 2**20:g} MiB" if l3 else model


def _config():
    spec, library = _kernels.openmp_info()
    return {
        "cbn": __version__,
        "openmp": bool(spec),
        "openmp_version": _OPENMP_SPECS.get(spec, str(spec)) if spec else None,
        "openmp_runtime": library if spec else None,
        "threads": _kernels.max_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "cpu": _cpu(),
        "stream_bytes": _kernels.stream_bytes() if _kernels.has_stream_stores() else None,
        "gpu": _gpu_status(),
    }


def show_config(mode="stdout"):
    """Print (``mode="stdout"``) or return (``mode="dicts"``) cbn's configuration.

    Reports the version, whether the kernels were built with OpenMP and which
    runtime they use, the default thread count (``OMP_NUM_THREADS``,
    threadpoolctl), from which output size non-temporal stores are used
    (``stream_bytes``; None where the build has none), NumPy's version, the
    CPU (model and L3 size, where the platform tells), and whether the GPU
    path is available.

    Examples
    --------
    >>> import cbn
    >>> cbn.show_config(mode="dicts")["cbn"] == cbn.__version__
    True
    """
    config = _config()
    if mode == "dicts":
        return config
    if mode != "stdout":
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    if config["openmp"]:
        openmp = f"on (OpenMP {config['openmp_version']}, runtime {config['openmp_runtime']})"
    else:
        openmp = "off (kernels run on one thread)"
    print(f"cbn {config['cbn']}")
    print(f"  OpenMP:          {openmp}")
    print(f"  default threads: {config['threads']}")
    if config["stream_bytes"] is None:
        stream = "off (no non-temporal stores in this build)"
    elif config["stream_bytes"] < 0:
        stream = "off"
    else:
        size, mib = config["stream_bytes"], 2**20
        if size % mib == 0:
            at = f"{size // mib} MiB and more"
        elif size % mib == 1:  # _machine.stream_threshold's "above half the L3"
            at = f"more than {size // mib} MiB"
        else:
            at = f"{size} bytes and more"
        stream = f"non-temporal stores for outputs of {at}"
    print(f"  streaming:       {stream}")
    print(f"  NumPy:           {config['numpy']}")
    print(f"  Python:          {config['python']} ({config['platform']})")
    print(f"  CPU:             {config['cpu']}")
    print(f"  GPU path:        {config['gpu']}")
