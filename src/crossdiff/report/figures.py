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

from crossdiff.analysis.norms import TAGS, TagThresholds  # noqa: E402
from crossdiff.analysis.scaling import ScalingThresholds  # noqa: E402

TAG_COLORS = {"chat-only": "#d62728", "base-only": "#1f77b4", "shared": "#7f7f7f", "other": "#bcbd22"}
VERDICT_COLORS = {"chat-specific": "#2ca02c", "Complete Shrinkage": "#ff7f0e", "Latent Decoupling": "#9467bd",
                  "both": "#8c564b", "no estimate": "#bbbbbb"}
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


def thresholds(summary: dict[str, Any]) -> tuple[TagThresholds, ScalingThresholds]:
    """The tag and Latent Scaling thresholds the analysis used (defaults when not recorded)."""
    config = summary.get("config") or {}
    tags = TagThresholds(**{k: v for k, v in (config.get("tags") or {}).items() if k in TagThresholds.__dataclass_fields__})
    scaling = ScalingThresholds(**{k: v for k, v in (config.get("scaling") or {}).items()
                                   if k in ScalingThresholds.__dataclass_fields__})
    return tags, scaling


def dnorm_histogram_figure(table: pd.DataFrame, tags: TagThresholds) -> Figure:
    """Relative decoder norm of every latent, log counts, the tag regions shaded."""
    fig, ax = _axes()
    regions = {"base-only": (0, tags.base_only), "shared": (tags.shared_low, tags.shared_high),
               "chat-only": (tags.chat_only, 1)}
    for tag, (lo, hi) in regions.items():
        ax.axvspan(lo, hi, color=TAG_COLORS[tag], alpha=0.12, lw=0, gid=f"region-{tag}")
    dnorm = table["dnorm"].to_numpy(dtype=float)
    ax.hist(dnorm[np.isfinite(dnorm)], bins=np.linspace(0, 1, 51), color="#333333", log=True)
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


