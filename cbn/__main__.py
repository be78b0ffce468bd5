"""Command line: ``python -m cbn info`` and ``python -m cbn quickstart``."""
import argparse
import runpy


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cbn", description="cbn: batch normalization for NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print version, OpenMP, threads, NumPy and GPU status")
    commands.add_parser("quickstart", help="run the README's quick start")
    args = parser.parse_args(argv)

    if args.command == "info":
        import cbn

        cbn.show_config()
    elif args.command == "quickstart":
        runpy.run_module("cbn._quickstart", run_name="__main__")


if __name__ == "__main__":
    main()
