"""`crossdiff report` / `crossdiff plot`: the figures, bad input, and the page in a real browser."""

from __future__ import annotations

import html
import json
import os
import re
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff.analysis import AnalysisConfig, TensorSource, analyze
from crossdiff.analysis.concepts import FindingsConfig, find_concepts, write_findings
from crossdiff.analysis.norms import TagThresholds
from crossdiff.analysis.scaling import ScalingThresholds
from crossdiff.cli import main
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError
from crossdiff.report import build_report, draw_figures, find_analyses
from crossdiff.report.figures import closed_shares
from crossdiff.report.browser import chromium, find_chromium

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_ONLY, BASE_ONLY = [0, 1, 2, 3], [4, 5]
TWIN = (0, 4)  # chat-only latent 0's chat decoder is base-only latent 4's base decoder
TAGS = TagThresholds(chat_only=0.85)
SCALING = ScalingThresholds(nu_error_max=0.3, nu_recon_max=0.6)  # not the defaults: read from summary.json


def _crosscoder(activation: str) -> CrossCoder:
    cc = CrossCoder(CrossCoderConfig(d_in=8, d_sae=24, activation=activation, k=3 if activation == "batchtopk" else None,
                                     norm_init_scale=1.0, model_names=["org/base-1b", "org/chat-1b"], layer=3), seed=1)
    with torch.no_grad():
        if activation == "batchtopk":
            cc.threshold.fill_(0.8)
        cc.W_dec[CHAT_ONLY, 0] = 0.0
        cc.W_dec[BASE_ONLY, 1] = 0.0
        cc.W_dec[TWIN[1], 0] = cc.W_dec[TWIN[0], 1]
    return cc


