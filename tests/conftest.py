"""pytest set-up: check which cbn is under test, and a seeded generator per test."""
import zlib

import numpy as np
import pytest

import cbn

# Run from a checkout without a build, Python would import the source tree's
# cbn/ (no compiled kernels) and fail obscurely; say so instead.
if not hasattr(cbn, "batch_norm"):  # pragma: no cover
    raise ImportError(f"cbn imported from {cbn.__file__} is incomplete; install the wheel first (tests/run.sh)")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_report_header(config):
    info = cbn.show_config(mode="dicts")
    openmp = f"OpenMP {info['openmp_version']}" if info["openmp"] else "no OpenMP"
    return f"cbn {cbn.__version__} from {cbn.__file__} ({openmp}, {info['threads']} threads)"
