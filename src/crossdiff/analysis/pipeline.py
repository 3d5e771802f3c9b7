"""`analyze`: every per-latent result from a crosscoder and an activation cache.

Passes over the cache (in its stored order, never shuffled, so every pass sees the same
tokens):

1. statistics, Latent Scaling for all latents, reconstruction quality, top examples;
2. quantile samples (needs each latent's max activation from pass 1);
3. context windows of the kept examples (re-encodes only the tokens it needs).

Passes 2 and 3 run only when examples are requested. Outputs, in ``out_dir``:
``latents.parquet`` and ``summary.json`` (table.py), ``twins.parquet`` (twins.py) and
``examples.sqlite`` (examples.py).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff import model_sources
from crossdiff.analysis.config import AnalysisConfig, ScalingThresholds, TagThresholds  # noqa: F401 (re-exported)
from crossdiff.analysis.examples import (
    ContextCollector,
    ExampleRefs,
    ExampleStore,
    QuantileSamples,
    TopActivations,
    token_keys,
    write_examples,
)
from crossdiff.analysis import read
from crossdiff.analysis.findings import find
from crossdiff.analysis.roles import RoleStats, RoleTagger
from crossdiff.analysis.norms import decoder_geometry, tag_latents
from crossdiff.analysis.scaling import LatentScaling, LatentScalingResult, scaling_flags
from crossdiff.analysis.stats import ActivationStats, LatentStats, ReconstructionQuality
from crossdiff.analysis.table import add_verdict_columns, build_table, summarize, write_table
from crossdiff.analysis.twins import best_twin, find_twins
from crossdiff.cache.batch import CacheBatch
from crossdiff.cache.store import LeftOut, ReadFilters, recorded_filter
from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError
from crossdiff.files import begin_staging, commit_staging, is_disk_full, write_error
from crossdiff.hub import local_only
from crossdiff.locks import output_lock
from crossdiff.devices import resolve_device

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class BatchSource(Protocol):
    """What analysis needs from a cache: crossdiff.cache.store.PairedCache satisfies it."""

    sources: list[str]
    n_tokens: int

    def iter_batches(self, batch_size: int, *, device: torch.device | str, dtype: torch.dtype) -> Iterator[Any]: ...


class TensorSource:
    """Activations already in memory, exposed like a cache (tests, notebooks, synthetic data).

    Without document structure, tokens are cut into documents of ``doc_length`` tokens in
    order, for example windows only: positions start at 1, so no token counts as a BOS
    token unless ``bos=True`` (position 0 of each document is then BOS) or ``positions``
    says so. Source ids default to 0, template to False. ``model_names`` (base, chat) lets
    :func:`analyze` find the tokenizer for example text, as a cache's manifest does.
    """

    def __init__(
        self,
        acts: Tensor,
        *,
        token_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        positions: Tensor | None = None,
        source_ids: Tensor | None = None,
        template: Tensor | None = None,
        sources: list[str] | None = None,
        doc_length: int = 64,
        bos: bool = False,
        model_names: list[str] | None = None,
    ):
        n = acts.shape[0]
        index = torch.arange(n)
        self.batch = CacheBatch(
            acts=acts,
            token_ids=token_ids if token_ids is not None else torch.zeros(n, dtype=torch.long),
            doc_ids=doc_ids if doc_ids is not None else index // doc_length,
            positions=positions if positions is not None else index % doc_length + (0 if bos else 1),
            source_ids=source_ids if source_ids is not None else torch.zeros(n, dtype=torch.long),
            template=template if template is not None else torch.zeros(n, dtype=torch.bool),
        )
        self.sources = sources or ["data"]
        self.n_tokens = n
        self.model_names = tuple(model_names) if model_names is not None else None

    def iter_batches(self, batch_size: int, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, **_: Any) -> Iterator[CacheBatch]:
        for start in range(0, self.n_tokens, batch_size):
            part = self.batch.select(slice(start, start + batch_size)).to(device)
            yield part._replace(acts=part.acts.to(dtype))


class AnalysisResult(NamedTuple):
    table: pd.DataFrame
    summary: dict[str, Any]
    twins: pd.DataFrame
    files: dict[str, Path]


def analyze(
    crosscoder: CrossCoder,
    source: BatchSource,
    out_dir: str | Path,
    config: AnalysisConfig | None = None,
    *,
    tokenizer: Any = "auto",
    progress: bool = True,
) -> AnalysisResult:
    """Run the full analysis and write its files into ``out_dir``.

    The files are written into a folder beside ``out_dir`` that replaces it once complete:
    an interrupted run leaves the previous analysis (or none), never a mix of both.
    ``tokenizer`` gives examples their token text: ``"auto"`` loads the chat model's
    tokenizer named by the cache (``source.model_names``) when it can be loaded, None stores
    token ids only.
    """
    config = config or AnalysisConfig()
    if isinstance(tokenizer, str) and tokenizer == "auto":
        names = getattr(source, "model_names", None) or crosscoder.config.model_names
        tokenizer = load_tokenizer(names[-1]) if config.examples and names and names[-1] else None
    out_dir = Path(out_dir)
    check_cache_matches(crosscoder, source, config.allow_mismatch)
    with output_lock(out_dir, "analyze"):
        staging = begin_staging(out_dir)
        try:
            result = _analyze_into(crosscoder, source, staging, config, tokenizer=tokenizer, progress=progress)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)  # (after a kill -9, the next run removes it)
            if isinstance(err, (OSError, sqlite3.Error)) and is_disk_full(err):
                raise write_error(out_dir, err) from None
            raise
        commit_staging(staging, out_dir)
    return result._replace(files={name: out_dir / path.name for name, path in result.files.items()})


def check_cache_matches(crosscoder: CrossCoder, source: Any, allow_mismatch: bool = False) -> None:
    """CrossdiffError when the cache was collected at another layer or from other models
    than the crosscoder was trained on (both record theirs); sources without records pass."""
    if allow_mismatch:
        return
    cc = crosscoder.config
    layer, models = getattr(source, "layer", None), getattr(source, "model_names", None)
    problems = []
    if cc.layer is not None and layer is not None and cc.layer != layer:
        problems.append(f"layer {cc.layer} for the crosscoder, {layer} for the cache")
    if cc.model_names and models and [_model_id(m) for m in cc.model_names] != [_model_id(m) for m in models]:
        problems.append(f"models {list(cc.model_names)} for the crosscoder, {list(models)} for the cache")
    if problems:
        raise CrossdiffError(
            "the cache does not match the crosscoder: " + "; ".join(problems) + " (--allow-mismatch to analyse anyway)"
        )


def _model_id(name: str) -> str:
    """A model's name without the folder or hub owner it was loaded from ("google/gemma-2-2b" -> "gemma-2-2b")."""
    return Path(str(name).rstrip("/")).name.lower()


