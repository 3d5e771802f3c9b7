"""`crossdiff steer`: generate with latent directions added to the residual stream.

A steering vector is the sum, over the chosen latents, of the unit chat decoder direction
times the latent's largest activation (``max_act`` of the latent table, scaled units),
mapped into model space (divided by the chat input scale), times a factor. It is added to
the base or the chat model's residual after the crosscoder's block, at every position or
at the prompt's positions only, while the model answers a chat prompt greedily. Each
prompt is answered once unsteered and once per factor, in one batch (same length, no
padding). Results go to ``steering.jsonl`` in the causal folder, one row per latent set x
factor x prompt: latent, latents, factor, model, positions, prompt, unsteered, steered.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.causal.conditions import user_set
from crossdiff.errors import CrossdiffError

DEFAULT_FACTORS = (-0.5, 0.5, 1.0, 1.5)


@dataclass
class SteerConfig:
    crosscoder: str
    analysis_dir: str
    latents: list[str]
    """Latent sets, each ``"ID[,ID...]"`` steered together (or a pandas query on the latent table)."""
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    factors: list[float] = field(default_factory=lambda: list(DEFAULT_FACTORS))
    model: str = "base"
    """Which model is steered and generates: base or chat."""
    positions: str = "all"
    """all (prompt and every generated token) or prompt (the prompt's positions only)."""
    max_new_tokens: int = 32
    out: str | None = None
    """steering.jsonl path; default: causal/steering.jsonl beside the analysis folder."""
    base: str | None = None
    chat: str | None = None
    layer: int | None = None
    device: str = "cpu"
    model_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model not in ("base", "chat"):
            raise CrossdiffError(f"--model must be base or chat, got {self.model!r}")
        if self.positions not in ("all", "prompt"):
            raise CrossdiffError(f"--positions must be all or prompt, got {self.positions!r}")
        if not self.latents:
            raise CrossdiffError("give at least one --latent")
        if not self.factors:
            raise CrossdiffError("give at least one --factor")
        if self.max_new_tokens < 1:
            raise CrossdiffError("--max-new-tokens must be at least 1")


def steering_vector(crosscoder: Any, table: Any, latents: np.ndarray) -> torch.Tensor:
    """Sum of unit chat decoder directions x max activation, in the chat model's space [d]."""
    W_chat = crosscoder.W_dec.detach().float()[:, 1]
    max_act = table.set_index("latent")["max_act"]
    vector = torch.zeros(W_chat.shape[1], device=W_chat.device)
    for j in latents.tolist():
        norm = float(W_chat[j].norm())
        if norm == 0:
            raise CrossdiffError(f"latent {j} has no chat decoder direction (its chat decoder vector is zero)")
        if not float(max_act[j]) > 0:
            raise CrossdiffError(f"latent {j} never activated in the analysis (max_act {max_act[j]}); nothing to steer with")
        vector += W_chat[j] / norm * float(max_act[j])
    return vector / crosscoder.input_scale.float()[1]


@torch.inference_mode()
def generate_steered(model: Any, tokenizer: Any, layer: int, prompt: str, vector: torch.Tensor, factors: list[float], *,
                     positions: str = "all", max_new_tokens: int = 32, stop_ids: list[int]) -> tuple[str, list[str]]:
    """Greedy answers to one chat prompt: unsteered, then one per factor (one batch)."""
    from crossdiff.models import decoder_layers

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]).repeat(len(factors) + 1, 1)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    scales = torch.tensor([0.0, *factors], device=device, dtype=dtype)[:, None, None]
    push = scales * vector.to(device=device, dtype=dtype)
    calls = [0]

    def add(module: Any, args: Any, output: Any) -> Any:
        calls[0] += 1
        if positions == "prompt" and calls[0] > 1:  # after the prefill, only generated tokens pass by
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + push
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(add)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    finally:
        handle.remove()
    texts = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return texts[0], texts[1:]


