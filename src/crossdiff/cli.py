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

from crossdiff import __version__
from crossdiff.errors import CrossdiffError
from crossdiff.terminal import printable

# Every command: the module whose ``add_cli(subparsers)`` defines it, and its one-line
# summary. The summaries live here, not in the modules, so that `crossdiff --help` lists
# every command without importing any stage (and with it torch); `crossdiff CMD ...`
# imports the one module it needs. Order: as `crossdiff --help` lists them.
COMMANDS = {
    "behaviour": ("crossdiff.causal.cli", "the behavioural diff: both models' answers per prompt, ranked by base-to-chat KL"),
    "collect": ("crossdiff.collect.cli", "run base and chat models on texts and cache paired activations"),
    "train": ("crossdiff.train.cli", "train a crosscoder on a paired activation cache"),
    "analyze": ("crossdiff.analysis.cli", "per-latent table, Latent Scaling, max-activating examples"),
    "explain": ("crossdiff.autointerp.cli", "LLM explanations and detection scores for latents (autointerp)"),
    "inspect": ("crossdiff.analysis.cli", "browse an analysis: list/sort/filter latents, show examples, search, rank by token"),
    "report": ("crossdiff.report.cli", "a static HTML report of the analyses (opens from disk, no server)"),
    "plot": ("crossdiff.report.cli", "the paper's figures as PNG and SVG"),
    "organism": ("crossdiff.organism.cli", "the bundled base/chat model pair with planted chat behaviours"),
    "causal": ("crossdiff.causal.cli", "KL patching: how much of the base-to-chat gap do chosen latents close?"),
    "steer": ("crossdiff.causal.cli", "generate with latent directions added to the base or chat residual stream"),
    "demo": ("crossdiff.run.demo", "the whole pipeline on the bundled base/chat model organism (CPU, minutes)"),
    "run": ("crossdiff.run.stages", "run a whole recipe: collect (or stream), train, analyze; finished stages are skipped"),
    "adl": ("crossdiff.analysis.cli", "activation-difference baseline: mean chat-minus-base residual on the first tokens of text"),
    "score": ("crossdiff.organism.score", "grade a run's findings against planted truth"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `crossdiff`; of the commands, only the one ``argv`` names is built in full
    (all of them when ``argv`` is None), the others are listed by their summary."""
    parser = argparse.ArgumentParser(
        prog="crossdiff",
        description="Model diffing with crosscoders: what did chat fine-tuning change?",
    )
    parser.add_argument("--version", action="version", version=f"crossdiff {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if argv is None else {a for a in argv[:1] if a in COMMANDS}
    added: set[str] = set()
    for name, (module, summary) in COMMANDS.items():
        if name in wanted and name not in added:
            importlib.import_module(module).add_cli(_Summarised(subparsers, wanted, added))
        if name not in added:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


class _Summarised:
    """The subparsers as a module's ``add_cli`` sees them: each command gets its summary from
    COMMANDS; a command the caller did not ask for (a module may define two) is built aside."""

    def __init__(self, subparsers: argparse._SubParsersAction, wanted: set[str], added: set[str]):
        self.subparsers, self.wanted, self.added = subparsers, wanted, added

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name not in self.wanted:
            return argparse.ArgumentParser(prog=f"crossdiff {name}")
        self.added.add(name)
        return self.subparsers.add_parser(name, help=COMMANDS[name][1], **kwargs)


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    try:
        parser = build_parser(sys.argv[1:] if argv is None else argv)
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
