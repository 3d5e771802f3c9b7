"""The paper's figures for one analysis, drawn with matplotlib (Agg, no display needed).

Each ``*_figure`` function takes the latent table (and thresholds) and returns a Figure;
:func:`write_figures` saves every figure that the analysis has data for as PNG (for the
page) and SVG (for papers). Threshold lines carry a ``gid`` (``threshold-<name>``) so
they can be found again in the Figure and in the SVG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from crossdiff.analysis.concepts import FindingsConfig  # noqa: E402
from crossdiff.analysis.norms import TAGS, TagThresholds  # noqa: E402
from crossdiff.analysis.scaling import ScalingThresholds  # noqa: E402

TAG_COLORS = {"chat-only": "#d62728", "base-only": "#1f77b4", "shared": "#7f7f7f", "other": "#bcbd22"}
VERDICT_COLORS = {"chat-specific": "#2ca02c", "complete shrinkage": "#ff7f0e", "latent decoupling": "#9467bd",
                  "shrinkage+decoupling": "#8c564b", "uncertain": "#17becf", "out of range": "#e377c2",
                  "too few tokens": "#bcbd22", "no estimate": "#bbbbbb", "dead": "#dddddd"}
"""Keyed by the analysis's guarded verdicts (crossdiff.analysis.verdicts.VERDICTS)."""
FOUND_COLOR = "#d62728"
TEMPLATE_LATENT_SHARE = 0.5
"""A latent with more than this share of its activations on template tokens is a template latent."""
_SIZE = (5.2, 3.6)


@dataclass
class FigureFile:
    name: str
    title: str
    caption: str
    png: Path
    svg: Path


@dataclass
class Found:
    """The latents the analysis found, which every figure shows: the chat-only latents
    (dnorm above the chat-only threshold) when there are any, else the chat-leaning pool of
    findings.json (the live latents of highest dnorm), as the paper's tags then find nothing."""

    mask: np.ndarray
    label: str
    """What they are, for legends and titles (with their count)."""
    noun: str
    """What they are, after a count ("3 of 133 <noun>")."""
    leads: list[int]
    """findings.json's concept leads, best first (labelled in the Latent Scaling figure)."""


def found_latents(table: pd.DataFrame, summary: dict[str, Any], findings: dict[str, Any] | None = None) -> Found:
    tags, _ = thresholds(summary)
    chat_only = (table["tag"].astype(str) == "chat-only").to_numpy()
    leads = [int(c["lead"]) for c in (findings or {}).get("concepts", [])]
    if chat_only.any():
        return Found(chat_only, f"chat-only latents (dnorm > {tags.chat_only:g}): {int(chat_only.sum())}",
                     "chat-only latents", leads)
    if findings is not None:
        size = int(findings.get("pool") or 0)
    else:
        size = FindingsConfig().pool  # the pool findings.json would use
    live = ~table["dead"].to_numpy(dtype=bool) if "dead" in table.columns else np.ones(len(table), dtype=bool)
    order = np.argsort(-np.where(live, table["dnorm"].to_numpy(dtype=float), -np.inf), kind="stable")[:size]
    mask = np.zeros(len(table), dtype=bool)
    mask[order[live[order]]] = True
    low = float(table["dnorm"].to_numpy()[mask].min()) if mask.any() else float("nan")
    return Found(mask, f"chat-leaning pool (none above {tags.chat_only:g}): top {int(mask.sum())} by dnorm, "
                       f">= {low:.2f}", "latents of the chat-leaning pool", leads)


def thresholds(summary: dict[str, Any]) -> tuple[TagThresholds, ScalingThresholds]:
    """The tag and Latent Scaling thresholds the analysis used (defaults when not recorded)."""
    config = summary.get("config") or {}
    tags = TagThresholds(**{k: v for k, v in (config.get("tags") or {}).items() if k in TagThresholds.__dataclass_fields__})
    scaling = ScalingThresholds(**{k: v for k, v in (config.get("scaling") or {}).items()
                                   if k in ScalingThresholds.__dataclass_fields__})
    return tags, scaling


