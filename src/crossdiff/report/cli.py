"""`crossdiff report RUN [--out DIR]` and `crossdiff plot RUN [--out DIR]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        description="Write a self-contained folder (index.html + assets) with the overview, the paper's figures, "
        "a sortable and filterable latent table and a panel per latent with its examples, for every analysis "
        "in RUN (RUN/<name>/analysis/), a crosscoder folder or an analysis folder.",
    )
    p.add_argument("path", metavar="RUN_OR_ANALYSIS_DIR")
    p.add_argument("-o", "--out", help="output folder (default: RUN/report)")
    p.add_argument("--figures-only", action="store_true", help="write only the figures (PNG + SVG)")
    p.set_defaults(func=_run_report)

    p = subparsers.add_parser(
        "plot",
        description="Write the figures of every analysis in RUN as OUT/<name>/<figure>.png and .svg.",
    )
    p.add_argument("path", metavar="RUN_OR_ANALYSIS_DIR")
    p.add_argument("-o", "--out", help="output folder (default: RUN/report/figures)")
    p.set_defaults(func=_run_plot)


def _run_report(args: argparse.Namespace) -> int:
    # deferred: imports torch and matplotlib; `crossdiff report --help` stays light
    from crossdiff.report.build import build_report, default_out

    if args.figures_only:
        out = Path(args.out) if args.out else default_out(Path(args.path)) / "figures"
        build_report(args.path, out, figures_only=True)
        return 0
    index = build_report(args.path, args.out)
    print(f"wrote {index}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    args.figures_only = True
    return _run_report(args)
