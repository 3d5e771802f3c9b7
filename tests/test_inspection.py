"""`crossdiff inspect`: list/sort/filter latents, show and search examples, and rank latents
by their activation on a word, on synthetic data where each latent is planted on one word."""

from __future__ import annotations

import pytest
import torch

from crossdiff.cli import main
from crossdiff.analysis import AnalysisConfig, TensorSource, analyze
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError
from crossdiff.analysis.inspect import Analysis

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The quick brown fox jumps over the lazy dog. The capital of France is Paris, and the capital of Italy "
        "is Rome. Hello! How are you today? ") * 12
WORDS = ["fox", "Paris", "Hello", "Rome"]  # latent j fires on the token(s) of WORDS[j]


@pytest.fixture(scope="module")
def planted_analysis(tiny_tokenizer, tmp_path_factory):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    texts = [tiny_tokenizer.decode([i]) for i in ids]
    d_in, d_sae = 16, 6
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(d_in, d_sae, generator=g))[0].T  # orthonormal rows
    n = len(ids)
    acts = 0.05 * torch.randn(n, 2, d_in, generator=g)
    planted = []
    for j, word in enumerate(WORDS):
        rows = [i for i, t in enumerate(texts) if word in t]
        assert rows, word
        planted.append(rows)
        strength = 2.0 + j  # chat stronger than base for latent j: a range of dnorms
        acts[rows, 1] += strength * directions[j]
        acts[rows, 0] += (1.0 - 0.2 * j) * directions[j]
    cc = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=d_sae, activation="relu"))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[1] = directions.T
        cc.b_enc.fill_(-0.5)
        cc.W_dec[:, 0] = directions * torch.tensor([1.0, 0.8, 0.6, 0.4, 1.0, 1.0])[:, None]
        cc.W_dec[:, 1] = directions
        cc.b_dec.zero_()
    out = tmp_path_factory.mktemp("inspect")
    source = TensorSource(acts, token_ids=torch.tensor(ids), doc_ids=torch.arange(n) // 100,
                          positions=torch.arange(n) % 100)
    analyze(cc, source, out, AnalysisConfig(batch_size=256, n_top=5, quantile_bins=2, per_bin=1), tokenizer=tiny_tokenizer,
            progress=False)
    return out


def test_rank_by_token_returns_the_planted_latent_first(planted_analysis):
    analysis = Analysis(planted_analysis)
    for j, word in enumerate(WORDS):
        ranked = analysis.rank_by_token(word)
        assert ranked["latent"].iloc[0] == j, (word, ranked)
        assert ranked["active"].iloc[0] == ranked["matches"].iloc[0] > 0
    regex = analysis.rank_by_token(r"R[o]me|Paris", regex=True)
    assert set(regex["latent"].iloc[:2]) == {1, 3}


def test_list_sort_filter_and_search(planted_analysis, capsys):
    analysis = Analysis(planted_analysis)
    by_dnorm = analysis.latents(sort="dnorm", limit=None)
    assert list(by_dnorm["dnorm"]) == sorted(by_dnorm["dnorm"], reverse=True)
    assert analysis.latents(ranges={"dnorm": (0.6, None)}, limit=None)["dnorm"].min() >= 0.6
    assert set(analysis.latents("n_active > 0", limit=None)["latent"]) == {0, 1, 2, 3}
    assert set(analysis.latents(dead=True, limit=None)["latent"]) == {4, 5}
    found = analysis.search("Paris")
    assert len(found) and found["text"].str.contains("Paris").all() and 1 in set(found["latent"])
    assert analysis.search("no such words here").empty
    shown = analysis.show(0, n=2)
    assert shown.startswith("latent 0:") and ("[ fox]" in shown or "[fox]" in shown)
    coloured = analysis.show(0, n=1, color=True)
    assert "\x1b[" in coloured and "[fox]" not in coloured

    assert main(["inspect", str(planted_analysis), "--range", "dnorm=0.5:", "--sort", "latent", "--ascending",
                 "--columns", "latent,dnorm,verdict"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["latent", "dnorm", "verdict"]
    assert main(["inspect", str(planted_analysis), "--token", "fox", "-n", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "0"
    assert main(["inspect", str(planted_analysis), "--latent", "1", "-n", "1", "--color", "never"]) == 0
    assert "[" in capsys.readouterr().out
    assert main(["inspect", str(planted_analysis), "--sort", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    with pytest.raises(CrossdiffError, match="not an analysis folder"):
        Analysis(planted_analysis / "missing")


def test_explanations_join_the_table_in_inspect_and_the_report(planted_analysis, tmp_path, capsys):
    """`crossdiff explain` writes explanations.parquet beside the table; inspect and the
    report show its columns (nulls for unexplained latents) without touching latents.parquet."""
    import shutil

    import pandas as pd

    from crossdiff.report.inputs import read_analysis

    folder = tmp_path / "analysis"
    shutil.copytree(planted_analysis, folder)
    before = (folder / "latents.parquet").read_bytes()
    pd.DataFrame({"latent": [1, 3], "explanation": ["the word Paris", "the word Rome"],
                  "detection_balanced_accuracy": [0.9, 0.7]}).to_parquet(folder / "explanations.parquet")

    table = Analysis(folder).table
    assert table.set_index("latent").loc[1, "explanation"] == "the word Paris"
    assert table.set_index("latent")["explanation"].isna().sum() == len(table) - 2
    assert read_analysis(folder).table.set_index("latent").loc[3, "detection_balanced_accuracy"] == 0.7
    assert main(["inspect", str(folder), "--where", "explanation == explanation", "--columns", "latent,explanation"]) == 0
    shown = capsys.readouterr().out
    assert "the word Paris" in shown and "the word Rome" in shown
    assert (folder / "latents.parquet").read_bytes() == before


def test_listing_shows_each_latents_top_context_escaped(planted_analysis, capsys, monkeypatch):
    from crossdiff.analysis.read import AnalysisOutput

    assert main(["inspect", str(planted_analysis), "--sort", "latent", "--ascending", "-n", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "context" and lines[0].split()[0] == "latent"
    for j, word in enumerate(WORDS):  # latent j's top context shows its planted word, in brackets
        row = lines[1 + j]
        assert row.split()[0] == str(j) and f"{word}]" in row.split("'", 1)[1], row
    assert main(["inspect", str(planted_analysis), "--columns", "latent,context", "-n", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["latent", "context"]
    # A context is data: its control characters reach the terminal escaped.
    monkeypatch.setattr(AnalysisOutput, "top_context", lambda self, latent, **kw: "\x1b]0;owned\x07" + "\u202e")
    assert main(["inspect", str(planted_analysis), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and "\\x1b]0;owned\\x07\\u202e" in shown


def test_summary_and_findings_reprint_from_the_files(planted_analysis, capsys):
    assert main(["inspect", str(planted_analysis), "--summary"]) == 0
    screen = capsys.readouterr().out
    assert screen.startswith(f"what changed ({planted_analysis})") and len(screen.splitlines()) <= 40
    assert "chat-only" in screen and "confirmed" in screen and "next: crossdiff inspect" in screen
    assert "'" in screen.split("top chat-leaning latents by")[1]  # the top latents, each with its context
    assert main(["inspect", str(planted_analysis), "--findings"]) == 0  # no findings.json: the analysis summary in full
    assert "verdicts, all latents:" in capsys.readouterr().out
    assert main(["inspect", str(planted_analysis / "nothing"), "--summary"]) == 2
    assert "is not a folder" in capsys.readouterr().err
