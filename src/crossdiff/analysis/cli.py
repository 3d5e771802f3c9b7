"""`crossdiff analyze CROSSCODER CACHE --out DIR` (the latent table, Latent Scaling and examples)
and `crossdiff adl` (the activation-difference baseline) and `crossdiff inspect` (browse an analysis). Flags come from AnalysisConfig and
ADLConfig (crossdiff.cli_config); the few declared here keep older spellings."""

from __future__ import annotations

import argparse

from crossdiff.analysis.config import ADLConfig, AnalysisConfig
from crossdiff.cli_config import add_config_flags, check_required, config_data
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError

# The handlers import torch and pandas (the pipeline, adl) when they run: each --help stays fast.


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    _add_analyze(subparsers)
    _add_adl(subparsers)
    _add_inspect(subparsers)


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        description="Analyse every latent of a crosscoder on an activation cache. Writes latents.parquet, "
        "summary.json, twins.parquet and examples.sqlite into --out and prints a summary.",
    )
    p.add_argument("crosscoder", help="crosscoder checkpoint folder or hub id")
    p.add_argument("cache", help="paired activation cache folder (crossdiff collect)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--config", help="TOML/JSON file with AnalysisConfig keys, optionally in an [analyze] table (flags override it)")
    p.add_argument("--tokenizer", help="tokenizer for example text (default: the chat model named in the cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, AnalysisConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: these import torch and pandas; `crossdiff analyze --help` stays light
    from crossdiff.analysis.pipeline import analyze, load_tokenizer
    from crossdiff.analysis.read import AnalysisOutput
    from crossdiff.analysis.screen import end_screen
    from crossdiff.crosscoder import CrossCoder

    config = from_dict(AnalysisConfig, config_data(AnalysisConfig, args, "analyze"), source=args.config)
    cache = _open_cache(args.cache)
    crosscoder = CrossCoder.from_pretrained(args.crosscoder)
    tokenizer = None
    if config.examples:
        model_names = getattr(cache, "model_names", None) or crosscoder.config.model_names or [None, None]
        tokenizer = load_tokenizer(args.tokenizer or model_names[-1])
    result = analyze(crosscoder, cache, args.out, config, tokenizer=tokenizer, progress=not args.quiet)
    with AnalysisOutput(args.out) as output:
        print(end_screen([output]))
    print(f"wrote {', '.join(str(path) for path in result.files.values())}")
    return 0


def _open_cache(path: str):
    from crossdiff.cache.store import PairedCache  # deferred: imports torch, as above

    return PairedCache(path)


def _add_adl(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adl", description="Mean chat-minus-base residual difference at each of the first k positions of unrelated text, read "
                    "through both models' logit lens and used as a steering vector (docs/method.md 9).",
    )
    parser.add_argument("--crosscoder", help="take --base, --chat and --layer from this crosscoder")
    parser.add_argument("--docs", type=int, dest="max_docs", help="documents read (default 1000)")
    parser.add_argument("--top", type=int, dest="top_tokens", help="logit-lens tokens per position (default 10)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a chat prompt to steer on (repeatable)")
    parser.add_argument("--prompts", dest="prompts_file", help="file of prompts")
    parser.add_argument("--steer-position", type=int, action="append", dest="steer_positions",
                        help="position whose difference steers (default: 1..k-1)")
    parser.add_argument("--factor", type=float, action="append", dest="factors", help="steering factors (default 0.5 1 2)")
    parser.add_argument("--model", action="append", choices=["base", "chat"], dest="models", help="model(s) steered (default both)")
    add_config_flags(parser, ADLConfig)
    parser.set_defaults(func=run_adl_cli)


def run_adl_cli(args: argparse.Namespace) -> int:
    from crossdiff.analysis.adl import run_adl  # torch: deferred so that --help stays fast

    extra = {}
    if args.crosscoder:
        from crossdiff.crosscoder import CrossCoder  # torch, as above

        config = CrossCoder.from_pretrained(args.crosscoder).config
        names = config.model_names or [None, None]
        extra = {"base": names[0], "chat": names[1], "layer": config.layer}
    data = config_data(ADLConfig, args, "adl", extra={k: v for k, v in extra.items() if v is not None})
    if any(data.get(key) is None for key in ("base", "chat", "layer")):
        raise CrossdiffError("give --base, --chat and --layer, or a --crosscoder that records them")
    check_required(ADLConfig, data, "adl")
    run_adl(from_dict(ADLConfig, data))
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        description="Browse the output of crossdiff analyze. Without --latent/--search/--token/--summary it lists latents "
        "(--where, --tag, --verdict, --range, --sort) with each one's top context.",
    )
    p.add_argument("analysis", help="analysis folder (crossdiff analyze --out), or a run's crosscoder folder RUN/NAME")
    p.add_argument("--where", help="pandas query on any column, e.g. \"tag == 'chat-only' and nu_error < 0.2\"")
    p.add_argument("--tag", help="only latents with this tag")
    p.add_argument("--verdict", help="only latents with this verdict, e.g. chat-specific")
    p.add_argument("--range", action="append", default=[], metavar="COLUMN=LOW:HIGH",
                   help="only latents with LOW <= COLUMN <= HIGH (either side may be empty); repeatable")
    p.add_argument("--sort", default="dnorm", help="column to sort by (default dnorm)")
    p.add_argument("--ascending", action="store_true", help="smallest first")
    p.add_argument("--columns", help="comma-separated columns to show")
    p.add_argument("-n", "--limit", type=int, default=20, help="rows (or examples) to show (default 20)")
    p.add_argument("--latent", type=int, help="show this latent's examples")
    p.add_argument("--kind", choices=["top", "quantile", "all"], default="top", help="examples to show with --latent")
    p.add_argument("--search", help="examples whose text contains this string")
    p.add_argument("--token", help="rank latents by their activation on tokens matching this string")
    p.add_argument("--regex", action="store_true", help="--search/--token are regular expressions")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="highlight active tokens with colours (auto: on a terminal) or [brackets]")
    p.add_argument("--findings", action="store_true",
                   help="the findings in full: concepts from findings.json beside the analysis, or without it the analysis "
                   "summary (dnorm histogram, verdict counts, top latents by dnorm and by rank-sum)")
    p.add_argument("--summary", action="store_true",
                   help="reprint the end screen of analyze/run/demo; ANALYSIS may be a run folder (every crosscoder in it)")
    p.set_defaults(func=run_inspect_cli)


def run_inspect_cli(args: argparse.Namespace) -> int:
    from crossdiff.analysis.inspect import run  # pandas (and torch through the example store): deferred for --help

    return run(args)
