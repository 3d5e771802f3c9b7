"""`crossdiff causal` (KL patching) and `crossdiff steer` (generation with latent directions)."""

from __future__ import annotations

import argparse

from crossdiff.devices import DEFAULT_DEVICE, DEVICE_HELP


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "causal",
        description="Patch the base residual with latents' chat-minus-base decoder contributions at the crosscoder's layer, "
        "run the rest of the chat model, and report KL(p_chat || p_patched) on assistant tokens (docs/causal.md).",
    )
    parser.add_argument("crosscoder", help="crosscoder folder or hub id")
    parser.add_argument("analysis_dir", help="the crosscoder's `crossdiff analyze` folder")
    source = parser.add_argument_group("conversations (exactly one)")
    source.add_argument("--conversations", help="full conversations: .jsonl/.parquet file, folder, saved or hub dataset")
    source.add_argument("--prompts", help="user prompts (.txt one per line, or jsonl/parquet) the chat model answers first")
    source.add_argument("--column", default="messages", help="messages column of --conversations (default messages)")
    source.add_argument("--split", default="train", help="dataset split (default train)")
    source.add_argument("--prompt-column", default="prompt", help="prompt column of a jsonl/parquet --prompts (default prompt)")
    source.add_argument("--max-new-tokens", type=int, default=64, help="answer length for --prompts (default 64)")
    source.add_argument("--limit", type=int, help="use only the first N conversations / prompts")
    parser.add_argument("--out", help="output folder (default: causal/ beside the analysis folder)")
    parser.add_argument("--base", help="base model (default: the crosscoder's)")
    parser.add_argument("--chat", help="chat model (default: the crosscoder's)")
    parser.add_argument("--layer", type=int, help="patched block; must be the crosscoder's (default: the crosscoder's)")
    parser.add_argument("--k-first", type=int, default=10, help="first assistant tokens per turn, template excluded (default 10)")
    parser.add_argument("--pool-size", type=int, default=100,
                        help="candidate pool when fewer latents are chat-only: the N most chat-leaning (default 100)")
    parser.add_argument("--random-seeds", type=int, default=3, help="random halves of the pool, averaged (default 3)")
    parser.add_argument("--latents", action="append", default=[], metavar="IDS_OR_QUERY",
                        help="an extra latent set: ids '3,17,42' or a pandas query on latents.parquet, e.g. "
                        "\"tag == 'chat-only' and template_share > 0.5\" (repeatable)")
    parser.add_argument("--compare", action="append", default=[], metavar="CAUSAL_DIR",
                        help="another crosscoder's causal folder, drawn beside this one in kl.png (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per batch (default 8)")
    parser.add_argument("--tokens-per-pass", type=int, default=16384,
                        help="conditions share an upper-half pass up to this many tokens (default 16384; lower it if memory runs out)")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens kept per conversation (default 1024)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)
    parser.add_argument("--model-dtype", default="float32", help="dtype the models run in (default float32)")
    parser.add_argument("--save-every", type=float, default=30.0, metavar="SECONDS",
                        help="save the scored batches (the resume point) at most this often (default 30; 0: after every batch)")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=_run_causal)


def _run_causal(args: argparse.Namespace) -> int:
    from crossdiff.causal.experiment import CausalConfig, run_causal

    config = CausalConfig(
        crosscoder=args.crosscoder, analysis_dir=args.analysis_dir, out=args.out, conversations=args.conversations,
        column=args.column, split=args.split, prompts=args.prompts, prompt_column=args.prompt_column,
        max_new_tokens=args.max_new_tokens, limit=args.limit, base=args.base, chat=args.chat, layer=args.layer,
        k_first=args.k_first, pool_size=args.pool_size, random_seeds=args.random_seeds, latents=args.latents, compare=args.compare,
        batch_size=args.batch_size, tokens_per_pass=args.tokens_per_pass, max_len=args.max_len, device=args.device, model_dtype=args.model_dtype,
        save_every_s=args.save_every,
    )
    run_causal(config, quiet=args.quiet)
    return 0
