"""What the analysis found, ranked instead of thresholded: the summary a researcher reads first.

The paper's tags cut at dnorm > 0.9. On a small pair, or a crosscoder trained briefly,
the most chat-leaning latents can sit well below that (the bundled organism's planted
behaviours are at 0.7-0.85), and a count of "chat-only" latents then says nothing. This
module reports instead:

* the distribution of dnorm over live latents (quantiles and a histogram);
* the top chat-leaning latents by dnorm, and by the paper's Latent Scaling rank-sum
  (rank of nu_error + rank of nu_recon over latents with a decided verdict), each with its
  verdict, token count, template share and top context;
* every chat-specific latent, whatever its dnorm;
* disjoint verdict counts (crossdiff.analysis.verdicts), which add up.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd

from crossdiff.analysis.verdicts import BASE_VERDICTS, VERDICTS
from crossdiff.terminal import printable

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
HISTOGRAM_BINS = 20
ROW_FIELDS = ("latent", "dnorm", "tag", "verdict", "nu_error", "nu_error_se", "nu_recon", "nu_recon_se",
              "scaling_tokens", "n_active", "template_share", "rank_sum")


def find(table: pd.DataFrame, *, n_top: int = 10, context: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The ranked findings of a latent table (plain data, ready for summary.json)."""
    live = ~table["dead"].to_numpy()
    dnorm = table["dnorm"].to_numpy()
    chat_leaning = live & (dnorm > 0.5)
    base_leaning = live & (dnorm < 0.5)

    def rows(frame: pd.DataFrame, fields: tuple[str, ...] = ROW_FIELDS) -> list[dict[str, Any]]:
        out = []
        for record in frame.to_dict("records"):
            row = {name: record.get(name) for name in fields if name in record}
            row["tag"] = str(row.get("tag"))
            row.update(_roles(record))
            if context is not None:
                row["context"] = context(int(record["latent"]))
            out.append(row)
        return out

    leaning = table[chat_leaning]
    specific = table[table["verdict"].to_numpy() == "chat-specific"]
    findings: dict[str, Any] = {
        "dnorm": distribution(dnorm[live]),
        "verdicts": {
            "all": count(table["verdict"], VERDICTS),
            "chat_only": count(table.loc[table["tag"] == "chat-only", "verdict"], VERDICTS),
            "chat_leaning": count(leaning["verdict"], VERDICTS),
        },
        "top_by_dnorm": rows(leaning.sort_values("dnorm", ascending=False, kind="stable").head(n_top)),
        "top_by_rank_sum": rows(leaning[leaning["rank_sum"].notna()].sort_values("rank_sum", kind="stable").head(n_top)),
        "chat_specific": {
            "total": len(specific),
            "by_tag": {str(tag): int(n) for tag, n in specific["tag"].value_counts(sort=False).items()},
            "latents": rows(specific.sort_values("rank_sum", kind="stable").head(n_top)),
        },
    }
    if "base_dir_verdict" in table:
        base = table[base_leaning]
        base_fields = ("latent", "dnorm", "tag", "base_dir_verdict", "base_dir_nu_error", "base_dir_nu_error_se",
                       "base_dir_nu_recon", "base_dir_nu_recon_se", "scaling_tokens", "n_active", "template_share")
        findings["base_direction"] = {
            "base_leaning": count(base["base_dir_verdict"], BASE_VERDICTS),
            "top_by_dnorm": rows(base.sort_values("dnorm", kind="stable").head(n_top), base_fields),
        }
    return findings


def distribution(values: np.ndarray) -> dict[str, Any]:
    """Quantiles and a histogram over [0, 1] of the live latents' dnorm."""
    values = values[~np.isnan(values)]
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return {
        "n": int(values.size),
        "quantiles": {f"{q:g}": (float(np.quantile(values, q)) if values.size else math.nan) for q in QUANTILES},
        "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
    }


def count(verdict: pd.Series, names: tuple[str, ...]) -> dict[str, int]:
    """How many latents got each verdict (every name present, so the counts add up)."""
    counts = verdict.astype(str).value_counts()
    return {name: int(counts.get(name, 0)) for name in names}


def format_findings(findings: dict[str, Any], *, width: int = 40) -> str:
    """The findings as terminal text: histogram, verdict counts, ranked latents."""
    lines = ["relative decoder norm of live latents (dnorm, 1 = chat-only):"]
    d = findings["dnorm"]
    q = d["quantiles"]
    lines.append("  quantiles  " + "  ".join(f"{k}: {_num(v, '.2f')}" for k, v in q.items()))
    counts, edges = d["histogram"]["counts"], d["histogram"]["edges"]
    peak = max(counts) if counts and max(counts) else 1
    for i, n in enumerate(counts):
        bar = "#" * (math.ceil(width * n / peak) if n else 0)
        lines.append(f"  {edges[i]:.2f}-{edges[i + 1]:.2f} | {bar} {n}" if n else f"  {edges[i]:.2f}-{edges[i + 1]:.2f} |")
    v = findings["verdicts"]
    for group, label in (("all", "all latents"), ("chat_leaning", "chat-leaning (dnorm > 0.5)"), ("chat_only", "chat-only (dnorm > 0.9)")):
        total = sum(v[group].values())
        parts = ", ".join(f"{name} {n}" for name, n in v[group].items() if n)
        lines.append(f"verdicts, {label}: {total} = {parts or 'none'}")
    cs = findings["chat_specific"]
    by_tag = ", ".join(f"{tag} {n}" for tag, n in cs["by_tag"].items() if n)
    lines.append(f"chat-specific latents at any dnorm: {cs['total']}" + (f" ({by_tag})" if by_tag else ""))
    for key, title in (("top_by_dnorm", "top chat-leaning latents by dnorm"),
                       ("top_by_rank_sum", "top chat-leaning latents by Latent Scaling rank-sum (low = most chat-specific)")):
        lines.append(title + ":")
        lines.extend(format_row(row) for row in findings[key])
        if not findings[key]:
            lines.append("  (none)")
    return "\n".join(lines)


def format_row(row: dict[str, Any]) -> str:
    text = (f"  latent {row['latent']:6d}  dnorm {row['dnorm']:.2f}  {row.get('verdict', '-'):20s}  "
            f"nu_error {_pm(row.get('nu_error'), row.get('nu_error_se'))}  nu_recon {_pm(row.get('nu_recon'), row.get('nu_recon_se'))}  "
            f"tokens {row.get('scaling_tokens', 0):6d}  template {_num(row.get('template_share'), '.2f')}")
    roles = {k[len('role_'):]: v for k, v in row.items() if k.startswith("role_") and v and v >= 0.05}
    if roles:
        text += "  roles " + ",".join(f"{k} {v:.2f}" for k, v in sorted(roles.items(), key=lambda kv: -kv[1]))
    if row.get("context"):
        text += f"  top: {printable(row['context'])}"  # summary.json is a file anyone may have edited
    return text


def _roles(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith("role_")}


def _pm(value: Any, se: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "   nan      "
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{value:+6.2f}±?     "
    return f"{value:+6.2f}±{se:.3f} " if se < 10 else f"{value:+6.2f}±{se:.0f}  "


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return format(value, spec)