def _analyze_into(
    crosscoder: CrossCoder,
    source: BatchSource,
    out_dir: Path,
    config: AnalysisConfig,
    *,
    tokenizer: Any,
    progress: bool,
) -> AnalysisResult:
    token_filter = analysis_filter(crosscoder, source, config.token_filter)
    left_out = LeftOut(token_filter)
    crosscoder = _prepare(crosscoder, config)
    first = _first_pass(crosscoder, source, config, tokenizer, progress, token_filter, left_out)
    if first.stats.n_tokens == 0:
        raise CrossdiffError("the cache holds no tokens to analyse")
    table, twins = _latent_table(crosscoder, first, config)

    files = {"table": out_dir / "latents.parquet", "summary": out_dir / "summary.json", "twins": out_dir / "twins.parquet"}
    twins.to_parquet(files["twins"], index=False)
    context = None
    if first.top is not None:
        examples, histograms = _collect_examples(crosscoder, source, config, first.top, progress, token_filter)
        files["examples"] = write_examples(
            out_dir / "examples.sqlite",
            examples,
            source.sources,
            token_text=_token_text(tokenizer) if tokenizer is not None else None,
            metadata={"activation": "scaled (f~)"},
            histograms=histograms,
        )
        context = top_context(files["examples"])
    summary = summarize(
        table,
        n_tokens=first.stats.n_tokens,
        n_tokens_per_source=first.stats.n_tokens_per_source,
        quality=first.quality,
        crosscoder={"activation": crosscoder.config.activation, "d_in": crosscoder.config.d_in,
                    "d_sae": crosscoder.config.d_sae, "k": crosscoder.config.k,
                    "model_names": crosscoder.config.model_names, "layer": crosscoder.config.layer},
        config=dataclasses.asdict(config),
        left_out=left_out.to_dict(),
        files={name: path.name for name, path in files.items()},
        findings=find(table, n_top=config.n_findings, context=context),
    )
    write_table(table, summary, out_dir)  # last: a complete summary.json marks a finished analysis
    return AnalysisResult(table, summary, twins, files)


