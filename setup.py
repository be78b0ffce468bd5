"""Build of cbn's compiled kernels (everything declarative is in pyproject.toml).

OpenMP flags are chosen by compiler type, after a test compile:
gcc/clang ``-fopenmp``; Apple clang ``-Xpreprocessor -fopenmp`` with libomp;
MSVC ``/openmp``.  When none works, or ``CBN_OPENMP=0`` is set, cbn is built
without OpenMP and its kernels run on one thread.
"""
import os
import sys
import tempfile
import textwrap

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
    """
)


def openmp_flag_candidates(compiler_type):
    """(compile args, link args) to try, best first, for this compiler."""
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp driver flag; libomp comes from Homebrew
        # or conda, found through CPPFLAGS/LDFLAGS or these usual prefixes.
        prefixes = [os.environ.get("CONDA_PREFIX", ""), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
        extra_inc = [f"-I{p}/include" for p in prefixes if p and os.path.isdir(f"{p}/include")]
        extra_lib = [f"-L{p}/lib" for p in prefixes if p and os.path.isdir(f"{p}/lib")]
        return [
            (["-Xpreprocessor", "-fopenmp", *extra_inc], [*extra_lib, "-lomp"]),
            (["-fopenmp"], ["-fopenmp"]),
        ]
    return [(["-fopenmp"], ["-fopenmp"])]


class BuildExtWithOpenMP(build_ext):
    """build_ext that adds OpenMP flags the compiler accepts, or builds without."""

    def _compiles_and_links(self, compile_args, link_args):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as f:
                f.write(OPENMP_PROBE)
            try:
                objects = self.compiler.compile([source], output_dir=tmp, extra_postargs=compile_args)
                self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=link_args)
            except Exception:  # any compile or link error means "not usable"
                return False
        return True

    def _openmp_flags(self):
        if os.environ.get("CBN_OPENMP", "1").strip() == "0":
            print("cbn: CBN_OPENMP=0, building without OpenMP")
            return None
        for compile_args, link_args in openmp_flag_candidates(self.compiler.compiler_type):
            if self._compiles_and_links(compile_args, link_args):
                print(f"cbn: building with OpenMP ({' '.join(compile_args)})")
                return compile_args, link_args
        print("cbn: the compiler does not support OpenMP; building without it (one thread)")
        return None

    def build_extensions(self):
        flags = self._openmp_flags()
        # no FMA contraction: every instruction-set clone of the loops
        # (src_c/cbn_loops.h) then rounds identically; sqrt need not set
        # errno (cbn never reads it), so the per-channel loops vectorize
        optimize = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]
        for ext in self.extensions:
            ext.extra_compile_args = [*optimize, *ext.extra_compile_args]
            if flags:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args += flags[1]
        super().build_extensions()


extensions = [
    Extension(
        "cbn._kernels",
        sources=["cbn/_kernels.pyx"],
        include_dirs=["src_c", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[
            "cbn/_plain.pxi", "src_c/cbn_openmp.h", "src_c/cbn_loops.h", "src_c/cbn_loops_t.h", "src_c/cbn_stream.h",
        ],
    )
]

# setuptools hands .pyx sources to Cython (a build requirement) itself, so the
# sdist carries the .pyx rather than generated C.
setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