def decoder_cosine_figure(table: pd.DataFrame) -> Figure:
    """Cosine between the base and chat decoder vectors, one histogram per tag."""
    fig, ax = _axes()
    bins = np.linspace(-1, 1, 41)
    tag = table["tag"].astype(str).to_numpy()
    cos = table["dec_cos"].to_numpy(dtype=float)
    for name in TAGS:
        values = cos[(tag == name) & np.isfinite(cos)]
        if values.size:
            ax.hist(values, bins=bins, histtype="step", lw=1.5, color=TAG_COLORS[name], log=True,
                    label=f"{name} ({values.size})")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine(base decoder, chat decoder)")
    ax.set_ylabel("latents (log)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    return fig


def verdicts(table: pd.DataFrame) -> pd.Series:
    """Latent Scaling's verdict on each chat-only latent ("" for other latents)."""
    if "verdict" in table.columns:
        return table["verdict"].fillna("").astype(str)
    chat_only = table["tag"].astype(str) == "chat-only"
    no_estimate = table["nu_error"].isna() | table["nu_recon"].isna()
    out = pd.Series("", index=table.index, dtype=object)
    if {"chat_specific", "complete_shrinkage", "latent_decoupling"} <= set(table.columns):
        shrink, decouple = table["complete_shrinkage"].astype(bool), table["latent_decoupling"].astype(bool)
        out[chat_only & table["chat_specific"].astype(bool)] = "chat-specific"
        out[chat_only & shrink] = "Complete Shrinkage"
        out[chat_only & decouple] = "Latent Decoupling"
        out[chat_only & shrink & decouple] = "both"
    out[chat_only & no_estimate] = "no estimate"
    return out


def nu_scatter_figure(table: pd.DataFrame, scaling: ScalingThresholds) -> Figure:
    """nu_error against nu_recon: chat-only latents as points by verdict, shared latents as
    the reference distribution behind them, the two thresholds drawn."""
    fig, ax = _axes()
    tag = table["tag"].astype(str).to_numpy()
    x, y = table["nu_error"].to_numpy(dtype=float), table["nu_recon"].to_numpy(dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    shared, chat = finite & (tag == "shared"), finite & (tag == "chat-only")
    view = x[shared | chat], y[shared | chat]
    xlim = _robust_limits(view[0], scaling.nu_error_max)
    ylim = _robust_limits(view[1], scaling.nu_recon_max)
    if shared.any():
        ax.scatter(np.clip(x[shared], *xlim), np.clip(y[shared], *ylim), s=5, color="#999999", alpha=0.35,
                   edgecolors="none", rasterized=True, label=f"shared latents ({int(shared.sum())})")
    ax.axvspan(xlim[0], scaling.nu_error_max, ymin=0, ymax=(scaling.nu_recon_max - ylim[0]) / (ylim[1] - ylim[0]),
               color=VERDICT_COLORS["chat-specific"], alpha=0.08, lw=0, gid="region-chat-specific")
    verdict = verdicts(table).to_numpy()
    for name, color in VERDICT_COLORS.items():
        picked = chat & (verdict == name)
        if picked.any():
            ax.scatter(np.clip(x[picked], *xlim), np.clip(y[picked], *ylim), s=12, color=color, alpha=0.85,
                       edgecolors="none", label=f"{name} ({int(picked.sum())})")
    ax.axvline(scaling.nu_error_max, color="black", lw=1, ls="--", gid="threshold-nu_error")
    ax.axhline(scaling.nu_recon_max, color="black", lw=1, ls="--", gid="threshold-nu_recon")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(f"nu_error  (>= {scaling.nu_error_max:g}: Complete Shrinkage)")
    ax.set_ylabel(f"nu_recon  (>= {scaling.nu_recon_max:g}: Latent Decoupling)")
    if not chat.any():
        ax.text(0.03, 0.97, "no chat-only latents", transform=ax.transAxes, ha="left", va="top", color="#d62728",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return fig


def template_share_figure(table: pd.DataFrame, tags: TagThresholds) -> Figure:
    """Share of activations on chat-template tokens, for the chat-leaning latents."""
    fig, ax = _axes()
    share = table["template_share"].to_numpy(dtype=float)
    dnorm = table["dnorm"].to_numpy(dtype=float)
    tag = table["tag"].astype(str).to_numpy()
    leaning = np.isfinite(share) & (dnorm > tags.shared_high)
    groups = [(f"chat-only ({int((leaning & (tag == 'chat-only')).sum())})", leaning & (tag == "chat-only"),
               TAG_COLORS["chat-only"]),
              (f"{tags.shared_high:g} < dnorm <= {tags.chat_only:g} ({int((leaning & (tag != 'chat-only')).sum())})",
               leaning & (tag != "chat-only"), "#ff9896")]
    bins = np.linspace(0, 1, 21)
    values = [share[mask] for _, mask, _ in groups]
    if any(v.size for v in values):
        ax.hist(values, bins=bins, stacked=True, color=[c for *_, c in groups], label=[g[0] for g in groups])
        ax.legend(fontsize=8, loc="upper center")
    else:
        ax.text(0.5, 0.5, "no chat-leaning latents", transform=ax.transAxes, ha="center", va="center")
    ax.axvline(TEMPLATE_LATENT_SHARE, color="black", lw=1, ls="--", gid="threshold-template")
    templated = int((share[leaning] > TEMPLATE_LATENT_SHARE).sum())
    ax.set_title(f"{templated} of {int(leaning.sum())} chat-leaning latents fire mostly on the chat template",
                 fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("template share (activations on chat-template tokens)")
    ax.set_ylabel("latents")
    return fig


def kl_figure(kl: pd.DataFrame) -> Figure:
    """KL(chat || patched) per condition, one marker per token subset, with confidence intervals."""
    conditions = list(dict.fromkeys(kl["condition"].astype(str)))
    subsets = list(dict.fromkeys(kl["subset"].astype(str)))
    fig, ax = plt.subplots(figsize=(_SIZE[0] + 1, 0.45 * len(conditions) + 1.4), layout="constrained")
    for i, subset in enumerate(subsets):
        rows = kl[kl["subset"].astype(str) == subset]
        pos = [conditions.index(c) + (i - (len(subsets) - 1) / 2) * 0.22 for c in rows["condition"].astype(str)]
        mean = rows["kl_mean"].to_numpy(dtype=float)
        err = np.stack([mean - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - mean])
        ax.errorbar(mean, pos, xerr=np.clip(err, 0, None), fmt="o", ms=4, capsize=2, label=subset)
    ax.set_yticks(range(len(conditions)), conditions, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KL divergence to the chat model's next-token distribution")
    ax.legend(title="tokens", fontsize=8, title_fontsize=8)
    return fig


FIGURE_TEXT: dict[str, tuple[str, str]] = {
    "dnorm": ("Relative decoder norm", "Latents by relative decoder norm; shaded: the tag regions."),
    "dec_cos": ("Decoder cosine by tag", "Cosine between each latent's base and chat decoder vectors."),
    "nu": ("Latent Scaling: nu_error vs nu_recon",
           "Chat-only latents by verdict over the shared latents' distribution (grey); dashed: the thresholds. "
           "Points beyond the view sit on its edge."),
    "template": ("Template share of chat-leaning latents",
                 "How much of each chat-leaning latent's activation falls on chat-template tokens."),
    "kl": ("Causal effect: KL per condition", "Mean KL with confidence intervals, per token subset."),
}


def draw_figures(table: pd.DataFrame, summary: dict[str, Any], kl: pd.DataFrame | None = None) -> dict[str, Figure]:
    """Every figure the data allows, by name (``dnorm``, ``dec_cos``, ``nu``, ``template``, ``kl``)."""
    tags, scaling = thresholds(summary)
    figures = {
        "dnorm": dnorm_histogram_figure(table, tags),
        "dec_cos": decoder_cosine_figure(table),
        "nu": nu_scatter_figure(table, scaling),
    }
    if "template_share" in table.columns:
        figures["template"] = template_share_figure(table, tags)
    if kl is not None and len(kl):
        figures["kl"] = kl_figure(kl)
    return figures


def write_figures(table: pd.DataFrame, summary: dict[str, Any], folder: str | Path,
                  kl: pd.DataFrame | None = None) -> list[FigureFile]:
    """Save every figure as ``<name>.png`` and ``<name>.svg`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context({"svg.hashsalt": "crossdiff", "svg.fonttype": "none", "font.size": 9}):
        for name, fig in draw_figures(table, summary, kl).items():
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
