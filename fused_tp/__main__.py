"""Command line: `python -m fused_tp demo [options]` (see `python -m fused_tp demo --help`)."""

import argparse

from . import demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_tp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="shard a dense MLP over local ranks, check and time it"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.main(args)


if __name__ == "__main__":
    main()
