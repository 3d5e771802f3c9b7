"""`crossdiff causal`: the KL patching experiment (docs/method.md 6) for one crosscoder.

Per batch of conversations, the lower halves of both models run once (residuals after
the crosscoder's block), the crosscoder encodes them once, the chat model's upper half
runs once on its own residual (the reference distribution p_chat) and once per condition
on the patched residual. KL(p_chat || p_patched) is taken in float32 on the positions that
predict assistant tokens. Outputs, in ``RUN/<name>/causal/`` (next to the analysis folder):

* ``kl.parquet``  one row per condition x token subset (condition, subset, kl_mean,
  ci_low, ci_high, n_tokens, n_latents, form, closed);
* ``summary.json`` settings, the candidate pool and every latent set, the text summary;
  written last, so its presence means the folder is complete;
* ``kl.png``      the figure.

Everything is checked before a model is loaded, and the files are written only once all
conversations are scored, each by an atomic rename: a failed run leaves nothing half-written.
An interrupted run resumes from the batches it scored (crossdiff.causal.progress).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from crossdiff.analysis.read import CAUSAL_FILES, AnalysisOutput
from crossdiff.causal.config import CausalConfig
from crossdiff.causal.conditions import Conditions, LatentSet, candidate_pool, paper_sets, user_set
from crossdiff.causal.conversations import (Conversation, answer_prompts, load_conversations, load_prompts, prediction_masks,
                                           tokenize_conversation, write_conversations)
from crossdiff.causal.kl import KLAccumulator, kl_per_token
from crossdiff.causal.plot import plot_kl
from crossdiff.causal.progress import ScoringProgress, fingerprint, progress_path
from crossdiff.causal.upper import SplitModel
from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError
from crossdiff.files import jsonable, remove_stray_temporaries, write_atomic
from crossdiff.locks import output_lock
from crossdiff.models import load_model_pair, pad_batch

SUBSETS = ("all", "first_k", "rest")
SPARSITY_NAMES = {"relu": "L1", "batchtopk": "BatchTopK", "topk": "TopK"}
OUTPUT_FILES = CAUSAL_FILES  # summary.json last: the mark of a finished run
ANSWERS = "conversations.jsonl"  # with --prompts: the chat model's answers that were scored
KL_COLUMNS = ["condition", "subset", "kl_mean", "ci_low", "ci_high", "n_tokens", "n_latents", "form", "closed"]


class CausalResult(NamedTuple):
    table: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, Path]


def run_causal(config: CausalConfig, *, pair: Any = None, quiet: bool = False) -> CausalResult:
    """Run the experiment and write its files; ``pair`` reuses already loaded models. ``quiet``
    hides progress; the result is returned, not printed (``crossdiff causal`` prints it)."""
    crosscoder = CrossCoder.from_pretrained(config.crosscoder)
    table, analysis_summary = read_analysis(config.analysis_dir, crosscoder)
    layer = resolve_layer(crosscoder, config.layer)
    base_name, chat_name = resolve_models(crosscoder, config.base, config.chat)
    pool, sets = _latent_sets(config, crosscoder, table, analysis_summary)
    out = Path(config.out) if config.out else Path(config.analysis_dir).resolve().parent / "causal"
    others = _compared(config)
    messages, prompts = _inputs(config)

    # One run per folder (two would share the progress file), checked before the models load.
    with output_lock(out, "causal"):
        for name in OUTPUT_FILES.values():  # what a kill while writing the results or the progress left
            remove_stray_temporaries(out, name)
        remove_stray_temporaries(out.parent, progress_path(out).name)
        if pair is None:
            _say(quiet, f"loading {base_name} and {chat_name}")
            pair = load_model_pair(base_name, chat_name, dtype=config.model_dtype, device=config.device)
        _check_pair(pair, layer, crosscoder)
        crosscoder = crosscoder.to(pair.device)
        if messages is None:
            _say(quiet, f"answering {len(prompts)} prompts with the chat model (greedy, up to {config.max_new_tokens} tokens)")
            messages = answer_prompts(pair.chat, pair.tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=max(config.batch_size, 16))
            # Kept beside the results: the answers are what was scored, and the behaviour a user
            # looks for is often in them (rerun with --conversations to score the same ones).
            write_conversations(out / ANSWERS, messages)
        conversations = [tokenize_conversation(pair.tokenizer, m, i, config.max_len) for i, m in enumerate(messages)]

        conditions = Conditions(crosscoder, sets, bos_token_id=pair.tokenizer.bos_token_id,
                                special_token_ids=pair.tokenizer.all_special_ids)
        job = fingerprint({"models": [base_name, chat_name], "layer": layer, "k_first": config.k_first, "batch_size": config.batch_size,
                           "tokens_per_pass": config.tokens_per_pass, "model_dtype": config.model_dtype,
                           "sets": [[s.name, s.latents.tolist()] for s in sets]}, crosscoder, conversations)
        progress = ScoringProgress(progress_path(out), job, every_s=config.save_every_s)
        accumulator = score(pair, layer, conditions, conversations, config, quiet=quiet, progress=progress)
        kl_table = results_table(accumulator, conditions)
        summary = build_summary(config, crosscoder, layer, (base_name, chat_name), pool, sets, kl_table, accumulator, len(conversations))
        files = write_outputs(out, kl_table, summary, others)
        progress.remove()
    return CausalResult(kl_table, summary, files)  # the caller shows it: summary["text"], crossdiff.analysis.screen


def _latent_sets(config: CausalConfig, crosscoder: CrossCoder, table: pd.DataFrame,
                 analysis_summary: dict[str, Any]) -> tuple[Any, list[LatentSet]]:
    """The candidate pool and the latent sets to patch: the paper's, then the user's."""
    pool = candidate_pool(table, pool_size=config.pool_size, chat_only_threshold=_chat_only_threshold(analysis_summary))
    sets = paper_sets(table, pool, random_seeds=config.random_seeds)
    sets += [user_set(table, spec, crosscoder.config.d_sae, name=f"user-{i}" if len(config.latents) > 1 else "user")
             for i, spec in enumerate(config.latents)]
    return pool, sets


def _compared(config: CausalConfig) -> dict[str, pd.DataFrame]:
    """The KL tables of the finished causal folders ``--compare`` names, by sparsity."""
    others = {}
    for folder in config.compare:
        other = Path(folder)
        if not (other / "kl.parquet").is_file() or not (other / "summary.json").is_file():
            raise CrossdiffError(f"--compare {folder}: not a finished causal folder (needs kl.parquet and summary.json)")
        activation = json.loads((other / "summary.json").read_text())["activation"]
        others[SPARSITY_NAMES.get(activation, activation)] = pd.read_parquet(other / "kl.parquet")
    return others


def _inputs(config: CausalConfig) -> tuple[list[Any] | None, list[str] | None]:
    """(conversations, prompts the chat model answers first); each conversation must have an assistant turn."""
    messages = (load_conversations(config.conversations, column=config.column, split=config.split, limit=config.limit)
                if config.conversations else None)
    prompts = load_prompts(config.prompts, column=config.prompt_column, limit=config.limit) if config.prompts else None
    if messages is not None:
        for i, conversation in enumerate(messages):
            if not any(m["role"] == "assistant" for m in conversation):
                raise CrossdiffError(f"conversation {i} has no assistant turn; the KL experiment scores assistant tokens")
    if not (messages or prompts):
        raise CrossdiffError("no conversations to evaluate")
    return messages, prompts


def _check_pair(pair: Any, layer: int, crosscoder: CrossCoder) -> None:
    if layer >= pair.n_layers:
        raise CrossdiffError(f"the crosscoder reads block {layer} but the models have {pair.n_layers} blocks")
    if pair.d_model != crosscoder.config.d_in:
        raise CrossdiffError(f"the crosscoder reads width {crosscoder.config.d_in} but the models' residual width is {pair.d_model}")


def score(pair: Any, layer: int, conditions: Conditions, conversations: list[Conversation], config: CausalConfig,
          *, quiet: bool = True, progress: ScoringProgress | None = None) -> KLAccumulator:
    """KL of every condition on every scored token, summed per conversation.

    With ``progress``, the batches a previous run of the same job scored are skipped and
    their sums loaded, and the sums so far are saved after batches as they finish.
    """
    halves = SplitModel(pair.base, layer), SplitModel(pair.chat, layer)
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    by_length = sorted(conversations, key=lambda c: len(c.input_ids))  # batches of similar length: little padding
    starts = range(0, len(by_length), config.batch_size)
    resumed = progress.load() if progress is not None else None
    done, accumulator = resumed if resumed is not None else (0, KLAccumulator())
    bar = tqdm(total=len(conversations), desc="causal: conversations", unit="conv", disable=quiet,
               initial=min(len(by_length), done * config.batch_size))
    if resumed is not None and not quiet:
        tqdm.write(f"causal: resuming after {done} of {len(starts)} batches scored before")
    for number, start in enumerate(starts):
        if number < done:
            continue
        if progress is not None and number > done:  # the batches before this one are complete
            progress.save(number, accumulator)
        batch = by_length[start:start + config.batch_size]
        tokens = _ScoredTokens.of(batch, pad, config.k_first)
        if tokens.scored.any():
            tokens.count(accumulator)
            _score_batch(halves, conditions, tokens, config.tokens_per_pass, accumulator)
        bar.update(len(batch))
    bar.close()
    if progress is not None:
        progress.save(len(starts), accumulator, force=True)
    return accumulator


class _ScoredTokens(NamedTuple):
    """A padded batch of conversations and which of its positions are scored, by subset."""

    batch: list[Conversation]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    real: torch.Tensor  # not padding
    template: torch.Tensor  # chat-template tokens
    scored: torch.Tensor  # positions predicting an assistant token ([B, T] bool)
    row_of: torch.Tensor  # the batch row of each scored position
    member: dict[str, torch.Tensor]  # subset -> which scored positions belong to it

    @classmethod
    def of(cls, batch: list[Conversation], pad: int, k_first: int) -> _ScoredTokens:
        input_ids, attention_mask = pad_batch([c.input_ids for c in batch], pad)
        real = attention_mask.bool()
        template = _pad_flags([c.template for c in batch], input_ids.shape)
        masks = {name: torch.from_numpy(mask) & real
                 for name, mask in prediction_masks(_pad_flags([c.assistant for c in batch], input_ids.shape).numpy(),
                                                    template.numpy(), k_first).items()}
        scored = masks["all"]
        row_of = torch.arange(len(batch))[:, None].expand_as(input_ids)[scored]
        member = {name: mask[scored] for name, mask in masks.items()}
        return cls(batch, input_ids, attention_mask, real, template, scored, row_of, member)

    def count(self, accumulator: KLAccumulator) -> None:
        """Add each conversation's number of scored tokens per subset."""
        for subset in SUBSETS:
            for row, n in enumerate(torch.bincount(self.row_of[self.member[subset]], minlength=len(self.batch)).tolist()):
                if n:
                    accumulator.add_counts(subset, self.batch[row].index, n)

    def add(self, accumulator: KLAccumulator, key: str, kl: torch.Tensor) -> None:
        """Add one condition's per-token KL, summed per conversation and subset."""
        for subset in SUBSETS:
            sel = self.member[subset]
            sums = torch.zeros(len(self.batch), dtype=torch.float64).index_add_(0, self.row_of[sel], kl[sel].double())
            for row in torch.unique(self.row_of[sel]).tolist():
                accumulator.add(key, subset, self.batch[row].index, float(sums[row]))


