"""`crossdiff analyze CROSSCODER CACHE --out DIR`: the latent table, Latent Scaling and examples."""

from __future__ import annotations

import argparse

from crossdiff.config import from_dict, load_section
from crossdiff.devices import DEVICE_HELP

# CLI flags that override the AnalysisConfig key of the same name (the flag's dest).
_OVERRIDES = ("batch_size", "max_tokens", "device", "dtype", "n_top", "twin_cosine")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        description="Analyse every latent of a crosscoder on an activation cache. Writes latents.parquet, "
        "summary.json, twins.parquet and examples.sqlite into --out and prints a summary.",
    )
    p.add_argument("crosscoder", help="crosscoder checkpoint folder or hub id")
    p.add_argument("cache", help="paired activation cache folder (crossdiff collect)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--config", help="TOML/JSON file with AnalysisConfig keys (flags override it)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-tokens", type=int, help="analyse only the first N tokens of the cache")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--n-top", type=int, help="max-activating examples per latent")
    p.add_argument("--twin-cosine", type=float, help="decoder cosine above which a base-only latent is a twin")
    p.add_argument("--no-examples", action="store_true", help="skip examples (one pass over the cache instead of three)")
    p.add_argument("--tokenizer", help="tokenizer for example text (default: the chat model named in the cache)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="analyse a cache from another layer or other models than the crosscoder's")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossdiff.analysis.pipeline import AnalysisConfig, analyze, load_tokenizer
    from crossdiff.analysis.table import format_summary
    from crossdiff.crosscoder import CrossCoder

    data = load_section(args.config, "analyze") if args.config else {}
    data.update({key: getattr(args, key) for key in _OVERRIDES if getattr(args, key) is not None})
    if args.no_examples:
        data["examples"] = False
    if args.allow_mismatch:
        data["allow_mismatch"] = True
    config = from_dict(AnalysisConfig, data, source=args.config)
    cache = _open_cache(args.cache)
    crosscoder = CrossCoder.from_pretrained(args.crosscoder)
    tokenizer = None
    if config.examples:
        model_names = getattr(cache, "model_names", None) or crosscoder.config.model_names or [None, None]
        tokenizer = load_tokenizer(args.tokenizer or model_names[-1])
    result = analyze(crosscoder, cache, args.out, config, tokenizer=tokenizer, progress=not args.quiet)
    print(format_summary(result.summary))
    print(f"wrote {', '.join(str(path) for path in result.files.values())}")
    return 0


def _open_cache(path: str):
    from crossdiff.cache.store import PairedCache

    return PairedCache(path)
