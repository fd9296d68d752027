"""Command line: `python -m fused_tp demo|tune [options]` (see `python -m fused_tp <command> --help`)."""

import argparse

from . import demo, tune


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_tp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="shard a dense MLP over local ranks, check and time it"))
    tune.add_arguments(commands.add_parser("tune", help="time every kernel config on shapes, write a tuned table"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.main(args)
    else:
        tune.run(args)


if __name__ == "__main__":
    main()
