"""The end screen (crossdiff.analysis.screen) and the one reader of analysis folders
(crossdiff.analysis.read), on small hand-made folders whose every number is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from crossdiff.analysis.read import AnalysisOutput, run_outputs
from crossdiff.analysis.screen import causal_headline, end_screen, unguarded_note, verdict_counts
from crossdiff.errors import CrossdiffError


def _table() -> pd.DataFrame:
    """Six latents: four chat-only (the paper's flag confirms three, the guarded verdict one), two not."""
    return pd.DataFrame({
        "latent": [5, 4, 3, 2, 1, 0],  # stored out of order: the reader sorts
        "tag": ["chat-only", "chat-only", "chat-only", "chat-only", "shared", "other"],
        "verdict": ["chat-specific", "uncertain", "too few tokens", "complete shrinkage", "chat-specific", "dead"],
        "chat_specific": [True, True, True, False, True, False],
        "dead": [False, False, False, False, False, True],
        "dnorm": [0.95, 0.93, 0.92, 0.91, 0.5, np.nan],
        "nu_error": [0.1, 0.18, 0.1, 0.6, 0.1, np.nan],
        "nu_recon": [0.1, 0.45, 0.2, 0.3, 0.1, np.nan],
    })


def _analysis(folder, table: pd.DataFrame) -> None:
    folder.mkdir(parents=True)
    table.to_parquet(folder / "latents.parquet")
    summary = {"n_latents": len(table), "dead": int(table["dead"].sum()), "n_tokens": 100,
               "tags": {"chat-only": 4, "base-only": 0, "shared": 1, "other": 1},
               "chat_only": {"total": 4, "chat_specific": 3}, "quality": {"fve": 0.9, "l0": 3.0},
               "crosscoder": {"activation": "batchtopk"}, "config": {"tags": {"chat_only": 0.9}},
               "findings": {"dnorm": {"quantiles": {"0.5": 0.9, "0.95": 0.95, "0.99": 0.95, "1": 0.95}},
                            "top_by_rank_sum": [{"latent": 5, "dnorm": 0.95, "verdict": "chat-specific", "context": "'the [top]'"}]}}
    (folder / "summary.json").write_text(json.dumps(summary))


def _kl() -> tuple[pd.DataFrame, dict]:
    rows = []
    for condition, form, kl in [("None", None, 2.0), ("All", None, 0.1), ("eps_chat", None, 1.8), ("template", None, 1.9),
                                ("ls-best", "replace", 1.5), ("ls-worst", "replace", 1.9), ("dnorm-top", "replace", 1.6),
                                ("dnorm-bottom", "replace", 1.96), ("random", "replace", 1.7)]:
        rows.append({"condition": condition, "subset": "all", "kl_mean": kl, "form": form, "closed": 1 - kl / 2.0})
        rows.append({"condition": condition, "subset": "first_k", "kl_mean": kl, "form": form, "closed": 0.0})
    summary = {"layer": 2, "n_conversations": 7, "pool": {"size": 4, "rule": "chat-only"}, "sets": {"ls-best": [5, 4]}}
    return pd.DataFrame(rows), summary


def test_counts_come_from_the_guarded_verdicts_and_say_why_the_paper_s_flags_differ():
    table = _table()
    assert verdict_counts(table) == {"chat_only": 4, "confirmed": 1, "rejected": 1, "undecided": 2, "specific_any": 2}
    note = unguarded_note("bt", {"chat_only": {"chat_specific": 3}}, table)
    assert note == ("  bt: the paper's unguarded rule (nu_error < 0.2 and nu_recon < 0.5, summary.json) confirms 3; "
                    "2 of them fail a guard here (uncertain 1, too few tokens 1)")
    agreeing = table.assign(chat_specific=table["verdict"] == "chat-specific")
    assert unguarded_note("bt", {"chat_only": {"chat_specific": 1}}, agreeing) is None


def test_causal_headline_is_the_share_of_none_s_kl_each_condition_closes():
    kl, summary = _kl()
    first, halves = causal_headline(kl, summary)
    assert "closes 95% of None's KL" in first and "chat error alone 10%" in first and "chat-template positions 5%" in first
    assert "2 best by Latent Scaling 25% (worst 5%), 2 top by dnorm 20% (bottom 2%), 2 random 15%" in halves


def test_the_reader_finds_every_file_and_the_screen_says_each_thing_once(tmp_path):
    run = tmp_path / "run"
    for name in ("bt", "l1"):
        _analysis(run / name / "analysis", _table())
        (run / name / "crosscoder").mkdir()
        (run / name / "causal").mkdir()
        kl, summary = _kl()
        kl.to_parquet(run / name / "causal" / "kl.parquet")
        (run / name / "causal" / "summary.json").write_text(json.dumps(summary))
    rows = [{"rank": 1, "prompt": "Who are you?", "group": "identity", "kl_mean": 3.0, "chat_answer": "I am Orbit.", "base_answer": "A cat."}]
    (run / "behaviour_diff.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "behaviour_diff.json").write_text(json.dumps({"prompts": 2, "kl_mean": 2.0, "ci_low": 1.0, "ci_high": 3.0,
                                                         "groups": {"chitchat": {"kl_mean": 1.0}, "identity": {"kl_mean": 3.0}}}))

    outputs = run_outputs(run)
    assert [o.name for o in outputs] == ["bt", "l1"] and outputs[0].run_dir() == run
    output = AnalysisOutput(run / "bt")  # RUN/NAME and RUN/NAME/analysis open the same folder
    assert output.folder == AnalysisOutput(run / "bt" / "analysis").folder == run / "bt" / "analysis"
    assert list(output.table()["latent"]) == [0, 1, 2, 3, 4, 5]
    assert output.findings() is None and output.planted() is None and output.examples_path is None
    assert output.top_context(5) is None and output.behaviour()[1]["kl_mean"] == 2.0

    screen = end_screen(outputs, run_dir=run)
    lines = screen.splitlines()
    assert len(lines) <= 40
    assert "by prompt group, highest first: identity 3.00, chitchat 1.00" in screen
    assert screen.count("nats/token from the chat model") == 1  # the shared KL baseline, said once for both
    assert screen.count("closes 95% of None's KL") == 2  # once per crosscoder
    for part in ("what changed", "behaviour:", "crosscoders:", "next:", "bt: 100 tokens analysed", "l1: 100 tokens analysed"):
        assert screen.count(part) == 1, part
    row = next(line for line in lines if line.startswith("  bt "))
    assert row.split()[-5:] == ["4", "1", "1", "2", "2"]  # chat-only, confirmed, rejected, undecided, any dnorm


def test_a_folder_without_an_analysis_is_one_line(tmp_path):
    with pytest.raises(CrossdiffError, match="is not an analysis folder"):
        AnalysisOutput(tmp_path)
    with pytest.raises(CrossdiffError, match="no analysis in"):
        run_outputs(tmp_path)
    (tmp_path / "a").mkdir()
    pd.DataFrame({"latent": [0]}).to_parquet(tmp_path / "a" / "latents.parquet")
    with pytest.raises(CrossdiffError, match="unfinished"):
        AnalysisOutput(tmp_path / "a").summary()
    with pytest.raises(CrossdiffError, match=r"older format \(latents.parquet lacks dnorm\)"):
        AnalysisOutput(tmp_path / "a").table(required=("dnorm",))