def _score_batch(halves: tuple[SplitModel, SplitModel], conditions: Conditions, tokens: _ScoredTokens,
                 tokens_per_pass: int, accumulator: KLAccumulator) -> None:
    """Run one batch: lower halves and the crosscoder once, the chat upper half on its own
    residual and on every condition's patched residual; add each condition's KL."""
    base_half, chat_half = halves
    input_ids, attention_mask, real, scored = tokens.input_ids, tokens.attention_mask, tokens.real, tokens.scored
    keys = conditions.names()
    with torch.inference_mode():
        base = base_half.lower(input_ids, attention_mask)
        chat = chat_half.lower(input_ids, attention_mask)
        h_base, h_chat = base[real.to(base.device)].float(), chat[real.to(chat.device)].float()
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)[real]  # right-padded: column = position
        f = conditions.encode(h_base.to(conditions.delta.device), h_chat.to(conditions.delta.device),
                              positions, input_ids[real])
        flat_template = tokens.template[real].to(conditions.delta.device)
        logp_chat = torch.log_softmax(chat_half.upper(chat, input_ids, attention_mask, scored).float(), dim=-1)
        p_chat = logp_chat.exp()
        # Several conditions share one upper pass, stacked along the batch: a small model's
        # forward costs mostly fixed overhead, a large one's is bounded by tokens_per_pass.
        per_pass = max(1, tokens_per_pass // input_ids.numel())
        for first in range(0, len(keys), per_pass):
            chunk = [key for key, _, _, _ in keys[first:first + per_pass]]
            stacked = base.float().repeat(len(chunk), 1, 1)
            stacked_real = real.repeat(len(chunk), 1).to(stacked.device)
            stacked[stacked_real] = torch.cat([conditions.residual(key, h_base, h_chat, f, flat_template) for key in chunk]).to(stacked.device)
            logits = chat_half.upper(stacked, input_ids.repeat(len(chunk), 1), attention_mask.repeat(len(chunk), 1),
                                     scored.repeat(len(chunk), 1))
            for key, rows in zip(chunk, logits.split(len(logp_chat))):  # row-major: one block of rows per condition
                tokens.add(accumulator, key, kl_per_token(logp_chat, rows, p_chat).cpu())


def results_table(accumulator: KLAccumulator, conditions: Conditions) -> pd.DataFrame:
    """One row per condition x subset; random draws of a group are averaged per conversation."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    n_latents: dict[tuple[str, str | None], int] = {}
    for key, form, label, n in conditions.names():
        groups.setdefault((label, form), []).append(key)
        n_latents[label, form] = n
    rows = []
    for subset in SUBSETS:
        none_kl = accumulator.result(["None"], subset)[0]
        for (label, form), keys in groups.items():
            mean, low, high, n_tokens = accumulator.result(keys, subset)
            closed = 1 - mean / none_kl if none_kl and not math.isnan(none_kl) else math.nan
            rows.append(dict(condition=label, subset=subset, kl_mean=mean, ci_low=low, ci_high=high, n_tokens=n_tokens,
                             n_latents=n_latents[label, form], form=form, closed=closed))
    return pd.DataFrame(rows, columns=KL_COLUMNS)


def build_summary(config: CausalConfig, crosscoder: CrossCoder, layer: int, models: tuple[str, str], pool, sets: list[LatentSet],
                  kl_table: pd.DataFrame, accumulator: KLAccumulator, n_conversations: int) -> dict[str, Any]:
    summary = {
        "crosscoder": str(config.crosscoder),
        "analysis_dir": str(config.analysis_dir),
        "activation": crosscoder.config.activation,
        "models": {"base": models[0], "chat": models[1]},
        "layer": layer,
        "k_first": config.k_first,
        "n_conversations": n_conversations,
        "n_tokens": {subset: int(sum(accumulator.counts[subset].values())) for subset in SUBSETS},
        "pool": {"rule": pool.rule, "note": pool.note, "size": int(len(pool.latents)), "n_chat_only": pool.n_chat_only,
                 "latents": pool.latents.tolist()},
        "sets": {s.name: s.latents.tolist() for s in sets},
        "kl": kl_table.replace({np.nan: None}).to_dict(orient="records"),
        "config": asdict(config),
        # Latents are 0 on the tokens this filter leaves out (crossdiff.causal.conditions).
        "token_filter": crosscoder.config.metadata.get("token_filter"),
    }
    summary["text"] = format_summary(kl_table, summary)
    return summary


def format_summary(kl_table: pd.DataFrame, summary: dict[str, Any]) -> str:
    """One screen: KL per condition and subset, with the paper's comparisons spelt out."""
    k = summary["k_first"]
    lines = [
        f"KL(p_chat || p_patched) on assistant-predicting tokens, {summary['activation']} crosscoder, layer {summary['layer']}, "
        f"{summary['n_conversations']} conversations ({summary['n_tokens']['all']} tokens, first {k}: {summary['n_tokens']['first_k']})",
        summary["pool"]["note"],
        f"{'condition':14s} {'form':8s} {'n':>5s}  " + "  ".join(f"{s if s != 'first_k' else f'first {k}':>26s}" for s in SUBSETS),
    ]
    table = kl_table.assign(form=kl_table["form"].fillna(""))
    for (condition, form), rows in table.groupby(["condition", "form"], sort=False):
        rows = rows.set_index("subset")
        cells = [f"{rows.kl_mean[s]:8.4f} [{rows.ci_low[s]:7.4f},{rows.ci_high[s]:7.4f}]" for s in SUBSETS]
        lines.append(f"{condition:14s} {form:8s} {int(rows.n_latents.iloc[0]):5d}  " + "  ".join(f"{c:>26s}" for c in cells))
    for better, worse, what in (("ls-best", "ls-worst", "Latent Scaling"), ("dnorm-top", "dnorm-bottom", "relative norm")):
        a, b = _kl(kl_table, better, "replace", "first_k"), _kl(kl_table, worse, "replace", "first_k")
        none = _kl(kl_table, "None", None, "first_k")
        if not any(math.isnan(v) for v in (a, b, none)) and none > 0:
            lines.append(f"first {k} tokens, split by {what}: {better} closes {1 - a / none:6.1%} of the None KL, {worse} {1 - b / none:6.1%}")
    return "\n".join(lines)


def _kl(table: pd.DataFrame, condition: str, form: str | None, subset: str) -> float:
    rows = table[(table.condition == condition) & (table.subset == subset) & (table.form.fillna("") == (form or ""))]
    return float(rows.kl_mean.iloc[0]) if len(rows) else math.nan


def write_outputs(out: Path, kl_table: pd.DataFrame, summary: dict[str, Any], others: dict[str, pd.DataFrame] | None = None) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {key: out / name for key, name in OUTPUT_FILES.items()}
    write_atomic(files["kl"], lambda tmp: kl_table.to_parquet(tmp, index=False))
    write_atomic(files["figure"], lambda tmp: plot_kl({**(others or {}), SPARSITY_NAMES.get(summary["activation"], summary["activation"]): kl_table}, tmp, k_first=summary["k_first"], format="png"))
    write_atomic(files["summary"], lambda tmp: tmp.write_text(json.dumps(jsonable(summary), indent=2) + "\n"))
    return files


# --------------------------------------------------------------------------------- checks
def read_analysis(folder: str | Path, crosscoder: CrossCoder) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The latent table and summary of ``folder``, refused if they belong to another crosscoder."""
    output = AnalysisOutput(folder)
    summary = output.summary()  # first: an unfinished analysis is refused before its table is read
    table = output.table(explanations=False, required=("latent", "dnorm", "tag", "dead", "nu_error", "nu_recon"))
    n = crosscoder.config.d_sae
    if len(table) != n:
        raise CrossdiffError(f"analysis folder {folder} belongs to another crosscoder: {len(table)} latents, the crosscoder has {n}")
    ours = crosscoder.relative_decoder_norm().detach().float().cpu().numpy()
    theirs = table["dnorm"].to_numpy(dtype=np.float32)
    differs = ~np.isclose(ours, theirs, rtol=1e-4, atol=1e-5, equal_nan=True)
    if differs.any():
        j = int(np.flatnonzero(differs)[0])
        raise CrossdiffError(f"analysis folder {folder} belongs to another crosscoder: latent {j} has relative norm "
                             f"{theirs[j]:.4f} there, {ours[j]:.4f} in the crosscoder")
    return table, summary


def resolve_layer(crosscoder: CrossCoder, layer: int | None) -> int:
    trained = crosscoder.config.layer
    if trained is None and layer is None:
        raise CrossdiffError("the crosscoder does not record its layer; give --layer")
    if trained is not None and layer is not None and layer != trained:
        raise CrossdiffError(f"the crosscoder was trained on the output of block {trained}, not block {layer}")
    return int(trained if layer is None else layer)


def resolve_models(crosscoder: CrossCoder, base: str | None, chat: str | None) -> tuple[str, str]:
    """The base and chat models: given ones must be those the crosscoder was trained on."""
    names = crosscoder.config.model_names or []
    trained = (names + [None, None])[:2]
    chosen = []
    for role, given, recorded in (("base", base, trained[0]), ("chat", chat, trained[1])):
        if given is None and recorded is None:
            raise CrossdiffError(f"the crosscoder does not record its {role} model; give --{role}")
        if given is not None and recorded is not None and not same_model(str(given), str(recorded)):
            raise CrossdiffError(f"the crosscoder was trained on {role} model {recorded!r}, not {given!r}")
        chosen.append(str(given if given is not None else recorded))
    return chosen[0], chosen[1]


def same_model(a: str, b: str) -> bool:
    """Same hub id, same folder, or two folders holding the same config and weights."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve() or _fingerprint(pa) == _fingerprint(pb)
    for local, hub in ((pa, b), (pb, a)):  # a local download of a hub model keeps the repository's name
        if local.is_dir() and not Path(hub).exists():
            return local.name == hub.rstrip("/").split("/")[-1]
    return False


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in ("_name_or_path", "transformers_version"):
            data.pop(key, None)
        digest.update(json.dumps(data, sort_keys=True).encode())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:  # ends of the file: cheap, and differ between fine-tunes
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def _chat_only_threshold(analysis_summary: dict[str, Any]) -> float:
    return float(((analysis_summary.get("config") or {}).get("tags") or {}).get("chat_only", 0.9))


def _pad_flags(rows: list[list[bool]], shape: torch.Size) -> torch.Tensor:
    flags = torch.zeros(shape, dtype=torch.bool)
    for i, row in enumerate(rows):
        flags[i, :len(row)] = torch.as_tensor(row, dtype=torch.bool)
    return flags


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)
