"""`crossdiff <stage>`: one subcommand per pipeline stage.

Each stage module owns its command: it defines ``add_cli(subparsers)``, which adds a
subparser and sets ``func`` to a callable taking the parsed arguments. This file only
collects them, so stages stay independent and the CLI mirrors the library.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from crossdiff.errors import CrossdiffError
from crossdiff.terminal import printable

# Modules that contribute subcommands, in the order `crossdiff --help` lists them.
STAGE_MODULES = [
    "crossdiff.causal.behaviour",
    "crossdiff.collect.collector",
    "crossdiff.train.trainer",
    "crossdiff.analysis.cli",
    "crossdiff.autointerp.cli",
    "crossdiff.analysis.inspect",
    "crossdiff.report.cli",
    "crossdiff.organism",
    "crossdiff.causal.cli",
    "crossdiff.run.demo",
    "crossdiff.run.stages",
    "crossdiff.analysis.adl",
    "crossdiff.organism.score",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossdiff",
        description="Model diffing with crosscoders: what did chat fine-tuning change?",
    )
    parser.add_argument("--version", action="version", version=f"crossdiff {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        importlib.import_module(name).add_cli(subparsers)
    return parser


def _version() -> str:
    from crossdiff import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        result = args.func(args)
    except CrossdiffError as err:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # said once: torchrun's SIGTERM may follow
        # Messages may quote the data (a path, a token, a source's text): escaped, one line whatever it holds.
        print(f"crossdiff: error: {printable(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossdiff: interrupted (completed work is saved; rerun the same command to resume)", file=sys.stderr)
        return 130
    finally:
        if "crossdiff.train.distributed" in sys.modules:  # a torchrun rank: leave its process group before exit
            sys.modules["crossdiff.train.distributed"].leave_process_group()
    return int(result or 0)


def _stopped_by_torchrun(signum, frame) -> None:
    """torchrun stops every rank with SIGTERM when one fails: say so in one line, like any error."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    raise CrossdiffError(f"rank {rank} of {world}: stopped by torchrun (SIGTERM), which stops every rank when one "
                         "fails; rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
