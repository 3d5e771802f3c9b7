"""The latent table: one row per latent, stable column names, Parquet plus a JSON summary.

Column names are part of the public API (the report and user notebooks read them); add
columns, never rename them. :data:`COLUMNS` documents each one and is copied into the
summary JSON so the files explain themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossdiff.files import jsonable
from crossdiff.analysis.findings import format_findings
from crossdiff.analysis.norms import TAGS, DecoderGeometry
from crossdiff.analysis.scaling import LatentScalingResult, ScalingFlags, ScalingThresholds
from crossdiff.analysis.verdicts import decided, rank_sum, verdicts
from crossdiff.analysis.stats import LatentStats
from crossdiff.cache.store import LeftOut

ORIENTATION = "dnorm = 0.5 * ((|d_chat| - |d_base|) / max(|d_chat|, |d_base|) + 1): 1 = chat-only, 0 = base-only, 0.5 = equal"

COLUMNS: dict[str, str] = {
    "latent": "latent index",
    "dnorm": "relative decoder norm, 1 = chat-only, 0 = base-only (paper orientation; the reference code stores 1 - dnorm)",
    "tag": "chat-only / base-only / shared / other, from dnorm and the tag thresholds",
    "norm_base": "norm of the base decoder vector",
    "norm_chat": "norm of the chat decoder vector",
    "dec_cos": "cosine between the base and chat decoder vectors",
    "enc_cos": "cosine between the base and chat encoder vectors",
    "n_active": "tokens where the scaled activation f~ exceeds 1e-3",
    "freq": "n_active / tokens analysed",
    "max_act": "largest scaled activation f~",
    "freq__<source>": "freq on the tokens of one text source (one column per source)",
    "max_act__<source>": "max_act on the tokens of one text source (one column per source)",
    "dead": "never active on the analysed tokens",
    "template_share": "fraction of the latent's non-BOS activations on chat-template tokens",
    "bos_share": "fraction of the latent's activations on position 0 (BOS)",
    "beta_error_base": "Latent Scaling, base error target (leave-one-out)",
    "beta_error_chat": "Latent Scaling, chat error target (leave-one-out); about 1 for a good latent",
    "beta_recon_base": "Latent Scaling, base reconstruction target",
    "beta_recon_chat": "Latent Scaling, chat reconstruction target",
    "beta_act_base": "Latent Scaling, base activation target",
    "beta_act_chat": "Latent Scaling, chat activation target",
    "nu_error": "beta_error_base / beta_error_chat; high = Complete Shrinkage",
    "nu_recon": "beta_recon_base / beta_recon_chat; high = Latent Decoupling",
    "scaling_tokens": "tokens with raw f > 0, the tokens every beta of the latent rests on",
    "chat_specific": "nu_error < nu_error_max and nu_recon < nu_recon_max",
    "complete_shrinkage": "chat-only by dnorm and nu_error >= nu_error_max",
    "latent_decoupling": "chat-only by dnorm and nu_recon >= nu_recon_max",
    "twin": "best base-only twin of a chat-only latent (-1 if none)",
    "twin_cos": "cosine between this latent's chat decoder and the twin's base decoder",
    "nu_error_se": "jackknife standard error of nu_error (token blocks by document; NaN if undefined)",
    "nu_recon_se": "jackknife standard error of nu_recon",
    "verdict": "one disjoint verdict from Latent Scaling with its guards: chat-specific, complete shrinkage, latent "
               "decoupling, shrinkage+decoupling, uncertain, out of range, too few tokens, no estimate, dead",
    "rank_sum": "rank of nu_error + rank of nu_recon (both clipped at 0) over latents with a decided verdict "
                "(low = most chat-specific; NaN for guarded latents)",
    "base_dir_beta_error_base": "Latent Scaling along the base decoder (the mirrored question), error base target",
    "base_dir_beta_error_chat": "Latent Scaling along the base decoder (the mirrored question), error chat target",
    "base_dir_beta_recon_base": "Latent Scaling along the base decoder (the mirrored question), recon base target",
    "base_dir_beta_recon_chat": "Latent Scaling along the base decoder (the mirrored question), recon chat target",
    "base_dir_beta_act_base": "Latent Scaling along the base decoder (the mirrored question), act base target",
    "base_dir_beta_act_chat": "Latent Scaling along the base decoder (the mirrored question), act chat target",
    "base_dir_nu_error": "base direction: beta_error_chat / beta_error_base; high = the chat model still has the base concept",
    "base_dir_nu_recon": "base direction: beta_recon_chat / beta_recon_base",
    "base_dir_nu_error_se": "jackknife standard error of base_dir_nu_error",
    "base_dir_nu_recon_se": "jackknife standard error of base_dir_nu_recon",
    "base_dir_verdict": "verdict along the base decoder: base-specific, complete shrinkage, ... (same guards)",
    "role_bos": "share of the latent's active tokens at position 0 (BOS); the role_* shares add up to 1",
    "role_template": "share on chat-template tokens (BOS excluded)",
    "role_user": "share on user message content",
    "role_assistant": "share on assistant message content",
    "role_system": "share on system message content",
    "role_text": "share on plain-text content, and chat content whose role is unknown (no tokenizer)",
}


def source_column(stat: str, source: str) -> str:
    """Name of a per-source column, e.g. ``freq__lmsys``."""
    return f"{stat}__{source}"


def build_table(
    geometry: DecoderGeometry,
    tags: np.ndarray,
    stats: LatentStats,
    scaling: LatentScalingResult,
    flags: ScalingFlags,
    twin: np.ndarray,
    twin_cos: np.ndarray,
) -> pd.DataFrame:
    columns: dict[str, Any] = {
        "latent": np.arange(len(tags), dtype=np.int64),
        "dnorm": geometry.dnorm,
        "tag": pd.Categorical(tags, categories=list(TAGS)),
        "norm_base": geometry.norm_base,
        "norm_chat": geometry.norm_chat,
        "dec_cos": geometry.dec_cos,
        "enc_cos": geometry.enc_cos,
        "n_active": stats.n_active.astype(np.int64),
        "freq": stats.freq,
        "max_act": stats.max_act,
    }
    for source in stats.freq_per_source:
        columns[source_column("freq", source)] = stats.freq_per_source[source]
        columns[source_column("max_act", source)] = stats.max_act_per_source[source]
    columns.update(
        dead=stats.dead,
        template_share=stats.template_share,
        bos_share=stats.bos_share,
        beta_error_base=scaling.beta_error_base,
        beta_error_chat=scaling.beta_error_chat,
        beta_recon_base=scaling.beta_recon_base,
        beta_recon_chat=scaling.beta_recon_chat,
        beta_act_base=scaling.beta_act_base,
        beta_act_chat=scaling.beta_act_chat,
        nu_error=scaling.nu_error,
        nu_recon=scaling.nu_recon,
        scaling_tokens=scaling.n_tokens.astype(np.int64),
        chat_specific=flags.chat_specific,
        complete_shrinkage=flags.complete_shrinkage,
        latent_decoupling=flags.latent_decoupling,
        twin=twin,
        twin_cos=twin_cos,
    )
    return pd.DataFrame(columns)


def add_verdict_columns(table: pd.DataFrame, chat: LatentScalingResult, base: LatentScalingResult,
                        thresholds: ScalingThresholds) -> None:
    """Uncertainties, guarded verdicts, the rank-sum and the base-direction columns (in place)."""
    dead = table["dead"].to_numpy()
    n = len(table)
    table["nu_error_se"] = chat.nu_error_se if chat.nu_error_se is not None else np.full(n, np.nan)
    table["nu_recon_se"] = chat.nu_recon_se if chat.nu_recon_se is not None else np.full(n, np.nan)
    verdict = verdicts(chat, dead, thresholds, direction="chat")
    table["verdict"] = verdict
    table["rank_sum"] = rank_sum(table, decided(verdict))
    for name in ("error_base", "error_chat", "recon_base", "recon_chat", "act_base", "act_chat"):
        table[f"base_dir_beta_{name}"] = getattr(base, f"beta_{name}")
    table["base_dir_nu_error"] = base.nu_error
    table["base_dir_nu_recon"] = base.nu_recon
    table["base_dir_nu_error_se"] = base.nu_error_se if base.nu_error_se is not None else np.full(n, np.nan)
    table["base_dir_nu_recon_se"] = base.nu_recon_se if base.nu_recon_se is not None else np.full(n, np.nan)
    table["base_dir_verdict"] = verdicts(base, dead, thresholds, direction="base")


def summarize(table: pd.DataFrame, **extra: Any) -> dict[str, Any]:
    """Counts a reader wants first: latents per tag and the verdict on chat-only latents."""
    chat_only = table["tag"] == "chat-only"
    no_estimate = chat_only & (table["nu_error"].isna() | table["nu_recon"].isna())
    summary = {
        "n_latents": len(table),
        "orientation": ORIENTATION,
        "tags": {tag: int((table["tag"] == tag).sum()) for tag in TAGS},
        "dead": int(table["dead"].sum()),
        "dead_fraction": float(table["dead"].mean()) if len(table) else math.nan,
        "chat_only": {
            "total": int(chat_only.sum()),
            "chat_specific": int((chat_only & table["chat_specific"]).sum()),
            "complete_shrinkage": int(table["complete_shrinkage"].sum()),
            "latent_decoupling": int(table["latent_decoupling"].sum()),
            "shrinkage_and_decoupling": int((table["complete_shrinkage"] & table["latent_decoupling"]).sum()),
            "no_estimate": int(no_estimate.sum()),
            "with_twin": int((chat_only & (table["twin"] >= 0)).sum()),
        },
        **extra,
        "columns": COLUMNS,
    }
    return jsonable(summary)  # what summary.json holds, NaN as null


def write_table(table: pd.DataFrame, summary: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table_path, summary_path = folder / "latents.parquet", folder / "summary.json"
    table.to_parquet(table_path, index=False)
    summary_path.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return table_path, summary_path


def read_table(folder: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / "latents.parquet")


EXPLANATIONS_FILE = "explanations.parquet"
"""Written beside latents.parquet by `crossdiff explain` (autointerp), one row per explained latent."""


def join_explanations(table: pd.DataFrame, folder: str | Path) -> pd.DataFrame:
    """``table`` with the explanation columns of ``folder``'s explanations.parquet joined on
    ``latent`` when that file exists (unexplained latents get nulls), else ``table`` as is.
    Kept in a file of its own so that latents.parquet stays exactly what analyze wrote."""
    path = Path(folder) / EXPLANATIONS_FILE
    if not path.is_file():
        return table
    explanations = pd.read_parquet(path)
    explanations = explanations[["latent", *[c for c in explanations.columns if c not in table.columns]]]
    return table.merge(explanations, on="latent", how="left")


def format_summary(summary: dict[str, Any]) -> str:
    """The analysis summary in full (`crossdiff inspect ANALYSIS --findings` without findings.json):
    tags, quality, the dnorm histogram, guarded verdict counts, top latents, the paper's flags.
    `analyze` itself ends with the shorter end screen (crossdiff.analysis.screen)."""
    tags = summary["tags"]
    co = summary["chat_only"]
    lines = [
        f"latents: {summary['n_latents']}  ("
        + ", ".join(f"{tag} {tags[tag]}" for tag in TAGS)
        + f"; dead {summary['dead']})",
    ]
    quality = summary.get("quality")
    if quality:
        lines.append(
            f"FVE base {quality['fve_base']:.3f}, chat {quality['fve_chat']:.3f}, joint {quality['fve']:.3f}; "
            f"L0 {quality['l0']:.1f} on {summary.get('n_tokens', 0):,} tokens"
        )
    if summary.get("left_out"):
        lines.append(LeftOut.from_dict(summary["left_out"]).line())
    if summary.get("findings"):
        lines.append(format_findings(summary["findings"]))
    lines.append(
        f"paper's flags (overlapping): chat-only latents: {co['total']} (dnorm > 0.9); Latent Scaling confirms {co['chat_specific']} as chat-specific, "
        f"rejects {co['complete_shrinkage']} as Complete Shrinkage and {co['latent_decoupling']} as Latent Decoupling "
        f"({co['shrinkage_and_decoupling']} both, {co['no_estimate']} without estimate); base-only twin found for {co['with_twin']}"
    )
    guarded = ((summary.get("findings") or {}).get("verdicts") or {}).get("chat_only", {}).get("chat-specific")
    if guarded is not None and guarded != co["chat_specific"]:
        lines.append(f"  the paper's flags have no guards: {co['chat_specific'] - guarded} of the {co['chat_specific']} it confirms are "
                     f"uncertain, out of range or rest on too few tokens, so the guarded verdicts above count {guarded} (docs/analysis.md)")
    return "\n".join(lines)
