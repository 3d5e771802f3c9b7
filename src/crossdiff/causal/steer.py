"""`crossdiff steer`: generate with latent directions added to the residual stream.

A steering vector is the sum, over the chosen latents, of the unit chat decoder direction
times the latent's largest activation (``max_act`` of the latent table, scaled units),
mapped into model space (divided by the chat input scale), times a factor. It is added to
the base or the chat model's residual after the crosscoder's block, at every position or
at the prompt's positions only, while the model answers a chat prompt greedily. Each
prompt is answered once unsteered and once per factor, in one batch (same length, no
padding). Results go to ``steering.jsonl`` in the causal folder, one row per latent set x
factor x prompt: latent, latents, factor, model, positions, prompt, unsteered, steered,
control, matches, unsteered_matches.

A steered text is only evidence if random directions do not do the same: a model that
already knows a behaviour may fall into it under any push. ``--expect REGEX`` counts the
answers that show the behaviour, and ``--controls N`` steers N random live latents of the
same crosscoder the same way (sets as large as the largest chosen set), so the counts can
be compared.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdiff.causal.activation_steer import generate_with_latents
from crossdiff.causal.conditions import Conditions, user_set
from crossdiff.causal.config import DEFAULT_FACTORS, SteerConfig  # noqa: F401 (re-exported)
from crossdiff.causal.conversations import end_of_turn_ids, load_prompts, user_prompt_ids
from crossdiff.causal.experiment import read_analysis, resolve_layer, resolve_models
from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError
from crossdiff.files import write_text_atomic
from crossdiff.locks import output_lock
from crossdiff.models import ResidualExtractor, decoder_layers, load_model_pair
from crossdiff.terminal import printable, quoted


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
def answer_start_contrast(crosscoder: Any, pair: Any, prompts: list[str], others: list[str], *, layer: int | None = None) -> Any:
    """Latents ranked by how much more they fire where the models start answering ``prompts`` than ``others``.

    A chat model decides how to answer (refuse, introduce itself, ...) at the last position of
    the rendered prompt, the one that predicts the answer's first token. Each prompt is
    rendered with the chat template and its generation prompt, both models' residuals at
    that position are encoded, and the table gives each latent's mean scaled activation on
    ``prompts`` (``mean``), on ``others`` (``mean_others``) and their difference
    (``contrast``), largest contrast first: a way to find the latents of a behaviour to steer.
    """
    layer = crosscoder.config.layer if layer is None else layer
    if layer is None:
        raise CrossdiffError("the crosscoder does not record its layer; give layer=")
    if not prompts or not others:
        raise CrossdiffError("give at least one prompt on each side of the contrast")
    extract = ResidualExtractor(pair, layer)
    device = next(pair.chat.parameters()).device

    def mean_activation(texts: list[str]) -> torch.Tensor:
        total = torch.zeros(crosscoder.config.d_sae, dtype=torch.float64)
        for prompt in texts:  # one at a time: no padding to get wrong, and prompts are few
            ids = torch.tensor([user_prompt_ids(pair.tokenizer, prompt)], device=device)
            base, chat = extract(ids, torch.ones_like(ids))
            x = torch.stack([base[0, -1], chat[0, -1]])
            x = crosscoder.normalize(x[None].to(crosscoder.W_enc.device, crosscoder.W_enc.dtype))
            total += crosscoder.get_activations(x)[0].double().cpu()
        return total / len(texts)

    mean, mean_others = mean_activation(prompts), mean_activation(others)
    table = pd.DataFrame({"latent": range(len(mean)), "contrast": (mean - mean_others).numpy(),
                          "mean": mean.numpy(), "mean_others": mean_others.numpy()})
    return table.sort_values("contrast", ascending=False, kind="stable").reset_index(drop=True)


@torch.inference_mode()
def generate_steered(model: Any, tokenizer: Any, layer: int, prompt: str, vector: torch.Tensor, factors: list[float], *,
                     positions: str = "all", max_new_tokens: int = 32, stop_ids: list[int]) -> tuple[str, list[str]]:
    """Greedy answers to one chat prompt: unsteered, then one per factor (one batch)."""
    ids = torch.tensor([user_prompt_ids(tokenizer, prompt)]).repeat(len(factors) + 1, 1)
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


def control_sets(crosscoder: Any, table: Any, n: int, size: int, exclude: set[int], seed: int = 0) -> list[np.ndarray]:
    """``n`` disjoint sets of ``size`` random latents that can be steered (active in the analysis,
    a chat decoder direction), none in ``exclude``: a control must push as many directions as
    the set it is compared with, or a larger push alone could explain the difference."""
    norms = crosscoder.W_dec.detach().float()[:, 1].norm(dim=-1).cpu().numpy()
    usable = [int(j) for j, act in zip(table["latent"], table["max_act"]) if act > 0 and norms[j] > 0 and int(j) not in exclude]
    if len(usable) < n * size:
        raise CrossdiffError(f"--controls {n}: only {len(usable)} other latents were active in the analysis "
                             f"({n * size} needed for sets of {size})")
    drawn = np.random.default_rng(seed).choice(usable, size=n * size, replace=False)
    return [np.sort(drawn[i * size:(i + 1) * size]) for i in range(n)]


def run_steer(config: SteerConfig, *, pair: Any = None) -> list[dict[str, Any]]:
    """Steer every latent set with every factor on every prompt; write and return the rows
    (:func:`format_steering_result` shows them)."""
    crosscoder = CrossCoder.from_pretrained(config.crosscoder)
    table, _ = read_analysis(config.analysis_dir, crosscoder)
    layer = resolve_layer(crosscoder, config.layer)
    base_name, chat_name = resolve_models(crosscoder, config.base, config.chat)
    groups = [user_set(table, spec, crosscoder.config.d_sae, name=spec) for spec in config.latents]
    chosen = {int(j) for g in groups for j in g.latents}
    size = max(len(g.latents) for g in groups)
    controls = control_sets(crosscoder, table, config.controls, size, chosen, config.seed) if config.controls else []
    sets = [(g.latents, False) for g in groups] + [(latents, True) for latents in controls]
    prompts = list(config.prompts) + (load_prompts(config.prompts_file) if config.prompts_file else [])
    if not prompts:
        raise CrossdiffError("give at least one --prompt (or --prompts FILE)")
    out = steering_path(config)
    if pair is None:
        pair = load_model_pair(base_name, chat_name, dtype=config.model_dtype, device=config.device)
    model = pair.base if config.model == "base" else pair.chat
    stop = end_of_turn_ids(pair.tokenizer, pair.chat)

    pattern = re.compile(config.expect) if config.expect is not None else None
    shows = (lambda text: bool(pattern.search(text))) if pattern else (lambda text: None)
    answers = _steerer(config, crosscoder, table)(sets, pair, model, layer, stop, prompts)
    rows = []
    for (latents, is_control), per_prompt in zip(sets, answers):
        latent: Any = int(latents[0]) if len(latents) == 1 else latents.tolist()
        for prompt, (unsteered, steered) in zip(prompts, per_prompt):
            for factor, text in zip(config.factors, steered):
                rows.append({"latent": latent, "latents": latents.tolist(), "factor": float(factor), "model": config.model,
                             "how": config.how, "positions": config.positions, "prompt": prompt, "unsteered": unsteered, "steered": text,
                             "control": is_control, "matches": shows(text), "unsteered_matches": shows(unsteered)})
    with output_lock(out.parent, "steer"):
        write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return rows


def _steerer(config: SteerConfig, crosscoder: Any, table: Any) -> Any:
    """``(sets, pair, model, layer, stop, prompts) -> answers[set][prompt] = (unsteered, [steered per factor])``
    for ``config.how``."""
    if config.how == "activation":
        def by_activation(sets: list, pair: Any, model: Any, layer: int, stop: list[int], prompts: list[str]) -> list:
            conditions = Conditions(crosscoder, [], bos_token_id=pair.tokenizer.bos_token_id,
                                    special_token_ids=pair.tokenizer.all_special_ids)
            answers: list[list] = [[] for _ in sets]
            for prompt in prompts:  # every set and factor of one prompt in one batch
                unsteered, steered = generate_with_latents(pair, conditions, layer, prompt, [latents for latents, _ in sets],
                                                           config.factors, max_new_tokens=config.max_new_tokens, stop_ids=stop)
                for i, texts in enumerate(steered):
                    answers[i].append((unsteered, texts))
            return answers
        return by_activation

    def by_direction(sets: list, pair: Any, model: Any, layer: int, stop: list[int], prompts: list[str]) -> list:
        answers = []
        for latents, _ in sets:  # one batch per set and prompt: the unsteered row and one per factor
            vector = steering_vector(crosscoder, table, latents)
            answers.append([generate_steered(model, pair.tokenizer, layer, prompt, vector, config.factors, positions=config.positions,
                                             max_new_tokens=config.max_new_tokens, stop_ids=stop) for prompt in prompts])
        return answers
    return by_direction


def steering_path(config: SteerConfig) -> Path:
    """Where run_steer writes its rows: ``out``, or steering.jsonl in the crosscoder's causal folder."""
    return Path(config.out) if config.out else Path(config.analysis_dir).resolve().parent / "causal" / "steering.jsonl"


