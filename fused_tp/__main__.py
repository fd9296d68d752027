"""Command line: `python -m fused_tp demo|tune [options]` (see `python -m fused_tp <command> --help`)."""

import argparse

from . import demo, tune


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fused_tp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    demo_help = "shard a dense MLP over local ranks, check it against float64 and time it"
    demo.add_arguments(commands.add_parser("demo", help=demo_help, description=demo_help, formatter_class=defaults))
    tune_help = "time every kernel config on shapes, write a tuned table"
    tune.add_arguments(
        commands.add_parser(
            "tune",
            help=tune_help,
            formatter_class=defaults,
            description=f"{tune_help}. Needs a GPU; without one, set TRITON_INTERPRET=1 to run it through Triton's "
            "interpreter (timed by the wall clock: a check of the command, not speed).",
        )
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.main(args)
    else:
        tune.run(args)


if __name__ == "__main__":
    main()
