"""The report at scale: is a 100k-latent report interactive within 3 s in headless Chromium?

Builds a synthetic analysis with realistic columns (every latent-table column, two text
sources, Latent Scaling values and flags, twins) and realistic examples (10 top + 10
quantile examples per live latent, windows of 32 + 1 + 8 tokens, Zipf-distributed token
ids over a 50k vocabulary, sparse activations, an activation histogram per source) in the
files `crossdiff analyze` writes,
then `crossdiff.report.build_report` on it, and measures in Chromium (driven by
Playwright, as in the tests):

* load: from navigation to the first table rows on screen (parses the table data);
* sort: clicking a column header until the re-sorted rows are shown;
* filter: choosing a tag until the filtered rows are shown;
* search: typing a text once the search data has loaded (it loads when the search box is
  first focused; how long that took is "search data");
* panel: opening a latent until its highlighted examples are shown (loads one chunk).

Each is timed from Python around the Playwright calls (an upper bound: it includes the
driver's round trips) and, where the page records it (``CROSSDIFF.timing``), inside the
page: load = navigation start to the first rows drawn, sort/filter/search = the table
update itself (the rest of the wall time is the driver and the page still parsing the
columns loaded after the first rows).

"Interactive" = load + sort. Baseline, same run, same code: a 1k-latent report; the
ratios show how the page scales with 100x the latents. Also prints the build time and
the report's size on disk.

    python benchmarks/report.py                      # 100k latents (about 10 min on 2 busy cores)
    python benchmarks/report.py --latents 20000 --keep runs/bench-report
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crossdiff.analysis.config import ScalingThresholds
from crossdiff.analysis.norms import TagThresholds, tag_latents
from crossdiff.analysis.roles import ROLES
from crossdiff.analysis.scaling import LatentScalingResult
from crossdiff.analysis.table import COLUMNS, add_verdict_columns, summarize, write_table
from crossdiff.report import build_report
from crossdiff.report.browser import chromium

N_TOP, N_QUANTILE, BEFORE, AFTER, VOCAB = 10, 10, 32, 8, 50_000
SOURCES = ["pretraining", "chat"]


def synthetic_analysis(folder: Path, n_latents: int, seed: int = 0) -> None:
    """latents.parquet, summary.json, twins.parquet and examples.sqlite for ``n_latents`` latents."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    # dnorm: mostly shared, a tail towards each model, spikes of model-only latents (as trained crosscoders show).
    kind = rng.choice(4, n_latents, p=[0.85, 0.06, 0.05, 0.04])
    dnorm = np.where(kind == 0, rng.normal(0.5, 0.06, n_latents),
                     np.where(kind == 1, rng.uniform(0.6, 0.9, n_latents),
                              np.where(kind == 2, rng.uniform(0.9, 1.0, n_latents), rng.uniform(0.0, 0.1, n_latents))))
    dnorm = np.clip(dnorm, 0, 1)
    tags = tag_latents(dnorm, TagThresholds())
    dead = rng.random(n_latents) < 0.05
    freq = np.where(dead, 0.0, 10 ** rng.uniform(-5, -1, n_latents))
    n_tokens = 50_000_000
    nu_error = np.where(dead, np.nan, rng.normal(0.5, 0.4, n_latents))
    nu_recon = np.where(dead, np.nan, rng.normal(0.7, 0.4, n_latents))
    chat_only = tags == "chat-only"
    table = pd.DataFrame({
        "latent": np.arange(n_latents, dtype=np.int64), "dnorm": dnorm,
        "tag": pd.Categorical(tags, categories=["chat-only", "base-only", "shared", "other"]),
        "norm_base": rng.uniform(0.2, 1.2, n_latents), "norm_chat": rng.uniform(0.2, 1.2, n_latents),
        "dec_cos": np.clip(rng.normal(0.8, 0.2, n_latents), -1, 1), "enc_cos": np.clip(rng.normal(0.9, 0.1, n_latents), -1, 1),
        "n_active": (freq * n_tokens).astype(np.int64), "freq": freq, "max_act": np.where(dead, 0, rng.gamma(2, 3, n_latents)),
    })
    for source in SOURCES:
        table[f"freq__{source}"] = freq * rng.uniform(0, 2, n_latents)
        table[f"max_act__{source}"] = table["max_act"] * rng.uniform(0.3, 1, n_latents)
    table["dead"] = dead
    table["template_share"] = np.where(dead, np.nan, rng.beta(0.3, 3, n_latents))
    table["bos_share"] = np.where(dead, np.nan, rng.beta(0.1, 10, n_latents))
    for target in ("error", "recon", "act"):
        table[f"beta_{target}_chat"] = np.where(dead, np.nan, rng.normal(1, 0.2, n_latents))
        table[f"beta_{target}_base"] = table[f"beta_{target}_chat"] * (nu_error if target == "error" else nu_recon)
    table["nu_error"], table["nu_recon"] = nu_error, nu_recon
    table["scaling_tokens"] = table["n_active"]
    table["chat_specific"] = chat_only & (nu_error < 0.2) & (nu_recon < 0.5)
    table["complete_shrinkage"] = chat_only & (nu_error >= 0.2)
    table["latent_decoupling"] = chat_only & (nu_recon >= 0.5)
    base_only = np.nonzero(tags == "base-only")[0]
    has_twin = chat_only & (rng.random(n_latents) < 0.3)
    table["twin"] = np.where(has_twin, rng.choice(base_only, n_latents), -1)
    table["twin_cos"] = np.where(has_twin, rng.uniform(0.5, 1, n_latents), np.nan)
    # Uncertainties, guarded verdicts, the rank-sum and the base direction, as the analysis derives them.
    betas = {f"beta_{t}": table[f"beta_{t}"].to_numpy() for t in ("error_base", "error_chat", "recon_base", "recon_chat",
                                                                  "act_base", "act_chat")}
    se = lambda: np.where(dead, np.nan, rng.uniform(0.005, 0.2, n_latents))  # noqa: E731
    chat = LatentScalingResult(**betas, nu_error=nu_error, nu_recon=nu_recon, n_tokens=table["n_active"].to_numpy(),
                               nu_error_se=se(), nu_recon_se=se())
    mirrored = {f"beta_{t}_{m}": betas[f"beta_{t}_{o}"] for t in ("error", "recon", "act") for m, o in (("base", "chat"), ("chat", "base"))}
    base = chat._replace(**mirrored, nu_error=np.where(dead, np.nan, rng.normal(0.8, 0.3, n_latents)),
                         nu_recon=np.where(dead, np.nan, rng.normal(0.9, 0.3, n_latents)), nu_error_se=se(), nu_recon_se=se())
    add_verdict_columns(table, chat, base, ScalingThresholds())
    roles = rng.dirichlet(np.full(len(ROLES), 0.5), n_latents)
    for r, name in enumerate(ROLES):
        table[f"role_{name}"] = np.where(dead, np.nan, roles[:, r])
    assert set(table.columns) == {c for c in COLUMNS if "<source>" not in c} | {
        f"{stat}__{s}" for stat in ("freq", "max_act") for s in SOURCES}
    pd.DataFrame({"chat_latent": np.nonzero(has_twin)[0], "base_latent": table["twin"][has_twin],
                  "cosine": table["twin_cos"][has_twin]}).to_parquet(folder / "twins.parquet")
    summary = summarize(table, n_tokens=n_tokens, quality={"fve_base": 0.8, "fve_chat": 0.79, "fve": 0.795, "l0": 100.0},
                        crosscoder={"activation": "batchtopk", "d_in": 2304, "d_sae": n_latents, "k": 100,
                                    "model_names": ["google/gemma-2-2b", "google/gemma-2-2b-it"], "layer": 13},
                        config={"n_top": N_TOP, "quantile_bins": N_QUANTILE, "per_bin": 1})
    write_table(table, summary, folder)
    _synthetic_examples(folder / "examples.sqlite", table, rng)