def format_steering_result(rows: list[dict[str, Any]], config: SteerConfig) -> str:
    """What `crossdiff steer` prints: the answers side by side, the match counts (with --expect), the file."""
    parts = [format_steering([row for row in rows if not row["control"]])]
    if config.expect is not None:
        parts.append(format_match_counts(rows, config.expect))
    parts.append(f"saved {len(rows)} rows to {steering_path(config)}")
    return "\n".join(parts)


def format_steering(rows: list[dict[str, Any]], width: int = 56) -> str:
    """Unsteered and steered answers side by side, per latent set, prompt and factor."""
    lines = []
    seen = set()
    for row in rows:
        key = (str(row["latent"]), row["prompt"])
        if key not in seen:
            seen.add(key)
            lines += ["", f"latent {row['latent']} into the {row['model']} model ({row['positions']} positions); prompt: {quoted(row['prompt'])}",
                      f"  {'factor':>6s}  {'unsteered':{width}s}  steered"]
        # Generated text is the model's to choose, escapes included: shown escaped.
        left = textwrap.shorten(printable(row["unsteered"]), width, placeholder="...") or "(empty)"
        right = textwrap.shorten(printable(row["steered"]), width, placeholder="...") or "(empty)"
        lines.append(f"  {row['factor']:>6g}  {left:{width}s}  {right}")
    return "\n".join(lines)


