"""The package as a user meets it: configuration, command line, docs, metadata."""
import doctest
import importlib.metadata
import importlib.resources
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import cbn
import cbn._api
import cbn._config
import cbn._layer
from cbn import _kernels
from cbn._machine import cpu_vendor, l3_bytes, stream_threshold

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_version_is_single_sourced():
    assert importlib.metadata.version("cbn") == cbn.__version__


def test_type_information_ships_with_the_package():
    package = importlib.resources.files("cbn")
    assert (package / "py.typed").is_file()
    stubs = (package / "_kernels.pyi").read_text()
    for name in ("forward_train", "backward", "channel_stats", "openmp_info"):
        assert f"def {name}(" in stubs


def test_show_config_reports_what_the_issue_asks(capsys):
    config = cbn.show_config(mode="dicts")
    assert config["cbn"] == cbn.__version__
    assert config["numpy"] == np.__version__
    assert config["threads"] >= 1
    assert isinstance(config["openmp"], bool)
    assert config["gpu"].startswith(("unavailable", "CuPy"))
    # the README's threshold for this CPU where the build streams, None where it cannot
    want = stream_threshold(cpu_vendor(), l3_bytes())
    assert config["stream_bytes"] == (want if _kernels.has_stream_stores() else None)
    cbn.show_config()
    printed = capsys.readouterr().out
    assert isinstance(config["cpu"], str) and config["cpu"]
    for word in ("cbn", "OpenMP", "default threads", "streaming", "NumPy", "CPU", "GPU path"):
        assert word in printed
    with pytest.raises(ValueError, match="mode must be"):
        cbn.show_config(mode="yaml")


def test_openmp_thread_count_follows_omp_num_threads():
    if not cbn.show_config(mode="dicts")["openmp"]:
        pytest.skip("built without OpenMP")
    code = "import cbn; print(cbn.show_config(mode='dicts')['threads'])"
    env = {"OMP_NUM_THREADS": "3", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_command_line_info_and_quickstart():
    info = subprocess.run([sys.executable, "-m", "cbn", "info"], capture_output=True, text=True, check=True)
    assert f"cbn {cbn.__version__}" in info.stdout
    quick = subprocess.run([sys.executable, "-m", "cbn", "quickstart"], capture_output=True, text=True, check=True)
    assert "agrees with cbn.reference: True" in quick.stdout


@pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests")
def test_readme_quick_start_is_the_code_that_runs():
    blocks = re.findall(r"## Quick start.*?```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no quick start block"
    source = pathlib.Path(cbn.__file__).with_name("_quickstart.py").read_text()
    assert blocks[0].strip() == source.strip()


@pytest.mark.parametrize("module", [cbn._api, cbn._config, cbn._layer, cbn._partials])
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


def test_public_functions_have_numpydoc_sections():
    for func in (cbn.batch_norm, cbn.batch_norm_forward, cbn.batch_norm_backward, cbn.batch_stats,
                 cbn.batch_stats_partial, cbn.combine_stats, cbn.finalize_stats, cbn.batch_norm_backward_reduce,
                 cbn.batch_norm_backward_elemt):
        for section in ("Parameters", "Returns", "Examples"):
            assert section in func.__doc__, (func.__name__, section)


def test_bench_measures_every_op_against_the_copy(tmp_path):
    from cbn import _bench

    records = _bench.run([("tiny", (8, 3, 5), 1)], [np.float32], [1], repeat=1, progress=False)
    assert {r["op"] for r in records} == set(_bench.OPS)
    for r in records:
        assert r["copy_s"] > 0 and r["cbn_s"] > 0 and r["reference_s"] > 0
    path = tmp_path / "bench.json"
    _bench.main(["--quick", "--threads", "1", "--dtype", "float64", "--repeat", "1", "--json", str(path)])
    assert path.exists()


def test_bench_sweep_spans_1e3_to_1e8_elements():
    from cbn import _bench

    sizes = [np.prod(shape) for _, shape, _ in _bench.sweep_cases()]
    assert sizes[0] >= 1e3 and 0.9e8 <= sizes[-1] <= 1.1e8


def test_console_script_is_installed():
    script = pathlib.Path(sys.executable).with_name("cbn")
    if not script.exists():
        pytest.skip("not installed with its console script")
    out = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True)
    assert f"cbn {cbn.__version__}" in out.stdout
