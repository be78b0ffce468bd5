"""The accuracy of cbn's fused sigmoid and tanh, built on its own exponential (a diagnostic; the
test is test_activations.py's, with the same measure).

``python tests/activation_accuracy.py [BUILD ...]`` prints, for the installed build or for each
BUILD (a directory as for ``tests/ab_kernels.py``), in float32 and float64: sigmoid's largest and
mean error in ulp of itself and tanh's largest error in ulp of 1, over the arguments whose
exponential is a normal number, against long double.
"""
import sys

import numpy as np
from ab_kernels import load_old
from helpers import exp_activation_errors

import cbn._kernels as installed

CODES = {"sigmoid": 3, "tanh": 4}  # activation codes of src_c/cbn_loops.h


def inference_of(kernels):
    """run(z, activation) of exp_activation_errors through a build's inference, z itself the pre-activation."""
    eps = 2.0**-10  # var + eps is exactly 1

    def run(z, activation):
        y = np.empty_like(z)
        none = np.empty(0)
        kernels.inference(z.reshape(1, 1, -1), y.reshape(1, 1, -1), np.zeros(1), np.array([1 - eps]), none, none,
                          eps, CODES[activation], 0.0)
        return y
    return run


def main(argv):
    builds = [(b, load_old(b, f"build{i}")) for i, b in enumerate(argv[1:])] or [("installed", installed)]
    for name, kernels in builds:
        for dtype in (np.float32, np.float64):
            top, mean, tanh = exp_activation_errors(inference_of(kernels), dtype)
            print(f"{name} {np.dtype(dtype).name}: sigmoid max {top:.2f} ulp, mean {mean:.3f}; "
                  f"tanh max {tanh:.2f} ulp of 1")


if __name__ == "__main__":
    main(sys.argv)
