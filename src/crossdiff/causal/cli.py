"""`crossdiff causal` (KL patching), `crossdiff steer` (generation with latent directions) and
`crossdiff behaviour` (the behavioural diff). Flags come from CausalConfig, SteerConfig and
BehaviourConfig (crossdiff.cli_config); the few declared here keep older spellings. The
handlers import torch (the experiments) when they run, so that each --help stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from crossdiff.causal.config import BehaviourConfig, CausalConfig, SteerConfig
from crossdiff.cli_config import add_config_flags, config_from_args
from crossdiff.errors import CrossdiffError


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    _add_causal(subparsers)
    _add_steer(subparsers)
    _add_behaviour(subparsers)


def _add_causal(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "causal",
        description="Patch the base residual with latents' chat-minus-base decoder contributions at the crosscoder's layer, "
        "run the rest of the chat model, and report KL(p_chat || p_patched) on assistant tokens (docs/causal.md). "
        "Give exactly one of --conversations and --prompts.",
    )
    parser.add_argument("crosscoder", help="crosscoder folder or hub id")
    parser.add_argument("analysis_dir", help="the crosscoder's `crossdiff analyze` folder")
    parser.add_argument("--latents", action="append", metavar="IDS_OR_QUERY",
                        help="an extra latent set: ids '3,17,42' or a pandas query on latents.parquet, e.g. "
                        "\"tag == 'chat-only' and template_share > 0.5\" (repeatable)")
    parser.add_argument("--compare", action="append", metavar="CAUSAL_DIR",
                        help="another crosscoder's causal folder, drawn beside this one in kl.png (repeatable)")
    parser.add_argument("--save-every", type=float, dest="save_every_s", metavar="SECONDS",
                        help="save the scored batches (the resume point) at most this often (default 30; 0: after every batch)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the KL table is still printed)")
    add_config_flags(parser, CausalConfig)
    parser.set_defaults(func=run_causal_cli)


def run_causal_cli(args: argparse.Namespace) -> int:
    from crossdiff.analysis.screen import causal_screen  # torch, pandas: deferred so that --help stays fast
    from crossdiff.causal.experiment import run_causal

    result = run_causal(config_from_args(CausalConfig, args, "causal"), quiet=args.quiet)
    print(causal_screen(result.table, result.summary, result.files["summary"].parent))  # --quiet hides progress, never this
    return 0


def _add_steer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "steer",
        description="Add the latents' unit chat decoder directions x max activation x factor to a model's residual after "
        "the crosscoder's block, generate greedy answers to chat prompts, and show them beside the unsteered answers.",
    )
    parser.add_argument("crosscoder", help="crosscoder folder or hub id")
    parser.add_argument("analysis_dir", help="the crosscoder's `crossdiff analyze` folder")
    parser.add_argument("--latent", action="append", required=True, dest="latents", metavar="ID[,ID...]",
                        help="latents steered together (repeat for several sets)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a user prompt (repeatable)")
    parser.add_argument("--prompts", dest="prompts_file", help="file of prompts (.txt one per line, or jsonl column prompt)")
    parser.add_argument("--factor", type=float, nargs="+", dest="factors", help="scales (default -0.5 0.5 1 1.5)")
    parser.add_argument("--model", choices=["base", "chat"], help="steered model (default base)")
    parser.add_argument("--positions", choices=["all", "prompt"], help="steer all positions or the prompt's only (default all)")
    parser.add_argument("--quiet", action="store_true", help="accepted for symmetry: steer shows no progress, and its answers are always printed")
    add_config_flags(parser, SteerConfig)
    parser.set_defaults(func=run_steer_cli)


def run_steer_cli(args: argparse.Namespace) -> int:
    from crossdiff.causal.steer import format_steering_result, run_steer  # torch: deferred so that --help stays fast

    config = config_from_args(SteerConfig, args, "steer")
    rows = run_steer(config)
    print(format_steering_result(rows, config))  # --quiet hides progress, never this
    return 0


def _add_behaviour(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "behaviour",
        description="Both models answer every prompt greedily; prompts are ranked by KL(chat || base) on the chat "
        "model's answer tokens (docs/behaviour.md). With only RUN, reprints a run's saved diff.",
    )
    parser.add_argument("out", metavar="RUN", help="run folder: behaviour_diff.jsonl/json are written (or read) there")
    parser.add_argument("--base", help="base model (as for collect)")
    parser.add_argument("--chat", help="chat model")
    add_config_flags(parser, BehaviourConfig)
    parser.set_defaults(func=run_behaviour_cli)


def run_behaviour_cli(args: argparse.Namespace) -> int:
    from crossdiff.causal.behaviour import SUMMARY, format_behaviour, read_behaviour, run_behaviour  # torch: as above

    config = config_from_args(BehaviourConfig, args, "behaviour")
    if args.base is None and args.chat is None and config.prompts is None:
        saved = read_behaviour(args.out)
        if saved is None:
            raise CrossdiffError(f"{args.out} has no {SUMMARY}; give --base, --chat and --prompts to compute one")
        print(format_behaviour(*saved, saved[1].get("settings", {}).get("prompt_set", "")))
        return 0
    if args.base is None or args.chat is None or config.prompts is None:
        raise CrossdiffError("behaviour needs --base, --chat and --prompts (or only RUN, to reprint a saved diff)")
    run_behaviour(config, Path(args.out), base=args.base, chat=args.chat)
    return 0
