"""Command line: ``python -m cbn info | quickstart | demo | mpi-demo | mpi-bench | bench [options]``."""
import argparse
import runpy
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m cbn", description="cbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print version, OpenMP, threads, NumPy and GPU status")
    commands.add_parser("quickstart", help="run the README's quick start")
    commands.add_parser("demo", help="the paper's Figure 1 on the digits data (demo --help)", add_help=False)
    commands.add_parser(
        "mpi-demo", help="data-parallel training over MPI ranks (mpiexec -n N ...; mpi-demo --help)", add_help=False
    )
    commands.add_parser(
        "mpi-bench", help="SyncBatchNorm's cost per step on N ranks (mpiexec -n N ...; mpi-bench --help)",
        add_help=False,
    )
    commands.add_parser(
        "bench", help="time cbn against a copy, PyTorch and the reference (bench --help)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)

    if args.command == "bench":
        from . import _bench

        _bench.main(rest)
        return
    if args.command == "mpi-demo":
        from . import _mpi_demo

        _mpi_demo.main(rest)
        return
    if args.command == "mpi-bench":
        from . import _mpi_bench

        _mpi_bench.main(rest)
        return
    if args.command == "demo":
        from . import _demo

        _demo.main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        from . import show_config

        show_config()
    elif args.command == "quickstart":
        runpy.run_module("cbn._quickstart", run_name="__main__")


if __name__ == "__main__":
    main()
