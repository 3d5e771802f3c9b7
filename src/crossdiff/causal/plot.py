"""The KL figure in the paper's style: one panel per token subset, a bar per condition
(replace and add forms side by side), 95% intervals as error bars, the None level as a
dashed line; several crosscoders (L1, BatchTopK) as rows of panels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SUBSET_TITLES = {"all": "all assistant tokens", "first_k": "first {k} assistant tokens", "rest": "remaining assistant tokens"}
FORM_COLOURS = {None: "#555555", "replace": "#1f77b4", "add": "#ff7f0e"}


def plot_kl(tables: dict[str, pd.DataFrame], path: str | Path, *, k_first: int = 10, format: str | None = None) -> Path:
    """Write the figure for ``{crosscoder name: kl table}`` to ``path`` (``format``, or the suffix's)."""
    # deferred: matplotlib (about a second) and its Agg backend only when a figure is drawn; causal.experiment imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as above, after the backend is chosen

    subsets = ["all", "first_k", "rest"]
    n_rows = len(tables)
    n_conditions = max(t["condition"].nunique() for t in tables.values())
    fig, axes = plt.subplots(n_rows, len(subsets), figsize=(4.2 * len(subsets), 0.32 * n_conditions * 2 + 1.2 * n_rows + 0.6),
                             squeeze=False, sharey="row")
    for r, (name, table) in enumerate(tables.items()):
        order = list(dict.fromkeys(table["condition"]))
        for c, subset in enumerate(subsets):
            ax = axes[r][c]
            part = table[table["subset"] == subset]
            for form, shift in ((None, 0.0), ("replace", -0.2), ("add", 0.2)):
                rows = part[part["form"].isna()] if form is None else part[part["form"] == form]
                if rows.empty:
                    continue
                y = [order.index(cond) + shift for cond in rows["condition"]]
                err = [(rows["kl_mean"] - rows["ci_low"]).clip(lower=0).fillna(0), (rows["ci_high"] - rows["kl_mean"]).clip(lower=0).fillna(0)]
                ax.barh(y, rows["kl_mean"], height=0.38 if form else 0.6, xerr=err, color=FORM_COLOURS[form],
                        label=form or "baseline", capsize=2)
            none = part[part["condition"] == "None"]["kl_mean"]
            if len(none):
                ax.axvline(float(none.iloc[0]), color="black", linestyle="--", linewidth=0.8)
            ax.set_yticks(range(len(order)), order)
            ax.invert_yaxis()
            ax.set_xlabel("KL(p_chat || p_patched)")
            ax.set_title(f"{name}: {SUBSET_TITLES[subset].format(k=k_first)}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        axes[r][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, format=format or path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