def run_steer(config: SteerConfig, *, pair: Any = None, quiet: bool = False) -> list[dict[str, Any]]:
    """Steer every latent set with every factor on every prompt; write and return the rows."""
    from crossdiff.causal.conversations import end_of_turn_ids, load_prompts
    from crossdiff.causal.experiment import read_analysis, resolve_layer, resolve_models
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.models import load_model_pair

    crosscoder = CrossCoder.from_pretrained(config.crosscoder)
    table, _ = read_analysis(config.analysis_dir, crosscoder)
    layer = resolve_layer(crosscoder, config.layer)
    base_name, chat_name = resolve_models(crosscoder, config.base, config.chat)
    groups = [user_set(table, spec, crosscoder.config.d_sae, name=spec) for spec in config.latents]
    vectors = [steering_vector(crosscoder, table, g.latents) for g in groups]
    prompts = list(config.prompts) + (load_prompts(config.prompts_file) if config.prompts_file else [])
    if not prompts:
        raise CrossdiffError("give at least one --prompt (or --prompts FILE)")
    out = Path(config.out) if config.out else Path(config.analysis_dir).resolve().parent / "causal" / "steering.jsonl"
    if pair is None:
        pair = load_model_pair(base_name, chat_name, dtype=config.model_dtype, device=config.device)
    model = pair.base if config.model == "base" else pair.chat
    stop = end_of_turn_ids(pair.tokenizer, pair.chat)

    rows = []
    for group, vector in zip(groups, vectors):
        latent: Any = int(group.latents[0]) if len(group.latents) == 1 else group.latents.tolist()
        for prompt in prompts:
            unsteered, steered = generate_steered(model, pair.tokenizer, layer, prompt, vector, config.factors,
                                                  positions=config.positions, max_new_tokens=config.max_new_tokens, stop_ids=stop)
            for factor, text in zip(config.factors, steered):
                rows.append({"latent": latent, "latents": group.latents.tolist(), "factor": float(factor), "model": config.model,
                             "positions": config.positions, "prompt": prompt, "unsteered": unsteered, "steered": text})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{uuid.uuid4().hex[:8]}.{out.name}")
    try:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if not quiet:
        print(format_steering(rows))
        print(f"saved {len(rows)} rows to {out}")
    return rows


def format_steering(rows: list[dict[str, Any]], width: int = 56) -> str:
    """Unsteered and steered answers side by side, per latent set, prompt and factor."""
    lines = []
    seen = set()
    for row in rows:
        key = (str(row["latent"]), row["prompt"])
        if key not in seen:
            seen.add(key)
            lines += ["", f"latent {row['latent']} into the {row['model']} model ({row['positions']} positions); prompt: {row['prompt']!r}",
                      f"  {'factor':>6s}  {'unsteered':{width}s}  steered"]
        left = textwrap.shorten(row["unsteered"], width, placeholder="...") or "(empty)"
        right = textwrap.shorten(row["steered"], width, placeholder="...") or "(empty)"
        lines.append(f"  {row['factor']:>6g}  {left:{width}s}  {right}")
    return "\n".join(lines)


def add_steer_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "steer",
        help="generate with latent directions added to the base or chat residual stream",
        description="Add the latents' unit chat decoder directions x max activation x factor to a model's residual after "
        "the crosscoder's block, generate greedy answers to chat prompts, and show them beside the unsteered answers.",
    )
    parser.add_argument("crosscoder")
    parser.add_argument("analysis_dir")
    parser.add_argument("--latent", action="append", required=True, metavar="ID[,ID...]",
                        help="latents steered together (repeat for several sets)")
    parser.add_argument("--prompt", action="append", default=[], help="a user prompt (repeatable)")
    parser.add_argument("--prompts", dest="prompts_file", help="file of prompts (.txt one per line, or jsonl column prompt)")
    parser.add_argument("--factor", type=float, nargs="+", default=list(DEFAULT_FACTORS), help="scales (default -0.5 0.5 1 1.5)")
    parser.add_argument("--model", default="base", choices=["base", "chat"], help="steered model (default base)")
    parser.add_argument("--positions", default="all", choices=["all", "prompt"], help="steer all positions or the prompt's only")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", help="jsonl file (default: causal/steering.jsonl beside the analysis folder)")
    parser.add_argument("--base")
    parser.add_argument("--chat")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-dtype", default="float32")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=_run_steer_cli)


def _run_steer_cli(args: argparse.Namespace) -> int:
    config = SteerConfig(crosscoder=args.crosscoder, analysis_dir=args.analysis_dir, latents=args.latent, prompts=args.prompt,
                         prompts_file=args.prompts_file, factors=args.factor, model=args.model, positions=args.positions,
                         max_new_tokens=args.max_new_tokens, out=args.out, base=args.base, chat=args.chat, layer=args.layer,
                         device=args.device, model_dtype=args.model_dtype)
    run_steer(config, quiet=args.quiet)
    return 0
