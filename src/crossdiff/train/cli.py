"""`crossdiff train`: a crosscoder from a cache, from a stream of the two models, or from
planted-feature toy data. Flags map onto :class:`TrainConfig` (``--config``, ``--set``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from crossdiff.cli_config import add_config_flags, config_data
from crossdiff.config import apply_overrides, from_dict, load_file, load_section, merge
from crossdiff.errors import CrossdiffError
from crossdiff.recipe import load_recipe
from crossdiff.train.config import TrainConfig

# The handlers import torch (through the trainer, the loader and the cache) when they run,
# not at import: `crossdiff train --help` builds its flags from TrainConfig in well under a second.

SYNTHETIC_DEFAULTS = {
    "steps": 3000, "lr": 3e-3, "warmup_steps": 100, "expansion_factor": 4, "k": 4, "batch_size": 512,
    "threshold_start_step": 100, "dead_after_tokens": 50_000, "log_every": 100, "checkpoint_every": 1000,
}


def build_config(config_file: str | None, overrides: list[str], defaults: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults, then a TOML/JSON file (keys at the top level or in a
    [train] table), then ``key=value`` overrides (dotted keys reach [data])."""
    data: dict[str, Any] = dict(defaults or {})
    if config_file:
        data = merge(data, load_section(config_file, "train"))
    return from_dict(TrainConfig, apply_overrides(data, overrides))


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        description="Train a crosscoder (docs/method.md 3). Resumes automatically from OUT/checkpoints.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="activation cache folder written by `crossdiff collect`")
    source.add_argument("--synthetic", action="store_true", help="planted-feature toy data (quick end-to-end check)")
    source.add_argument("--stream", action="store_true",
                        help="no cache: run the models of --config's [collect] table and train from a shuffle buffer (docs/streaming.md)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, metrics.jsonl, crosscoder/)")
    parser.add_argument("--config", help="TOML or JSON file of training options (keys at the top level or in a [train] table); "
                        "with --stream, the recipe")
    parser.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (default: resume if any)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(parser, TrainConfig)
    parser.set_defaults(func=run_cli)


def config_from_cli(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults, --config (its [train] table), the field flags and --set."""
    return from_dict(TrainConfig, config_data(TrainConfig, args, "train", defaults=defaults))


def run_cli(args: argparse.Namespace) -> int:
    if args.synthetic:
        return _train_synthetic(args)
    if args.stream:
        return _train_streamed(args)
    from crossdiff.cache.store import PairedCache  # torch: see the comment at the imports
    # deferred: these import torch, as above
    from crossdiff.train.loader import loader_from_config
    from crossdiff.train.trainer import Trainer

    config = config_from_cli(args)
    cache = PairedCache(args.cache)
    loader = loader_from_config(cache, config)
    if config.data.epochs is None and config.steps is None:
        raise CrossdiffError("an endless loader (data.epochs = null) needs 'steps'")
    trainer = Trainer(
        config, cache.d_model, args.out,
        model_names=list(cache.model_names), layer=cache.layer, input_scale=loader.normalization,
        token_filter=loader.token_filter, quiet=args.quiet,
    )
    if trainer.is_main and not args.quiet:
        print(f"train: {loader.left_out.line()} per pass", file=sys.stderr)
    trainer.fit(loader, resume=True if args.resume else "auto")
    if not trainer.is_main:
        return 0
    print(f"crosscoder written to {Path(args.out) / 'crosscoder'} ({trainer.step} steps, {trainer.tokens:,} tokens)")
    return 0


def _train_synthetic(args: argparse.Namespace) -> int:
    from crossdiff.synthetic import SyntheticConfig, SyntheticPair  # torch: see the comment at the imports
    # deferred: these import torch, as above
    from crossdiff.train.distributed import split_batches
    from crossdiff.train.trainer import Trainer, synthetic_recovery

    config = config_from_cli(args, SYNTHETIC_DEFAULTS)
    pair = SyntheticPair(SyntheticConfig(seed=config.seed))
    trainer = Trainer(config, pair.config.d_in, args.out, model_names=["synthetic-base", "synthetic-chat"], quiet=args.quiet)
    batches = pair.batches(config.batch_size, seed=config.seed + 1)
    if trainer.data_parallel is not None:  # every rank draws the global batch and keeps its rows
        batches = split_batches(batches, trainer.data_parallel.rank, trainer.data_parallel.world_size)
    model = trainer.fit(batches, resume=True if args.resume else "auto")
    if not trainer.is_main:
        return 0
    summary = synthetic_recovery(model, pair)
    print(
        f"recovered {summary['recovered']:.0%} of planted features (best decoder cosine > 0.9); "
        f"relative decoder norm of chat-only features {summary['dnorm_chat_only']:.2f}, shared {summary['dnorm_shared']:.2f}"
    )
    print(f"crosscoder written to {Path(args.out) / 'crosscoder'}")
    return 0


def _train_streamed(args: argparse.Namespace) -> int:
    """`crossdiff train --stream --config RECIPE --out DIR`: texts and models from the recipe's [collect]."""
    from crossdiff.train.stream import train_streaming  # torch: see the comment at the imports

    if not args.config:
        raise CrossdiffError("train --stream needs --config RECIPE (its [collect] table names the models and texts)")
    has_run_out = isinstance(load_file(args.config).get("run"), dict) and "out" in load_file(args.config)["run"]
    recipe = load_recipe(args.config, out=None if has_run_out else str(Path(args.out).parent))
    config = config_from_cli(args)
    trainer_out = Path(args.out)
    train_streaming(recipe.collect, recipe.stream, config, trainer_out,
                    quiet=args.quiet, resume=True if args.resume else "auto")
    print(f"crosscoder written to {trainer_out / 'crosscoder'}")
    return 0