class _FirstPass(NamedTuple):
    """What pass 1 accumulates over the whole cache."""

    scaling: LatentScalingResult  # Latent Scaling toward the chat model
    base_scaling: LatentScalingResult  # ... and toward the base model
    stats: LatentStats  # activation statistics per latent
    quality: dict[str, float]  # reconstruction quality
    role_shares: dict[str, np.ndarray]  # each latent's share of activation per token role
    top: TopActivations | None  # each latent's top examples, when examples are requested


def _first_pass(crosscoder: CrossCoder, source: BatchSource, config: AnalysisConfig, tokenizer: Any, progress: bool,
                token_filter: ReadFilters | None, left_out: LeftOut) -> _FirstPass:
    n_latents, device = crosscoder.config.d_sae, crosscoder.W_dec.device
    n_passes = 3 if config.examples else 1
    scaling = LatentScaling(crosscoder.W_dec, n_blocks=config.scaling.n_blocks)
    base_scaling = LatentScaling(crosscoder.W_dec, direction="base", n_blocks=config.scaling.n_blocks)
    stats = ActivationStats(n_latents, source.sources, device=device)
    quality = ReconstructionQuality(crosscoder.config.n_models, crosscoder.config.d_in, device=device)
    top = TopActivations(n_latents, config.n_top, device=device) if config.examples else None
    roles = RoleStats(n_latents, device=device)
    role_of = RoleTagger(_token_text(tokenizer) if tokenizer is not None else None)
    with torch.no_grad():
        for batch in _batches(source, config, device, f"pass 1/{n_passes}: statistics + Latent Scaling", progress,
                              token_filter, left_out):
            _check_acts(batch.acts, crosscoder)
            _check_values(batch, len(source.sources))
            x = crosscoder.normalize(batch.acts)
            f = crosscoder.encode(x)
            x_hat = crosscoder.decode(f)
            f_scaled = crosscoder.scale(f)
            groups = batch.doc_ids + 7 * batch.source_ids  # a document's tokens share a jackknife block
            scaling.update(f, x, x_hat, groups)
            base_scaling.update(f, x, x_hat, groups)
            stats.update(f_scaled, batch.source_ids, batch.positions, batch.template)
            doc_keys = (batch.source_ids.long() << 40) | batch.doc_ids.long()
            roles.update(f_scaled, role_of(batch.token_ids, doc_keys, batch.positions, batch.template))
            quality.update(x, x_hat, f)
            if top is not None:
                top.update(f_scaled, batch.source_ids, batch.doc_ids, batch.positions)
    return _FirstPass(scaling.result(), base_scaling.result(), stats.result(), quality.result(), roles.shares(), top)