def dnorm_histogram_figure(table: pd.DataFrame, tags: TagThresholds, found: Found | None = None) -> Figure:
    """Relative decoder norm of every latent, log counts, the tag regions shaded, the found latents in red."""
    fig, ax = _axes()
    regions = {"base-only": (0, tags.base_only), "shared": (tags.shared_low, tags.shared_high),
               "chat-only": (tags.chat_only, 1)}
    for tag, (lo, hi) in regions.items():
        ax.axvspan(lo, hi, color=TAG_COLORS[tag], alpha=0.12, lw=0, gid=f"region-{tag}")
    dnorm = table["dnorm"].to_numpy(dtype=float)
    ax.hist(dnorm[np.isfinite(dnorm)], bins=np.linspace(0, 1, 51), color="#333333", log=True, label="all latents")
    if found is not None and found.mask.any():
        ax.hist(dnorm[found.mask & np.isfinite(dnorm)], bins=np.linspace(0, 1, 51), color=FOUND_COLOR, log=True,
                label=found.label, gid="found")
        ax.legend(fontsize=7, loc="upper left")
    for name, value in (("base_only", tags.base_only), ("shared_low", tags.shared_low),
                        ("shared_high", tags.shared_high), ("chat_only", tags.chat_only)):
        ax.axvline(value, color="black", lw=0.8, ls=":", gid=f"threshold-{name}")
    for tag, (lo, hi) in regions.items():
        count = int((table["tag"].astype(str) == tag).sum())
        ax.text((lo + hi) / 2, 1.0, f"{tag}\n{count}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color=TAG_COLORS[tag])
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative decoder norm  (0 = base-only, 1 = chat-only)")
    ax.set_ylabel("latents (log)")
    return fig


def decoder_cosine_figure(table: pd.DataFrame, found: Found | None = None) -> Figure:
    """Cosine between the base and chat decoder vectors, one histogram per tag and one of the found latents."""
    fig, ax = _axes()
    bins = np.linspace(-1, 1, 41)
    tag = table["tag"].astype(str).to_numpy()
    cos = table["dec_cos"].to_numpy(dtype=float)
    for name in TAGS:
        values = cos[(tag == name) & np.isfinite(cos)]
        if values.size:
            ax.hist(values, bins=bins, histtype="step", lw=1.5, color=TAG_COLORS[name], log=True,
                    label=f"{name} ({values.size})")
    if found is not None and found.mask.any() and not (tag[found.mask] == "chat-only").all():
        values = cos[found.mask & np.isfinite(cos)]
        ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.35, color=FOUND_COLOR, log=True, label=found.label,
                gid="found")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine(base decoder, chat decoder)")
    ax.set_ylabel("latents (log)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    return fig


def verdicts(table: pd.DataFrame) -> pd.Series:
    """Latent Scaling's verdict on each latent: the analysis's guarded ``verdict`` column, or
    for a table without one the flags' reading of the chat-only latents ("" for the others)."""
    if "verdict" in table.columns:
        return table["verdict"].fillna("").astype(str)
    chat_only = table["tag"].astype(str) == "chat-only"
    no_estimate = table["nu_error"].isna() | table["nu_recon"].isna()
    out = pd.Series("", index=table.index, dtype=object)
    if {"chat_specific", "complete_shrinkage", "latent_decoupling"} <= set(table.columns):
        shrink, decouple = table["complete_shrinkage"].astype(bool), table["latent_decoupling"].astype(bool)
        out[chat_only & table["chat_specific"].astype(bool)] = "chat-specific"
        out[chat_only & shrink] = "complete shrinkage"
        out[chat_only & decouple] = "latent decoupling"
        out[chat_only & shrink & decouple] = "shrinkage+decoupling"
    out[chat_only & no_estimate] = "no estimate"
    return out


def nu_scatter_figure(table: pd.DataFrame, scaling: ScalingThresholds, found: Found | None = None) -> Figure:
    """nu_error against nu_recon: the found latents (chat-only, else the chat-leaning pool) as
    points by verdict, the shared latents as the reference distribution behind them, the two
    thresholds drawn, findings.json's concept leads labelled."""
    fig, ax = _axes()
    tag = table["tag"].astype(str).to_numpy()
    found = found or Found(tag == "chat-only", "chat-only latents", "chat-only latents", [])
    x, y = table["nu_error"].to_numpy(dtype=float), table["nu_recon"].to_numpy(dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    picked_all = finite & found.mask
    shared = finite & (tag == "shared") & ~found.mask
    view = x[shared | picked_all], y[shared | picked_all]
    xlim = _robust_limits(view[0], scaling.nu_error_max)
    ylim = _robust_limits(view[1], scaling.nu_recon_max)
    if shared.any():
        ax.scatter(np.clip(x[shared], *xlim), np.clip(y[shared], *ylim), s=5, color="#999999", alpha=0.35,
                   edgecolors="none", rasterized=True, label=f"shared latents ({int(shared.sum())})")
    ax.axvspan(xlim[0], scaling.nu_error_max, ymin=0, ymax=(scaling.nu_recon_max - ylim[0]) / (ylim[1] - ylim[0]),
               color=VERDICT_COLORS["chat-specific"], alpha=0.08, lw=0, gid="region-chat-specific")
    verdict = verdicts(table).to_numpy()
    many = int(picked_all.sum()) > 1000  # thousands of vector points make a megabyte SVG: draw them as pixels
    for name, color in VERDICT_COLORS.items():
        picked = picked_all & (verdict == name)
        if picked.any():
            ax.scatter(np.clip(x[picked], *xlim), np.clip(y[picked], *ylim), s=12, color=color, alpha=0.85,
                       edgecolors="none", label=f"{name} ({int(picked.sum())})", gid=f"verdict-{name}", rasterized=many)
    latents = table["latent"].to_numpy()
    for latent in found.leads[:8]:
        row = np.flatnonzero(latents == latent)
        if row.size and finite[row[0]]:
            ax.annotate(str(latent), (np.clip(x[row[0]], *xlim), np.clip(y[row[0]], *ylim)), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", gid=f"lead-{latent}")
    ax.axvline(scaling.nu_error_max, color="black", lw=1, ls="--", gid="threshold-nu_error")
    ax.axhline(scaling.nu_recon_max, color="black", lw=1, ls="--", gid="threshold-nu_recon")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(f"nu_error  (>= {scaling.nu_error_max:g}: Complete Shrinkage)")
    ax.set_ylabel(f"nu_recon  (>= {scaling.nu_recon_max:g}: Latent Decoupling)")
    ax.set_title(found.label if picked_all.any() else f"{found.label}: none with an estimate", fontsize=8)
    ax.legend(fontsize=6, loc="best", framealpha=0.8)
    return fig


def template_share_figure(table: pd.DataFrame, found: Found) -> Figure:
    """Share of activations on chat-template tokens, for the found latents (chat-only ones apart)."""
    fig, ax = _axes()
    share = table["template_share"].to_numpy(dtype=float)
    tag = table["tag"].astype(str).to_numpy()
    picked = np.isfinite(share) & found.mask
    groups = [(f"chat-only ({int((picked & (tag == 'chat-only')).sum())})", picked & (tag == "chat-only"),
               TAG_COLORS["chat-only"]),
              (f"other tags ({int((picked & (tag != 'chat-only')).sum())})", picked & (tag != "chat-only"), "#ff9896")]
    bins = np.linspace(0, 1, 21)
    values = [share[mask] for _, mask, _ in groups]
    if any(v.size for v in values):
        ax.hist(values, bins=bins, stacked=True, color=[c for *_, c in groups], label=[g[0] for g in groups])
        ax.legend(fontsize=8, loc="upper center")
    else:
        ax.text(0.5, 0.5, "no found latent has a template share", transform=ax.transAxes, ha="center", va="center")
    ax.axvline(TEMPLATE_LATENT_SHARE, color="black", lw=1, ls="--", gid="threshold-template")
    templated = int((share[picked] > TEMPLATE_LATENT_SHARE).sum())
    ax.set_title(f"{templated} of the {int(picked.sum())} {found.noun} fire mostly on the chat template", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("template share (activations on chat-template tokens)")
    ax.set_ylabel("latents")
    return fig


def condition_labels(kl: pd.DataFrame) -> list[str]:
    """One label per row: the condition, with its form (replace / add) where it has one."""
    forms = kl["form"] if "form" in kl.columns else pd.Series(None, index=kl.index)
    return [f"{c} ({f})" if isinstance(f, str) and f else str(c) for c, f in zip(kl["condition"], forms)]


def closed_shares(kl: pd.DataFrame) -> pd.DataFrame:
    """Per condition and subset, the share of None's KL it closes: 1 - KL / KL(None), with the
    interval of the condition's KL over None's mean (None's own uncertainty is shown by its
    row, whose interval is its KL's over its mean). NaN where None's KL is missing or 0."""
    rows = kl.assign(label=condition_labels(kl))
    none = rows[rows["condition"].astype(str) == "None"].set_index("subset")["kl_mean"]
    base = rows["subset"].map(none).astype(float).where(lambda v: v > 0)
    return rows.assign(closed=1 - rows["kl_mean"] / base, closed_low=1 - rows["ci_high"] / base,
                       closed_high=1 - rows["ci_low"] / base)[["label", "condition", "subset", "closed", "closed_low",
                                                                "closed_high", "kl_mean"]]


def closed_figure(kl: pd.DataFrame) -> Figure:
    """The paper's causal figure: share of None's KL each condition closes, per token subset, with intervals."""
    shares = closed_shares(kl)
    labels = list(dict.fromkeys(shares["label"]))
    subsets = list(dict.fromkeys(shares["subset"].astype(str)))
    fig, ax = plt.subplots(figsize=(_SIZE[0] + 1, 0.32 * len(labels) + 1.4), layout="constrained")
    for i, subset in enumerate(subsets):
        rows = shares[(shares["subset"].astype(str) == subset) & shares["closed"].notna()]
        pos = [labels.index(c) + (i - (len(subsets) - 1) / 2) * 0.22 for c in rows["label"]]
        mean = rows["closed"].to_numpy(dtype=float)
        err = np.stack([mean - rows["closed_low"].to_numpy(dtype=float), rows["closed_high"].to_numpy(dtype=float) - mean])
        ax.errorbar(100 * mean, pos, xerr=100 * np.clip(np.nan_to_num(err), 0, None), fmt="o", ms=3.5, capsize=2,
                    label=subset, gid=f"closed-{subset}")
    ax.axvline(0, color="black", lw=0.8, ls="--", gid="closed-none")
    ax.axvline(100, color="black", lw=0.8, ls=":", gid="closed-chat")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of None's KL closed (%)")
    ax.legend(title="tokens", fontsize=7, title_fontsize=7, loc="lower right")
    return fig


def kl_figure(kl: pd.DataFrame) -> Figure:
    """KL(chat || patched) per condition, one marker per token subset, with confidence intervals."""
    labels = condition_labels(kl)
    conditions = list(dict.fromkeys(labels))
    subsets = list(dict.fromkeys(kl["subset"].astype(str)))
    fig, ax = plt.subplots(figsize=(_SIZE[0] + 1, 0.32 * len(conditions) + 1.4), layout="constrained")
    for i, subset in enumerate(subsets):
        here = (kl["subset"].astype(str) == subset).to_numpy()
        rows = kl[here]
        pos = [conditions.index(c) + (i - (len(subsets) - 1) / 2) * 0.22 for c, h in zip(labels, here) if h]
        mean = rows["kl_mean"].to_numpy(dtype=float)
        err = np.stack([mean - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - mean])
        ax.errorbar(mean, pos, xerr=np.clip(np.nan_to_num(err), 0, None), fmt="o", ms=3.5, capsize=2, label=subset)
    ax.set_yticks(range(len(conditions)), conditions, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("KL divergence to the chat model's next-token distribution")
    ax.legend(title="tokens", fontsize=7, title_fontsize=7)
    return fig


FIGURE_TEXT: dict[str, tuple[str, str]] = {
    "closed": ("Causal effect: share of None's KL closed",
               "Per condition, 1 - KL / KL(None) on the chat model's answer tokens, per token subset; intervals: the "
               "condition's 95% interval over None's mean (None's own row shows its uncertainty). 0: the base "
               "residual as is; 100%: the chat model's own output."),
    "dnorm": ("Relative decoder norm", "Latents by relative decoder norm; shaded: the tag regions; red: the latents "
                                       "the analysis found (chat-only, else the chat-leaning pool)."),
    "dec_cos": ("Decoder cosine by tag", "Cosine between each latent's base and chat decoder vectors; filled: the "
                                         "chat-leaning pool when no latent is chat-only."),
    "nu": ("Latent Scaling: nu_error vs nu_recon",
           "The found latents (chat-only, else the chat-leaning pool) by verdict over the shared latents' "
           "distribution (grey); dashed: the thresholds; numbers: the concepts' lead latents. Points beyond the "
           "view sit on its edge."),
    "template": ("Template share of the found latents",
                 "How much of each found latent's activation falls on chat-template tokens."),
    "kl": ("Causal effect: KL per condition", "Mean KL with 95% intervals, per token subset."),
}


def draw_figures(table: pd.DataFrame, summary: dict[str, Any], kl: pd.DataFrame | None = None,
                 findings: dict[str, Any] | None = None) -> dict[str, Figure]:
    """Every figure the data allows, by name (``closed``, ``dnorm``, ``dec_cos``, ``nu``,
    ``template``, ``kl``); ``findings`` is findings.json (crossdiff.analysis.concepts), when present."""
    tags, scaling = thresholds(summary)
    found = found_latents(table, summary, findings)
    figures = {}
    if kl is not None and len(kl) and (kl["condition"].astype(str) == "None").any():
        figures["closed"] = closed_figure(kl)
    figures.update({
        "dnorm": dnorm_histogram_figure(table, tags, found),
        "dec_cos": decoder_cosine_figure(table, found),
        "nu": nu_scatter_figure(table, scaling, found),
    })
    if "template_share" in table.columns:
        figures["template"] = template_share_figure(table, found)
    if kl is not None and len(kl):
        figures["kl"] = kl_figure(kl)
    return figures


def write_figures(table: pd.DataFrame, summary: dict[str, Any], folder: str | Path,
                  kl: pd.DataFrame | None = None, findings: dict[str, Any] | None = None) -> list[FigureFile]:
    """Save every figure as ``<name>.png`` and ``<name>.svg`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context({"svg.hashsalt": "crossdiff", "svg.fonttype": "none", "font.size": 9}):
        for name, fig in draw_figures(table, summary, kl, findings).items():
            png, svg = folder / f"{name}.png", folder / f"{name}.svg"
            fig.savefig(png, dpi=110)
            fig.savefig(svg, metadata={"Date": None})
            plt.close(fig)
            written.append(FigureFile(name, *FIGURE_TEXT[name], png, svg))
    return written


def _axes():
    """A figure with fixed margins (a layout engine would cost a second full draw per save)."""
    fig, ax = plt.subplots(figsize=_SIZE)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.87)
    return fig, ax


def _robust_limits(values: np.ndarray, threshold: float) -> tuple[float, float]:
    """A view holding the bulk of the values (2nd..98th percentile) and the threshold."""
    lo, hi = (np.percentile(values, [2, 98]) if values.size else (0.0, 1.0))
    lo, hi = min(lo, 0.0, threshold), max(hi, 1.0, threshold)
    pad = 0.05 * (hi - lo)
    return float(lo - pad), float(hi + pad)
