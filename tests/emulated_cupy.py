"""A stand-in for the parts of CuPy that ``cbn._gpu`` uses, backed by NumPy, whose
``RawModule`` compiles cbn's CUDA source for the CPU (``tests/cuda_emulator.h``).

Installed as ``sys.modules["cupy"]`` by ``tests/test_cuda_emulated.py``, it lets
the GPU path's Python and its kernels run on a machine without a GPU: arrays
are NumPy arrays of a subclass that CuPy's module name marks as device arrays.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

__version__ = "emulated"
HEADER = Path(__file__).with_name("cuda_emulator.h")


class ndarray(np.ndarray):
    """A NumPy array that cbn takes for a CuPy array (its type's module is ``cupy``)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return Device(0)


ndarray.__module__ = "cupy"


def _device(a):
    return a.view(ndarray) if isinstance(a, np.ndarray) else np.asarray(a).view(ndarray)


def empty(shape, dtype=float, order="C"):
    return np.empty(shape, dtype, order).view(ndarray)


def zeros(shape, dtype=float, order="C"):
    return np.zeros(shape, dtype, order).view(ndarray)


def asarray(a, dtype=None):
    return _device(np.asarray(a, dtype))


def ascontiguousarray(a, dtype=None):
    return _device(np.ascontiguousarray(a, dtype))


def asnumpy(a):
    return np.array(a).view(np.ndarray)


copyto = np.copyto
may_share_memory = np.may_share_memory


class Device:
    def __init__(self, id=0):
        self.id = id
        self.compute_capability = "emulated"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _get_device():
    return 0


cuda = types.SimpleNamespace(
    Device=Device,
    runtime=types.SimpleNamespace(getDevice=_get_device, getDeviceProperties=lambda i: {"name": b"CPU emulator"}),
    get_current_stream=lambda: types.SimpleNamespace(ptr=0),
)


def is_available():
    return False  # no device: tests/test_gpu.py skips itself


_ARG_TYPES = {np.dtype(np.int32): ctypes.c_int, np.dtype(np.int64): ctypes.c_longlong,
              np.dtype(np.float64): ctypes.c_double, np.dtype(np.uint32): ctypes.c_uint}
_BUILD = Path(tempfile.gettempdir()) / "cbn-cuda-emulator"


class RawModule:
    """The kernels of ``code`` named by ``name_expressions``, compiled with g++ for the CPU (cached by source)."""

    def __init__(self, code, options=(), name_expressions=()):
        source = f'#include "{HEADER}"\n{code}\n' + "".join(
            f'CBN_EMULATE_KERNEL("{name}", {name})\n' for name in name_expressions)
        key = hashlib.sha256(source.encode()).hexdigest()[:16]
        library = _BUILD / f"kernels-{key}.so"
        if not library.exists():
            _BUILD.mkdir(exist_ok=True)
            unit = _BUILD / f"kernels-{key}.{os.getpid()}.cpp"
            unit.write_text(source)
            compiler = shutil.which("g++") or "c++"
            partial = library.with_name(f"{library.stem}.{os.getpid()}.tmp")  # then renamed: no half-written library
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # tests/sanitize.sh preloads ASan
            flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-w"]
            subprocess.run([compiler, *flags, str(unit), "-o", str(partial)], check=True, capture_output=True,
                           text=True, env=env)
            partial.replace(library)
        self._library = ctypes.CDLL(str(library))
        self._library.cbn_emulate_launch.restype = ctypes.c_int

    def get_function(self, name):
        return _Kernel(self._library, name)


class _Kernel:
    def __init__(self, library, name):
        self.library, self.name = library, name

    def __call__(self, grid, block, args):
        values = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else _ARG_TYPES[a.dtype](a)
                  for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
        dims = [(ctypes.c_uint * 3)(*(tuple(d) + (1,) * (3 - len(d)))) for d in (grid, block)]
        if self.library.cbn_emulate_launch(self.name.encode(), dims[0], dims[1], pointers) != 0:
            raise KeyError(f"kernel {self.name} is not in the module")