def _synthetic_examples(path: Path, table: pd.DataFrame, rng: np.random.Generator) -> None:
    """examples.sqlite in the schema of crossdiff.analysis.examples.write_examples."""
    path.unlink(missing_ok=True)
    width = BEFORE + 1 + AFTER
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(1, 8))) for _ in range(VOCAB)]
    texts = [(" " if i % 3 else "") + w for i, w in enumerate(words)]
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE examples (
                latent INTEGER, kind TEXT, rank INTEGER, activation REAL,
                source TEXT, doc_id INTEGER, position INTEGER,
                window_start INTEGER, token_index INTEGER, token_ids TEXT, activations TEXT);
            CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE histograms (latent INTEGER PRIMARY KEY, counts TEXT);
            """
        )
        live = table.loc[~table["dead"], ["latent", "max_act", "freq"]].to_numpy()
        # Active tokens per source and bin of the max: most of them in the lowest bins, as for real latents.
        shares = rng.dirichlet(np.full(len(SOURCES), 0.7), len(live))[:, :, None] * 0.5 ** np.arange(N_QUANTILE)
        counts = np.rint(table.loc[~table["dead"], "n_active"].to_numpy()[:, None, None] * shares / shares.sum(axis=(1, 2),
                         keepdims=True)).astype(np.int64)
        db.executemany("INSERT INTO histograms VALUES (?,?)", [(int(latent), json.dumps(c.tolist(), separators=(",", ":")))
                                                               for latent, c in zip(live[:, 0], counts)])
        per = N_TOP + N_QUANTILE
        for start in range(0, len(live), 2000):
            block = live[start:start + 2000]
            n = len(block) * per
            ids = np.minimum(rng.zipf(1.3, (n, width)), VOCAB) - 1
            acts = np.where(rng.random((n, width)) < 0.15, rng.random((n, width)), 0.0)
            peak = np.repeat(block[:, 1], per) * np.concatenate([np.linspace(1, 0.6, N_TOP), np.linspace(0.95, 0.05, N_QUANTILE)] * len(block))
            acts = np.round(acts * peak[:, None], 6)
            acts[:, BEFORE] = np.round(peak, 6)
            rows = []
            for j in range(n):
                latent, r = int(block[j // per, 0]), j % per
                kind, rank = ("top", r) if r < N_TOP else ("quantile", N_QUANTILE - 1 - (r - N_TOP))
                doc, position = int(rng.integers(0, 1 << 20)), int(rng.integers(BEFORE, 1000))
                rows.append((latent, kind, rank, float(peak[j]), SOURCES[j % 2], doc, position, position - BEFORE, BEFORE,
                             "[" + ",".join(map(str, ids[j].tolist())) + "]",
                             "[" + ",".join(map(repr, acts[j].tolist())) + "]"))
            db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO tokens VALUES (?,?)", list(enumerate(texts)))
        meta = {"window_before": BEFORE, "window_after": AFTER, "sources": SOURCES, "activation": "scaled (f~)",
                "histogram_bins": N_QUANTILE}
        db.executemany("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.execute("CREATE INDEX examples_by_latent ON examples (latent, kind, rank)")


def measure(index: Path, browser) -> dict[str, float]:
    """Seconds for load, sort, filter, search and panel (see the module docstring)."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    url = index.as_uri()
    times: dict[str, float] = {}
    t = time.perf_counter()
    page.goto(url + "#latents/bench", wait_until="commit")  # not "load": that also waits for the data loaded later
    page.wait_for_selector("#latent-table tbody tr", timeout=60_000)
    times["load"] = time.perf_counter() - t
    page_times = {"load": page.evaluate("CROSSDIFF.timing.ready") / 1000}

    def first_row() -> str:
        return page.get_attribute("#latent-table tbody tr", "data-latent")

    before = first_row()
    t = time.perf_counter()
    page.click("th[data-col=nu_error]")
    page.wait_for_function(f"document.querySelector('#latent-table tbody tr').dataset.latent !== '{before}'")
    times["sort"] = time.perf_counter() - t
    page_times["sort"] = page.evaluate("CROSSDIFF.timing.sort") / 1000
    times["interactive"] = times["load"] + times["sort"]
    page_times["interactive"] = page_times["load"] + page_times["sort"]
    t = time.perf_counter()
    page.select_option("#filter-tag", "chat-only")
    page.wait_for_function("document.querySelector('#count').textContent.split(' of ')[0] !== "
                           "document.querySelector('#count').textContent.split(' of ')[1].split(' ')[0]")
    times["filter"] = time.perf_counter() - t
    page_times["filter"] = page.evaluate("CROSSDIFF.timing.filter") / 1000
    latent = page.get_attribute("#latent-table tbody tr", "data-latent")  # before the search, which may match none
    t = time.perf_counter()
    page.focus("#filter-text")  # the search text loads on first use
    page.wait_for_function("CROSSDIFF.search && CROSSDIFF.search.bench", timeout=120_000)
    times["search data"] = time.perf_counter() - t
    t = time.perf_counter()
    page.fill("#filter-text", "ab")
    page.wait_for_function("!document.querySelector('#count').textContent.includes('loading')")
    times["search"] = time.perf_counter() - t
    page_times["search"] = page.evaluate("CROSSDIFF.timing.search") / 1000
    t = time.perf_counter()
    page.goto(url + f"#latent/bench/{latent}")
    page.wait_for_selector("#examples[data-state=loaded] .tok.peak")  # drawn with the histogram, in one step
    times["panel"] = time.perf_counter() - t
    page.close()
    if errors:
        raise SystemExit(f"console errors: {errors[:3]}")
    return {**times, **{f"{k} (in page)": v for k, v in page_times.items()}}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latents", type=int, default=100_000)
    parser.add_argument("--baseline-latents", type=int, default=1_000)
    parser.add_argument("--keep", help="build here and keep the files (default: a temporary folder)")
    parser.add_argument("--measure-only", action="store_true", help="with --keep: reuse the reports built there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        results = {}
        for label, n in (("baseline", args.baseline_latents), ("large", args.latents)):
            folder = root / f"{n}" / "bench" / "analysis"
            t = time.perf_counter()
            if not (folder / "summary.json").is_file():
                synthetic_analysis(folder, n)
            made = time.perf_counter() - t
            t = time.perf_counter()
            index = root / f"{n}" / "report" / "index.html"
            if not (args.measure_only and index.is_file()):
                index = build_report(folder.parent, index.parent, say=lambda line: None)
            built = time.perf_counter() - t
            out = index.parent
            sizes = {"total": _size(out), "table.js": (out / "data/bench/table.js").stat().st_size,
                     "search.js": (out / "data/bench/search.js").stat().st_size,
                     "examples": _size(out / "data/bench/examples"), "figures": _size(out / "figures"),
                     "examples.sqlite": (folder / "examples.sqlite").stat().st_size}
            with chromium() as browser:
                times = measure(index, browser)  # first open: nothing cached
                reopened = [measure(index, browser) for _ in range(3)]  # the same browser again: median of 3
                warm = {k: float(np.median([r[k] for r in reopened])) for k in times}
            results[label] = (n, made, built, sizes, times)
            print(f"{label}: {n:,} latents; synthetic analysis {made:.0f} s, report build {built:.1f} s; sizes (MB): "
                  + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sizes.items()))
            print("  first open: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
            print("  reopened (median of 3): " + ", ".join(f"{k} {v:.2f} s" for k, v in warm.items()))
        (n0, *_, t0), (n1, *_, t1) = results["baseline"], results["large"]
        print(f"\n{n1:,} vs {n0:,} latents: " + ", ".join(f"{k} {t1[k] / t0[k]:.2f}x" for k in t1))
        print(f"interactive (load + sort) at {n1:,} latents: {t1['interactive']:.2f} s "
              f"= {t1['interactive'] / 3:.2f} of the 3 s budget")


if __name__ == "__main__":
    main()
