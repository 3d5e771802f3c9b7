"""`crossdiff adl`: the activation-difference baseline (Minder et al. 2025, "Narrow
finetuning leaves clearly readable traces").

No crosscoder: on unrelated text (pretraining-like documents), the residual stream after
block L of both models at each of the first k positions, and per position p the mean over
documents of the difference

    delta_p = mean_docs (h_chat[p] - h_base[p])                                  [d]

Each delta_p is read through both models' final norm and unembedding (logit lens): the
tokens it promotes most. And each is used as a steering vector, exactly as `crossdiff
steer` uses a latent direction: the unit direction delta_p / ||delta_p|| times the mean
residual norm of the chat model at that layer (over positions 1..k-1: position 0 is an
attention sink with massive norms) times a factor, added to the base or the chat model's
residual after block L while it answers chat prompts greedily. ``--expect`` counts the
answers showing a behaviour; ``--controls N`` steers N random directions of the same norm
the same way, as the baseline the counts must beat.

Outputs in OUT: ``adl.json`` (per position: ||delta_p||, the logit-lens tokens in each
model), ``differences.pt`` (the [k, d] means), ``adl_steering.jsonl`` (rows in steer's
format, ``latent`` naming the position, ``pos 2``, or the control, ``random 0``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from crossdiff.analysis.config import ADLConfig  # noqa: F401 (re-exported)
from crossdiff.causal.conversations import end_of_turn_ids, load_prompts
from crossdiff.causal.steer import format_match_counts, generate_steered
from crossdiff.errors import CrossdiffError
from crossdiff.files import write_atomic, write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.models import ResidualExtractor, load_model_pair
from crossdiff.terminal import printable

FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")


@torch.inference_mode()
def mean_differences(pair: Any, layer: int, documents: list[list[int]], k: int, batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """[k, d] float64 mean of h_chat - h_base per position over ``documents`` (token id lists of
    at least k tokens, cut to k), and the chat model's mean residual norm over positions 1..k-1."""
    docs = [doc[:k] for doc in documents if len(doc) >= k]
    if not docs:
        raise CrossdiffError(f"no document has {k} tokens: lower --positions or give longer texts")
    extract = ResidualExtractor(pair, layer)
    device = next(pair.chat.parameters()).device
    total, norm_sum, norm_count = None, 0.0, 0
    for start in range(0, len(docs), batch_size):
        ids = torch.tensor(docs[start:start + batch_size], device=device)  # equal lengths: no padding
        base, chat = extract(ids, torch.ones_like(ids))
        diff = (chat.double() - base.double()).sum(dim=0).cpu()
        total = diff if total is None else total + diff
        if k > 1:
            norms = chat[:, 1:].double().norm(dim=-1)
            norm_sum, norm_count = norm_sum + float(norms.sum()), norm_count + norms.numel()
    mean_norm = norm_sum / norm_count if norm_count else float(chat.double().norm(dim=-1).mean())
    return total / len(docs), mean_norm


def final_norm(model: Any) -> Any:
    """The model's norm before the unembedding (for the logit lens)."""
    for path in FINAL_NORM_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None:
            return module
    raise CrossdiffError(f"cannot find the final norm of {type(model).__name__} for the logit lens (tried {', '.join(FINAL_NORM_PATHS)})")


@torch.inference_mode()
def logit_lens(model: Any, tokenizer: Any, vector: torch.Tensor, top: int) -> list[str]:
    """The ``top`` tokens ``vector`` [d] promotes through the model's final norm and unembedding."""
    weight = next(model.parameters())
    hidden = final_norm(model)(vector.to(device=weight.device, dtype=weight.dtype)[None, None])
    logits = model.get_output_embeddings()(hidden)[0, 0].float()
    return [tokenizer.decode([int(i)]) for i in logits.topk(top).indices]


def run_adl(config: ADLConfig, *, pair: Any = None, quiet: bool = False) -> dict[str, Any]:
    if pair is None:
        pair = load_model_pair(config.base, config.chat, dtype=config.model_dtype, device=config.device)
    texts = load_prompts(config.texts, column="text", limit=config.max_docs)
    bos = [pair.tokenizer.bos_token_id] if pair.tokenizer.bos_token_id is not None else []
    documents = [bos + pair.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    deltas, mean_norm = mean_differences(pair, config.layer, documents, config.positions)
    out = Path(config.out)
    with output_lock(out, "adl"):
        write_atomic(out / "differences.pt", lambda tmp: torch.save(deltas.float(), tmp))
    summary = {"layer": config.layer, "positions": config.positions, "documents": len(documents), "mean_norm": mean_norm,
               "by_position": [{"position": p, "norm": float(deltas[p].norm()),
                                "lens_base": logit_lens(pair.base, pair.tokenizer, deltas[p], config.top_tokens),
                                "lens_chat": logit_lens(pair.chat, pair.tokenizer, deltas[p], config.top_tokens)}
                               for p in range(config.positions)]}
    with output_lock(out, "adl"):
        write_text_atomic(out / "adl.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if not quiet:
        for row in summary["by_position"]:
            print(printable(f"position {row['position']}: |delta| {row['norm']:.3g}; chat lens {row['lens_chat'][:6]}; "
                            f"base lens {row['lens_base'][:6]}"))

    prompts = list(config.prompts) + (load_prompts(config.prompts_file) if config.prompts_file else [])
    if not prompts:
        return summary
    steer_positions = config.steer_positions if config.steer_positions is not None else list(range(1, config.positions)) or [0]
    vectors = [(f"pos {p}", False, deltas[p] / deltas[p].norm().clamp_min(1e-12) * mean_norm) for p in steer_positions]
    generator = torch.Generator().manual_seed(config.seed)
    for i in range(config.controls):
        direction = torch.randn(deltas.shape[1], generator=generator, dtype=torch.float64)
        vectors.append((f"random {i}", True, direction / direction.norm() * mean_norm))

    pattern = re.compile(config.expect) if config.expect is not None else None
    shows = (lambda text: bool(pattern.search(text))) if pattern else (lambda text: None)
    stop = end_of_turn_ids(pair.tokenizer, pair.chat)
    rows = []
    for which in config.models:
        model = pair.base if which == "base" else pair.chat
        for name, is_control, vector in vectors:
            for prompt in prompts:
                unsteered, steered = generate_steered(model, pair.tokenizer, config.layer, prompt, vector.float(), config.factors,
                                                      max_new_tokens=config.max_new_tokens, stop_ids=stop)
                for factor, text in zip(config.factors, steered):
                    rows.append({"latent": f"{which}: {name}", "latents": [], "factor": float(factor), "model": which,
                                 "positions": "all", "prompt": prompt, "unsteered": unsteered, "steered": text,
                                 "control": is_control, "matches": shows(text), "unsteered_matches": shows(unsteered)})
    with output_lock(out, "adl"):
        write_text_atomic(out / "adl_steering.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary["steering_rows"] = len(rows)
    if not quiet and pattern is not None:
        print(format_match_counts(rows, config.expect))
    return summary