def _latent_table(crosscoder: CrossCoder, first: _FirstPass, config: AnalysisConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-latent table (geometry, tags, statistics, Latent Scaling, verdicts, roles) and the twin pairs."""
    n_latents = crosscoder.config.d_sae
    geometry = decoder_geometry(crosscoder)
    tags = tag_latents(geometry.dnorm, config.tags)
    flags = scaling_flags(first.scaling, tags == "chat-only", config.scaling)
    twins = find_twins(crosscoder, tags == "chat-only", tags == "base-only", min_cosine=config.twin_cosine)
    twin, twin_cos = best_twin(twins, n_latents)
    table = build_table(geometry, tags, first.stats, first.scaling, flags, twin, twin_cos)
    add_verdict_columns(table, first.scaling, first.base_scaling, config.scaling)
    for name, share in first.role_shares.items():
        table[name] = share
    return table, twins


def _prepare(crosscoder: CrossCoder, config: AnalysisConfig) -> CrossCoder:
    if crosscoder.config.activation == "batchtopk" and float(crosscoder.threshold) < 0:
        raise CrossdiffError(
            "this BatchTopK crosscoder has no inference threshold (threshold < 0); analysis needs the trained threshold"
        )
    device = resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    if crosscoder.W_dec.device != device or crosscoder.W_dec.dtype != dtype:
        crosscoder = copy.deepcopy(crosscoder).to(device=device, dtype=dtype)  # leave the caller's model as it was
    return crosscoder.eval()


def _check_acts(acts: Tensor, crosscoder: CrossCoder) -> None:
    """A cache from other models or another layer fails here, not deep inside a matmul."""
    expected = (crosscoder.config.n_models, crosscoder.config.d_in)
    if acts.dim() != 3 or tuple(acts.shape[1:]) != expected:
        raise CrossdiffError(
            f"the cache's activations are [tokens, {', '.join(map(str, acts.shape[1:]))}] but the crosscoder "
            f"reads [tokens, {expected[0]}, {expected[1]}]: wrong cache or crosscoder?"
        )


def _check_values(batch: CacheBatch, n_sources: int) -> None:
    """Damaged activations would turn every beta into NaN and the summary into "confirms 0"."""
    bad = ~torch.isfinite(batch.acts).all(dim=(1, 2))
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise CrossdiffError(
            f"the cache holds NaN or inf activations ({int(bad.sum())} tokens in one batch, the first in document "
            f"{int(batch.doc_ids[first])} of source {int(batch.source_ids[first])}, position {int(batch.positions[first])})"
        )
    if len(batch.source_ids) and (int(batch.source_ids.min()) < 0 or int(batch.source_ids.max()) >= n_sources):
        raise CrossdiffError(f"the cache is damaged: a token's source id is outside 0..{n_sources - 1}")


def analysis_filter(crosscoder: CrossCoder, source: Any, apply: bool = True) -> ReadFilters | None:
    """The token filter analysis applies: the one the crosscoder records, resolved on ``source``
    if it is not yet; None when ``apply`` is false or the crosscoder records none (then a cache
    holding massive activations gets a note: they are analysed with the rest)."""
    token_filter = recorded_filter(crosscoder.config.metadata) if apply else None
    profile = source.norm_profile() if hasattr(source, "norm_profile") else None
    if token_filter is None:
        if apply and profile and profile["above_ratio"]:
            print(f"crossdiff: note: the crosscoder records no token filter (trained before crossdiff left out massive "
                  f"activations, or imported); analysing every token, {profile['above_ratio']:,} of them above "
                  f"{profile['ratio']:g}x the median norm")
        return None
    if not token_filter.resolved:
        if profile is None:
            raise CrossdiffError("the crosscoder's token filter needs median norms, which this source does not give; "
                                 "set token_filter = false")
        token_filter = token_filter.resolve(profile)
    return token_filter


def _batches(source: BatchSource, config: AnalysisConfig, device: torch.device, desc: str,
             progress: bool, token_filter: ReadFilters | None = None, left_out: LeftOut | None = None) -> Iterable[CacheBatch]:
    """The cache's batches in stored order, on ``device``, cut at ``max_tokens`` (tokens read),
    without the tokens ``token_filter`` leaves out (counted into ``left_out``)."""
    limit = source.n_tokens if config.max_tokens is None else min(config.max_tokens, source.n_tokens)
    dtype = _DTYPES[config.dtype]
    seen = 0
    with tqdm(total=limit, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False) as bar:
        for raw in source.iter_batches(config.batch_size, device=device, dtype=dtype):
            take = min(raw.acts.shape[0], limit - seen)
            if take <= 0:
                break
            batch = CacheBatch(*(getattr(raw, name)[:take] for name in CacheBatch._fields))
            seen += take
            bar.update(take)
            if token_filter is not None:
                reasons = _left_out(batch, token_filter, getattr(source, "manifest", {}))
                if left_out is not None:
                    left_out.add(reasons, batch.positions.cpu().numpy())
                if any(mask.any() for mask in reasons.values()):
                    keep = torch.from_numpy(~np.any(list(reasons.values()), axis=0)).to(batch.acts.device)
                    batch = batch.select(keep)
            elif left_out is not None:
                left_out.seen += take
            if len(batch.acts):
                yield batch


def _left_out(batch: CacheBatch, token_filter: ReadFilters, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The filter's reasons for a batch; norms as the cache stores them (float32 of a float64 norm)."""
    norms = (torch.linalg.vector_norm(batch.acts, dim=-1, dtype=torch.float64).float().cpu().numpy()
             if token_filter.max_norm is not None else None)
    return token_filter.reasons(batch.positions.cpu().numpy(), batch.token_ids.cpu().numpy(), norms,
                                manifest.get("bos_token_id"), manifest.get("special_token_ids", []))


def _collect_examples(crosscoder: CrossCoder, source: BatchSource, config: AnalysisConfig,
                      top: TopActivations, progress: bool,
                      token_filter: ReadFilters | None) -> tuple[ContextCollector, np.ndarray | None]:
    """The examples' contexts, and the activation histograms per source (None without quantile bins)."""
    parts, histograms = [top.examples()], None
    if config.quantile_bins > 0:
        quantiles = QuantileSamples(top.max_act(), config.quantile_bins, config.per_bin, seed=config.seed,
                                    n_sources=max(1, len(source.sources)))
        with torch.no_grad():
            for batch in _batches(source, config, top.values.device, "pass 2/3: quantile samples", progress, token_filter):
                f_scaled = crosscoder.get_activations(crosscoder.normalize(batch.acts))
                quantiles.update(f_scaled, batch.source_ids, batch.doc_ids, batch.positions)
        parts.append(quantiles.examples())
        histograms = quantiles.histograms()
    collector = ContextCollector(ExampleRefs.concat(parts), before=config.window_before, after=config.window_after)
    with torch.no_grad():
        # Every token, so that contexts read as the text; left-out tokens show no activation.
        for batch in _batches(source, config, top.values.device, "pass 3/3: example contexts", progress):
            keys = token_keys(batch.source_ids, batch.doc_ids, batch.positions)
            kept = None
            if token_filter is not None:
                reasons = _left_out(batch, token_filter, getattr(source, "manifest", {}))
                kept = torch.from_numpy(~np.any([np.zeros(len(keys), bool), *reasons.values()], axis=0)).to(batch.acts.device)

            def encode_rows(rows: Tensor, acts: Tensor = batch.acts, kept: Tensor | None = kept) -> Tensor:
                f = crosscoder.get_activations(crosscoder.normalize(acts[rows]))
                return f if kept is None else f * kept[rows, None]

            collector.update(keys, batch.token_ids, encode_rows)
    return collector, histograms


def top_context(examples_path: Path) -> Callable[[int], str]:
    """latent -> its max-activating example, a short window with the token in [brackets]."""

    def context(latent: int) -> str:
        with ExampleStore(examples_path) as store:
            return read.top_context(store, latent) or "(no example)"

    return context


def _token_text(tokenizer: Any) -> Callable[[list[int]], list[str]]:
    def token_text(ids: list[int]) -> list[str]:
        return [tokenizer.decode([i]) for i in ids]

    return token_text


def load_tokenizer(name_or_path: str | None) -> Any:
    """The chat tokenizer, or None (with the reason) when it cannot be loaded offline."""
    if not name_or_path:
        return None
    try:
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import; only a named tokenizer needs it

        weights, _ = model_sources.resolve(name_or_path)  # a GGUF's converted folder; an adapter keeps its base's tokenizer
        # Offline, a hub name fails at once from the local cache instead of after five retries.
        return AutoTokenizer.from_pretrained(weights, local_files_only=local_only(weights), trust_remote_code=False)
    except Exception as err:  # missing files, offline hub: examples keep token ids only
        print(f"crossdiff analyze: tokenizer {name_or_path!r} unavailable ({type(err).__name__}); storing token ids only")
        return None