def match_counts(rows: list[dict[str, Any]]) -> Any:
    """Per latent set: answers matching ``expect`` unsteered and at each factor, of the prompts."""
    frame = pd.DataFrame(rows)
    if frame.empty or frame["matches"].isna().any():
        raise CrossdiffError("these steering rows were made without --expect: there is nothing to count")
    frame["set"] = frame["latent"].map(str)
    order = list(dict.fromkeys(frame["set"]))
    steered = frame.pivot_table(index="set", columns="factor", values="matches", aggfunc="sum").reindex(order)
    first_factor = frame[frame["factor"] == frame["factor"].iloc[0]]
    per_set = first_factor.groupby("set", sort=False).agg(control=("control", "first"), prompts=("prompt", "size"),
                                                          unsteered=("unsteered_matches", "sum"))
    return per_set.join(steered.astype(int)).reset_index()


def format_match_counts(rows: list[dict[str, Any]], expect: str | None) -> str:
    """The match counts as a table: the chosen sets first, then each control latent."""
    counts = match_counts(rows)
    factors = [c for c in counts.columns if isinstance(c, float)]
    lines = ["", f"answers matching /{expect}/, of {int(counts['prompts'].iloc[0])} prompts",
             f"  {'latent set':24s} {'unsteered':>9s} " + " ".join(f"{f:>6g}" for f in factors)]
    for _, row in counts.iterrows():
        name = ("control " if row["control"] else "") + row["set"]
        values = " ".join(f"{int(row[f]):>6d}" for f in factors)
        lines.append(f"  {textwrap.shorten(name, 24, placeholder='...'):24s} {int(row['unsteered']):>9d} {values}")
    return "\n".join(lines)
