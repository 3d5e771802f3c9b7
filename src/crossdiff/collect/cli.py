"""`crossdiff collect`: flags from CollectConfig (crossdiff.cli_config), plus --source specs,
--heldout and --verify. torch is imported by the handler (through the collector), not here,
so that `crossdiff collect --help` stays fast."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from crossdiff.cli_config import add_config_flags, config_data
from crossdiff.collect.config import CollectConfig
from crossdiff.config import from_dict
from crossdiff.errors import CrossdiffError


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collect",
        description=(
            "Collect paired residual-stream activations into a sharded cache. Options come from a "
            "recipe (--config, a TOML/JSON file with the CollectConfig keys, optionally in a [collect] "
            "table) and/or flags; flags win. Rerunning the same command resumes an interrupted run."
        ),
    )
    parser.add_argument("--config", help="recipe file (.toml or .json)")
    parser.add_argument(
        "--source", action="append", dest="sources", type=_parse_source, metavar="NAME:KIND:PATH[:COLUMN]",
        help="a text source, e.g. fineweb:text:HuggingFaceFW/fineweb, lmsys:chat:chats.jsonl:conversation or "
        "own:answers:prompts.txt (the chat model answers the prompts; docs/models-and-texts.md) "
        "(repeatable; replaces the recipe's sources)",
    )
    parser.add_argument("--heldout", action="store_const", const="heldout", dest="part",
                        help="with --holdout: collect the held-out documents instead of the training ones (--part heldout)")
    parser.add_argument("--verify", metavar="CACHE", help="only check an existing cache's checksums and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    add_config_flags(parser, CollectConfig)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from crossdiff.cache.store import PairedCache  # torch: deferred so that --help stays fast
    from crossdiff.collect.collector import collect  # deferred: imports torch, as above

    if args.verify:
        cache = PairedCache(args.verify, verify=True, allow_incomplete=True)
        state = "complete" if cache.manifest["complete"] else "incomplete"
        print(f"ok: {cache.n_tokens:,} tokens in {len(cache.shards)} shards verified ({state})")
        return 0
    print(collect(config_from_args(args), quiet=args.quiet))  # the result: printed whatever --quiet
    return 0


def config_from_args(args: argparse.Namespace) -> CollectConfig:
    data = config_data(CollectConfig, args, "collect")
    for key, env in (("rank", "RANK"), ("world_size", "WORLD_SIZE")):
        if key not in data and env in os.environ:
            if not os.environ[env].isdigit():
                raise CrossdiffError(f"environment variable {env}={os.environ[env]!r} is not a non-negative integer")
            data[key] = int(os.environ[env])
    missing = [k for k in ("base", "chat", "layer", "sources", "out") if k not in data]
    if missing and set(data) - {f.name for f in dataclasses.fields(CollectConfig)}:
        from_dict(CollectConfig, data)  # a typo explains the missing key better: report it first
    if missing:
        flag_names = ", ".join("--source" if k == "sources" else "--" + k.replace("_", "-") for k in missing)
        raise CrossdiffError(f"collect needs {flag_names} (as flags or in --config)")
    return from_dict(CollectConfig, data)


def _parse_source(spec: str) -> dict[str, Any]:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise CrossdiffError(f"--source {spec!r}: expected NAME:KIND:PATH or NAME:KIND:PATH:COLUMN")
    if parts[1] not in ("text", "chat", "answers"):
        raise CrossdiffError(f"--source {spec!r}: KIND must be 'text', 'chat' or 'answers', got {parts[1]!r}")
    source = {"name": parts[0], "kind": parts[1], "path": parts[2]}
    if len(parts) == 4:
        source["column"] = parts[3]
    elif parts[1] != "text":
        source["column"] = {"chat": "messages", "answers": "prompt"}[parts[1]]
    return source