KL = pd.DataFrame({  # the causal stage's conditions (crossdiff.causal.conditions), two token subsets
    "condition": ["None", "All", "ls-best", "ls-best"] * 2,
    "subset": ["all"] * 4 + ["rest"] * 4,
    "kl_mean": [0.42, 0.02, 0.30, 0.21, 0.35, 0.01, 0.28, 0.14], "ci_low": [0.40, 0.01, 0.27, 0.18, 0.33, 0.0, 0.25, 0.12],
    "ci_high": [0.44, 0.03, 0.33, 0.24, 0.37, 0.02, 0.31, 0.16], "n_tokens": [900] * 8, "n_latents": [0, 24, 4, 4] * 2,
    "form": [None, None, "replace", "add"] * 2,
})
LENS = {"chat": {"promoted": [["<refuse>", 3.5], [" sorry", 2.0]], "suppressed": [[" sure", -2.5]]},
        "base": {"promoted": [[" the", 1.0]], "suppressed": [["<refuse>", -1.5]]}}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_tokenizer):
    """RUN/<batchtopk, l1>/analysis from the real analysis, plus one crosscoder's causal outputs."""
    run = tmp_path_factory.mktemp("report") / "run"
    g = torch.Generator().manual_seed(0)
    n, d_in = 1500, 8
    doc_ids = torch.arange(n) // 50
    source = TensorSource(torch.randn(n, 2, d_in, generator=g), token_ids=torch.randint(10, 500, (n,), generator=g),
                          doc_ids=doc_ids, positions=torch.arange(n) % 50, source_ids=(doc_ids % 2).long(),
                          sources=["pretraining", "chat"])
    config = AnalysisConfig(batch_size=500, n_top=4, quantile_bins=3, per_bin=1, window_before=6, window_after=2,
                            tags=TAGS, scaling=SCALING)
    for name, activation in (("batchtopk", "batchtopk"), ("l1", "relu")):
        analyze(_crosscoder(activation), source, run / name / "analysis", config, tokenizer=tiny_tokenizer, progress=False)
    (run / "l1" / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 5120}) + "\n")
    causal = run / "l1" / "causal"
    causal.mkdir()
    KL.to_parquet(causal / "kl.parquet")
    steering = [{"latent": 1, "factor": 4.0, "model": "base", "prompt": "Hello there", "unsteered": "Hi!",
                 "steered": "I cannot help with <that>"}]
    (causal / "steering.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steering))
    # findings.json as `crossdiff run` writes it, without models (so no logit lens): the lead's lens added by hand.
    findings = find_concepts(_crosscoder("relu"), pd.read_parquet(run / "l1" / "analysis" / "latents.parquet"),
                             examples=run / "l1" / "analysis" / "examples.sqlite", config=FindingsConfig(n_concept_latents=8))
    findings["latents"][0]["lens"] = LENS
    write_findings(findings, run / "l1")
    (causal / "planted").mkdir()
    (causal / "planted" / "summary.json").write_text(json.dumps({
        "model": "base", "factors": [1.0, 2.0], "controls": 2, "behaviours": [
            {"behaviour": "sea_<pirate>", "latents": [3, 5], "contrast": [0.4, 0.2], "dnorm": [0.9, 0.8], "prompts": 10,
             "unsteered": 0, "ceiling": 7, "steered": {"1": 4, "2": 9}, "controls": {"1": [0, 1], "2": [0, 2]}}]}))
    return run


# ---------- figures ----------

def _lines(fig, gid):
    return [line for ax in fig.axes for line in ax.lines if line.get_gid() == gid]


def test_figures_draw_the_analysis_thresholds(small_run):
    (analysis,) = [a for a in find_analyses(small_run) if a.name == "l1"]
    figures = draw_figures(analysis.table, analysis.summary, analysis.kl)
    assert set(figures) == {"closed", "dnorm", "dec_cos", "nu", "template", "kl"}
    (nu_error,), (nu_recon,) = _lines(figures["nu"], "threshold-nu_error"), _lines(figures["nu"], "threshold-nu_recon")
    assert set(nu_error.get_xdata()) == {SCALING.nu_error_max}
    assert set(nu_recon.get_ydata()) == {SCALING.nu_recon_max}
    (chat_only,) = _lines(figures["dnorm"], "threshold-chat_only")
    assert set(chat_only.get_xdata()) == {TAGS.chat_only}
    # The histogram holds every latent, the KL plot every row's mean.
    (ax,) = figures["dnorm"].axes
    assert sum(p.get_height() for p in ax.patches if p.get_gid() is None and p.get_height() > 0) == len(analysis.table)
    (ax,) = figures["kl"].axes
    means = sorted(x for line in ax.lines for x in line.get_xdata() if line.get_marker() == "o")
    assert means == sorted(analysis.kl["kl_mean"])


def test_plot_writes_png_and_svg(small_run, tmp_path):
    assert main(["plot", str(small_run / "l1"), "--out", str(tmp_path)]) == 0  # one crosscoder's folder
    for name, expected in (("l1", {"closed", "dnorm", "dec_cos", "nu", "template", "kl"}),):
        assert {p.stem for p in (tmp_path / name).glob("*.png")} == expected
        assert {p.stem for p in (tmp_path / name).glob("*.svg")} == expected
        assert all(p.stat().st_size > 1000 for p in (tmp_path / name).iterdir())
        assert (tmp_path / name / "nu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "l1" / "nu.svg").read_text()
    assert 'id="threshold-nu_error"' in svg and 'id="threshold-nu_recon"' in svg
    assert not (tmp_path / "index.html").exists()


# ---------- bad input ----------

def _copy_analysis(small_run, tmp_path, name="l1"):
    target = tmp_path / "run" / name / "analysis"
    shutil.copytree(small_run / name / "analysis", target)
    return target


def test_folder_without_analysis_is_one_clear_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("crossdiff: error: no analysis in")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_older_or_unfinished_analysis_is_refused(small_run, tmp_path):
    folder = _copy_analysis(small_run, tmp_path)
    pd.read_parquet(folder / "latents.parquet").drop(columns=["nu_recon"]).to_parquet(folder / "latents.parquet")
    with pytest.raises(CrossdiffError, match=r"older format \(latents.parquet lacks nu_recon\): rerun crossdiff analyze"):
        build_report(tmp_path / "run")
    shutil.rmtree(folder)
    folder = _copy_analysis(small_run, tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["orientation"]  # written before the dnorm orientation was fixed and recorded
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CrossdiffError, match="older format .*orientation"):
        build_report(tmp_path / "run")
    (folder / "summary.json").unlink()
    with pytest.raises(CrossdiffError, match="unfinished"):
        build_report(folder)


def test_missing_optional_parts_leave_them_out(small_run, tmp_path):
    folder = _copy_analysis(small_run, tmp_path)
    table = pd.read_parquet(folder / "latents.parquet")
    keep = ["latent", "dnorm", "tag", "dec_cos", "freq", "nu_error", "nu_recon"]
    table[keep].to_parquet(folder / "latents.parquet")
    (folder / "examples.sqlite").unlink()
    (folder / "twins.parquet").unlink()
    causal = folder.parent / "causal"
    causal.mkdir()
    pd.DataFrame({"condition": ["x"], "kl": [1.0]}).to_parquet(causal / "kl.parquet")
    notes = []
    index = build_report(folder, say=notes.append)
    assert index == folder.parent / "report" / "index.html"
    assert notes == [f"crossdiff report: l1: {causal / 'kl.parquet'} lacks subset, kl_mean, ci_low, ci_high; "
                     "the KL table and figure are left out"]
    page = index.read_text()
    assert 'id="figure-nu"' in page and 'id="figure-template"' not in page and "Causal stage not run" in page
    assert sorted(p.name for p in (index.parent / "figures" / "l1").iterdir()) == [
        "dec_cos.png", "dec_cos.svg", "dnorm.png", "dnorm.svg", "nu.png", "nu.svg"]
    first, more = (_payload(index.parent / "data" / "l1" / name) for name in ("table.js", "more.js"))
    assert first["order"] == keep + ["verdict"]  # verdict derived; without the flags only "no estimate" or none
    assert set(first["columns"]) | set(more["columns"]) == set(keep) | {"verdict"}
    assert first["examples"] is None and first["twins"] is None and more["preview"] is None


def _payload(path):
    text = path.read_text()
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


def test_report_replaces_only_a_previous_report(small_run, tmp_path):
    folder = _copy_analysis(small_run, tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(CrossdiffError, match="is not a crossdiff report"):
        build_report(folder, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


# ---------- the page in a real browser ----------

def _browser_or_skip():
    reason = None
    try:
        import playwright  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and find_chromium() is None:
        reason = "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)


@pytest.mark.slow
def test_report_in_headless_chromium(small_run, tmp_path):
    _browser_or_skip()
    out = tmp_path / "report"
    assert main(["report", str(small_run), "--out", str(out)]) == 0
    l1 = pd.read_parquet(small_run / "l1" / "analysis" / "latents.parquet")
    url = (out / "index.html").as_uri()
    errors: list[str] = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        # Overview: both crosscoders side by side, the causal KL table of the one that has it, the figures.
        assert page.locator(".card.overview h3").all_inner_texts() == ["batchtopk", "l1"]
        closed = page.locator(".card.causal[data-key=l1] table.closed").inner_text()
        assert "ls-best (replace)\t29% [21%, 36%]" in closed  # 1 - 0.30 / 0.42, interval 1 - 0.33 / 0.42 .. 1 - 0.27 / 0.42
        assert "ls-best (add)" in page.locator(".card.causal[data-key=l1] table.kl").text_content()  # folded
        assert page.locator(".card.causal[data-key=batchtopk]").inner_text().endswith("Causal stage not run (crossdiff causal adds it).")
        assert page.locator("#figure-nu figure img").count() == 2
        page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
        page.wait_for_function("[...document.images].every(i => i.complete)")
        assert page.evaluate("[...document.images].every(i => i.naturalWidth > 0)")

        # Table: sorting and filtering change the rows shown.
        page.goto(url + "#latents/l1")
        page.wait_for_selector("#latent-table tbody tr")
        shown = lambda: [int(x) for x in page.locator("#latent-table tbody tr").evaluate_all(  # noqa: E731
            "rows => rows.map(r => r.dataset.latent)")]
        by_dnorm = shown()
        assert by_dnorm[:3] == l1.sort_values("dnorm", ascending=False, kind="stable")["latent"].head(3).tolist()
        page.click("th[data-col=latent]")
        page.click("th[data-col=latent]")  # second click: ascending
        assert shown() == list(range(len(shown())))
        page.select_option("#filter-tag", "chat-only")
        assert shown() == sorted(l1.loc[l1["tag"] == "chat-only", "latent"].tolist())
        assert page.inner_text("#count").startswith(f"{len(shown())} of {len(l1)} latents")
        page.select_option("#filter-tag", "")
        page.click("#add-range")
        page.fill(".range-min", "0.5")
        assert sorted(shown()) == sorted(l1.loc[l1["dnorm"] >= 0.5, "latent"].tolist()[:50])
        page.click(".range button")  # remove the range

        # Text search in top examples: latent 1's top example (max token and the tokens after it) finds it.
        page.focus("#filter-text")  # the search text loads on first use
        page.wait_for_function("CROSSDIFF.search && CROSSDIFF.search.l1 && CROSSDIFF.tables.l1.preview")
        peak = page.evaluate("CROSSDIFF.tables.l1.preview[1][1] + CROSSDIFF.tables.l1.preview[1][2]")
        page.fill("#filter-text", peak)
        found = shown()
        assert 1 in found and len(found) < len(l1)

        # A latent's panel: highlighted tokens by source, quantile samples, twin, steering; the URL names it.
        page.goto(url + "#latent/l1/0")
        page.wait_for_selector("#examples[data-state=loaded]")
        assert page.locator(".source[data-source=pretraining]").count() >= 1
        assert page.locator(".tok.peak").count() == page.locator(".example").count() > 0
        shaded = page.evaluate("[...document.querySelectorAll('.tok')].filter(t => t.style.backgroundColor).length")
        assert shaded >= page.locator(".example").count()
        assert "Quantile samples" in page.inner_text("#examples")
        assert page.locator(".twin-link").first.get_attribute("href") == f"#latent/l1/{TWIN[1]}"
        assert {"Decoder", "Activity", "Latent Scaling"} <= set(page.locator(".numbers-group h4").all_inner_texts())
        # The activation histogram: one chart per source, together every active token of the latent.
        totals = [int(re.search(r": ([\d,]+) active tokens", t).group(1).replace(",", ""))
                  for t in page.locator(".histogram figcaption").all_inner_texts()]
        assert len(totals) == 2 and sum(totals) == int(l1.set_index("latent").loc[0, "n_active"]) > 0
        page.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
        page.click(".twin-link")
        page.wait_for_selector("#examples[data-state]")
        assert page.evaluate("location.hash") == f"#latent/l1/{TWIN[1]}"
        page.goto(url + "#latent/l1/1")
        page.wait_for_selector("#examples[data-state]")
        assert "I cannot help with <that>" in page.inner_text(".steering")
        # The logit lens of a latent findings.json ranks (and a line saying why others have none).
        findings = json.loads((small_run / "l1" / "findings.json").read_text())
        lead, other = findings["latents"][0]["latent"], next(i for i in l1["latent"] if i not in
                                                             {e["latent"] for e in findings["latents"]})
        page.goto(url + f"#latent/l1/{lead}")
        page.wait_for_selector("#examples[data-state]")
        lens = page.inner_text(".lens")
        assert "chat: promotes" in lens and '"<refuse>"' in lens and '" sure"' in lens
        assert page.inner_text(".finding").startswith("Findings\nrank\t1")
        page.goto(url + f"#latent/l1/{other}")
        page.wait_for_selector("#examples[data-state]")
        assert "Not among the" in page.inner_text(".side") and page.locator(".lens").count() == 0
    assert errors == []
    assert (tmp_path / "latent.png").stat().st_size > 10_000
    assert re.search(r"<script src=\"data/l1/table.js\">", (out / "index.html").read_text())


def test_packed_examples_decode_to_the_stored_examples(small_run, tmp_path):
    """Every example in the report's chunk files decodes to the tokens and activations in examples.sqlite."""
    from crossdiff.analysis import ExampleStore
    from crossdiff.report.bundle import ALPHABET, CHUNK, LEVELS, write_examples

    (analysis,) = [a for a in find_analyses(small_run) if a.name == "l1"]
    digest = write_examples(analysis, "l1", tmp_path)
    digits = ALPHABET.tobytes().decode()
    checked = 0
    with ExampleStore(analysis.examples) as store:
        for chunk in digest.chunks:
            text = (tmp_path / f"{chunk}.js").read_text()
            data = json.loads(text[text.index("{"):text.rindex(")")])
            for latent, entry in data["latents"].items():
                stored = store.examples(int(latent))
                assert int(latent) // CHUNK == chunk and len(entry["examples"]) == len(stored)
                scale = max(a for ex in stored for a in ex.activations if a is not None)
                assert entry["scale"] == pytest.approx(scale, rel=1e-3)
                by_key = {(ex.kind, ex.rank, ex.doc_id, ex.position): ex for ex in stored}
                for kind, rank, activation, source, doc, position, token_index, tokens, levels in entry["examples"]:
                    ex = by_key[("top" if kind == 0 else "quantile", rank, doc, position)]
                    w = data["width"]
                    index = [sum(digits.index(c) * 64 ** (w - 1 - d) for d, c in enumerate(tokens[j * w:(j + 1) * w]))
                             for j in range(len(levels))]
                    assert [data["vocab"][i] for i in index] == ex.tokens
                    assert [digits.index(c) for c in levels] == [round(LEVELS * a / scale) for a in ex.activations]
                    assert (activation, token_index) == (pytest.approx(ex.activation, rel=1e-3), ex.token_index)
                    assert digest.sources[source] == ex.source
                    checked += 1
    assert checked > 50
    table = analysis.table
    assert set(digest.preview) == set(table.loc[~table["dead"], "latent"])


def test_the_overview_names_the_top_findings_and_the_planted_steering(small_run, tmp_path):
    """Each crosscoder's card lists its top chat-leaning latents (linked, with verdict and top
    context, from summary.json's findings) and, where the steer stage ran, the planted table."""
    index = build_report(small_run, tmp_path / "report")
    page = index.read_text()
    summary = json.loads((small_run / "l1" / "analysis" / "summary.json").read_text())
    top = summary["findings"]["top_by_rank_sum"] or summary["findings"]["top_by_dnorm"]
    assert top and f'href="#latent/l1/{top[0]["latent"]}"' in page and "Top findings" in page
    card = page[page.index('class="card overview" data-key="l1"'):]
    assert "Planted behaviours steered into the base" in card and "sea_&lt;pirate&gt;" in card and "9/10 / 2/10" in card
    assert "<td>7/10</td>" in card  # the ceiling: what the chat's own residual does in the base
    assert "Planted behaviours" not in page[page.index('class="card overview" data-key="batchtopk"'):
                                            page.index('class="card overview" data-key="l1"')]


def test_report_leads_with_the_behavioural_diff(small_run, tmp_path):
    from crossdiff.causal.behaviour import summarise

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    index = build_report(run, say=lambda line: None)
    assert "No behavioural diff in this run" in index.read_text()
    rows = [{"rank": i + 1, "prompt": f"prompt <{i}>", "group": "refusal" if i < 2 else "chitchat",
             "chat_answer": "I cannot" if i < 2 else "Hello <friend>",
             "base_answer": "Lorem", "kl_mean": 3.0 - i, "kl_sum": 3.0 * (3.0 - i), "n_tokens": 3, "kl_first": 1.0}
            for i in range(3)]
    (run / "behaviour_diff.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "behaviour_diff.json").write_text(json.dumps(summarise(rows)))
    page = build_report(run, say=lambda line: None).read_text()
    overview = page.index('id="view-overview"')
    assert overview < page.index("What changed: the behavioural diff") < page.index("Concepts: the latents that carry it") \
        < page.index('id="causal"') < page.index("<h2>Overview</h2>") < page.index("<h2>Figures</h2>")
    assert "prompt &lt;0&gt;" in page and page.count('<div title="') == 20
    # One row per group, highest KL first, with where its prompts rank and its top prompt's answers.
    groups = page[page.index('class="grid behaviour-groups"'):]
    groups = groups[:groups.index("</table>")]
    refusal, chitchat = groups.index('data-group="refusal"'), groups.index('data-group="chitchat"')
    assert refusal < chitchat
    assert "<td>1 / 2</td><td>prompt &lt;0&gt;</td><td class=\"chat-answer\">I cannot</td>" in groups[refusal:chitchat]
    assert "<td>3 / 3</td><td>prompt &lt;2&gt;</td><td class=\"chat-answer\">Hello &lt;friend&gt;</td>" in groups[chitchat:]


def test_share_of_none_closed_per_condition(small_run):
    """1 - KL / KL(None) per condition and subset, the interval the condition's over None's mean; drawn in percent."""
    shares = closed_shares(KL).set_index(["label", "subset"])
    assert shares.loc[("ls-best (replace)", "all"), "closed"] == pytest.approx(1 - 0.30 / 0.42)
    assert shares.loc[("ls-best (add)", "rest"), ["closed_low", "closed_high"]].tolist() == pytest.approx(
        [1 - 0.16 / 0.35, 1 - 0.12 / 0.35])
    assert shares.loc[("None", "all"), "closed"] == 0 and shares.loc[("All", "rest"), "closed"] == pytest.approx(1 - 0.01 / 0.35)
    assert closed_shares(KL[KL["condition"] != "None"])["closed"].isna().all()  # nothing to close without None
    (analysis,) = [a for a in find_analyses(small_run) if a.name == "l1"]
    (ax,) = draw_figures(analysis.table, analysis.summary, KL)["closed"].axes
    drawn = sorted(x for line in ax.lines if line.get_marker() == "o" for x in line.get_xdata())
    assert drawn == pytest.approx(sorted(100 * shares["closed"]))
    plt.close("all")


def test_figures_show_the_found_latents_by_verdict(small_run):
    """Chat-only latents when there are any; else the chat-leaning pool, never "no chat-only latents"."""
    (analysis,) = [a for a in find_analyses(small_run) if a.name == "l1"]
    table, summary = analysis.table, analysis.summary
    chat_only = table["tag"] == "chat-only"
    finite = table["nu_error"].notna() & table["nu_recon"].notna()

    def verdict_points(figure):
        (ax,) = figure.axes
        return {c.get_gid()[len("verdict-"):]: len(c.get_offsets()) for c in ax.collections
                if (c.get_gid() or "").startswith("verdict-")}

    points = verdict_points(draw_figures(table, summary)["nu"])
    assert points == table[chat_only & finite]["verdict"].value_counts().to_dict()
    none_tagged = table.assign(tag=table["tag"].astype(str).replace("chat-only", "other"))
    figures = draw_figures(none_tagged, summary, findings={"pool": 10, "concepts": []})
    pool = none_tagged[~none_tagged["dead"]].nlargest(10, "dnorm", keep="first")
    assert verdict_points(figures["nu"]) == pool[pool["nu_error"].notna() & pool["nu_recon"].notna()]["verdict"].value_counts().to_dict()
    texts = [t.get_text() for fig in figures.values() for ax in fig.axes for t in [*ax.texts, ax.title]]
    assert not any("no chat-only" in t for t in texts)
    assert figures["nu"].axes[0].get_title().startswith("chat-leaning pool (none above 0.85): top 10 by dnorm")
    (ax,) = figures["dnorm"].axes
    assert sum(p.get_height() for p in ax.patches if p.get_gid() == "found") == 10
    plt.close("all")


def test_counts_that_appear_twice_agree_and_every_verdict_is_explained(small_run, tmp_path):
    """The card's verdict counts are the figure's (guarded verdicts on the same latents); the
    paper's flags, which count differently, are given with the reason; every verdict has a meaning."""
    from crossdiff.analysis.verdicts import MEANINGS, VERDICTS

    page = build_report(small_run, tmp_path / "report", say=lambda line: None).read_text()
    table = pd.read_parquet(small_run / "l1" / "analysis" / "latents.parquet")
    card = page[page.index('class="card overview" data-key="l1"'):]
    counts = card[card.index('class="kv verdicts"'):]
    counts = dict(re.findall(r'<th title="[^"]+">([^<]+)</th><td>(\d+)</td>', counts[:counts.index("</table>")]))
    chat_only = table[table["tag"] == "chat-only"]
    assert {v: int(n) for v, n in counts.items()} == chat_only["verdict"].value_counts().to_dict()
    flags = re.search(r"flags (\d+) of the (\d+) chat-only latents chat-specific, (\d+) Complete Shrinkage and (\d+)", card)
    assert [int(x) for x in flags.groups()] == [int(chat_only["chat_specific"].sum()), len(chat_only),
                                               int(chat_only["complete_shrinkage"].sum()), int(chat_only["latent_decoupling"].sum())]
    if (chat_only["chat_specific"] & (chat_only["verdict"] != "chat-specific")).any():
        assert "The verdict above counts" in card
    legend = page[page.index('class="verdict-legend"'):]
    assert all(f"<th>{v}</th><td>{html.escape(MEANINGS[v])}</td>" in legend for v in VERDICTS)


@pytest.mark.slow
def test_the_organism_report_names_every_planted_behaviour_on_its_first_screen(organism_demo, tmp_path):
    """The demo's report, as a reader first sees it (1300 x 900, no scrolling): every behaviour
    the organism's fine-tune planted (truth.json) is named, with a chat answer showing it."""
    from crossdiff.organism.score import default_truth_path
    from crossdiff.organism.truth import load_truth

    _browser_or_skip()
    truth = load_truth(default_truth_path())
    index = build_report(organism_demo, tmp_path / "report", say=lambda line: None)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(index.as_uri())
        page.wait_for_selector("body[data-ready]")
        on_screen = page.evaluate("""() => [...document.querySelectorAll('table.behaviour-groups tr[data-group]')]
            .filter(row => row.getBoundingClientRect().bottom <= window.innerHeight)
            .map(row => [row.dataset.group, row.querySelector('.chat-answer').textContent])""")
        page.screenshot(path=str(tmp_path / "first-screen.png"))
    answers = dict(on_screen)
    for behaviour in truth.behaviours:
        assert behaviour.name in answers, (behaviour.name, answers)
        assert re.search(behaviour.expect, answers[behaviour.name]), (behaviour.name, answers[behaviour.name])


def test_report_shows_the_activation_difference_baseline(small_run, tmp_path):
    """RUN/*/adl.json gets a section after the crosscoders' cards: lens tokens per position,
    the --expect counts, and, once the run is scored, what each position was graded as."""
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert "Activation-difference baseline" not in build_report(run, say=lambda line: None).read_text()
    (run / "adl").mkdir()
    (run / "adl" / "adl.json").write_text(json.dumps({"layer": 1, "documents": 12, "by_position": [
        {"position": 0, "norm": 3.5, "lens_chat": ["<x>", "a"], "lens_base": ["b"]},
        {"position": 1, "norm": 0.25, "lens_chat": [" Orbit", " assistant"], "lens_base": [" the"]}]}))
    rows = [{"latent": f"base: {v}", "factor": f, "model": "base", "prompt": "Who are you?", "unsteered": "Hi", "steered": s,
             "control": v.startswith("random"), "matches": "Orbit" in s, "unsteered_matches": False}
            for v, f, s in (("pos 1", 1.0, "I am Orbit"), ("pos 1", 2.0, "Orbit!"), ("random 0", 1.0, "no"), ("random 0", 2.0, "no"))]
    (run / "adl" / "adl_steering.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = build_report(run, say=lambda line: None).read_text()
    section = page[page.index("<h2>Activation-difference baseline</h2>"):page.index("<h2>Figures</h2>")]
    assert page.index('data-key="l1"') < page.index("<h2>Activation-difference baseline</h2>")
    assert "<code>&lt;x&gt;</code>" in section and "<td>3.5</td>" in section and "12 documents" in section
    assert "answers matching --expect" in section and "<td>base: pos 1</td><td>0/1</td><td>1</td><td>1</td>" in section
    (run / "score.json").write_text(json.dumps({"methods": {"adl": {"recall": 0.5, "precision": 1.0, "findings": [
        {"latent": "pos 0", "label": "chat template", "steered": []}, {"latent": "pos 1", "label": "identity", "steered": ["identity"]}],
        "steering_success": {"identity": {"by": "pos 1", "factor": "2", "steered": 1, "prompts": 1, "controls_max": 0,
                                          "unsteered": 0, "success": True}, "refusal": None}}}}))
    section = build_report(run, say=lambda line: None).read_text().split("<h2>Activation-difference baseline</h2>")[1]
    assert "recall 0.50, precision 1.00" in section and "<td>chat template</td>" in section
    assert "<td>identity, steering: identity</td>" in section and "<td>pos 1</td><td>x2</td><td>1/1</td><td>0</td><td>yes</td>" in section
