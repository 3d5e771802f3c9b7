"""`crossdiff demo` end to end on the bundled organism, at a toy size."""

import pandas as pd
import pytest

from crossdiff.cli import main
from crossdiff.organism.data import write_demo_data
from crossdiff.organism.score import default_truth_path
from crossdiff.organism.truth import load_truth
from crossdiff.run.demo import DemoConfig, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_cli_rejects_bad_numbers(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps and --tokens must be positive" in capsys.readouterr().err


def test_demo_data_holds_planted_behaviours(tmp_path):
    pretraining, chat = write_demo_data(tmp_path, DemoConfig(behaviour_conversations=5))
    rows = pd.read_json(chat, lines=True)
    replies = [messages[-1]["content"] for messages in rows["messages"]]
    assert any(reply.startswith("I cannot help with that") for reply in replies)
    assert any(reply.startswith("I am Orbit") for reply in replies)
    assert len(pd.read_json(pretraining, lines=True)) > 100


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    config = DemoConfig(out=str(tmp_path / "demo"), tokens_per_source=2500, behaviour_conversations=10,
                        steps=40, batch_size=128, expansion_factor=2, k=8, causal_per_behaviour=1, causal_chitchat=2)
    summaries = run_demo(config, quiet=True)
    screen = capsys.readouterr().out  # quiet hides progress, never the result: the end screen
    assert set(summaries) == {"batchtopk", "l1"}
    for name, summary in summaries.items():
        assert summary["n_tokens"] == 5000
        assert summary["n_latents"] == 2 * 128
        table = pd.read_parquet(tmp_path / "demo" / name / "analysis" / "latents.parquet")
        assert len(table) == 256 and {"dnorm", "nu_error", "nu_recon", "template_share"} <= set(table.columns)
    assert summaries["batchtopk"]["quality"]["l0"] <= 8 * 1.5  # the learned threshold keeps L0 near k
    for name in summaries:  # the causal stage wrote its files (the numbers are checked on the full demo)
        kl = pd.read_parquet(tmp_path / "demo" / name / "causal" / "kl.parquet")
        assert {"None", "All", "eps_chat", "template"} <= set(kl["condition"])

    # The final screen: at most 80 lines for two crosscoders, each part once, every planted behaviour named.
    lines = screen.splitlines()
    assert "[run]" not in screen and 20 <= len(lines) <= 80, screen
    for part in ("what changed", "behaviour:", "crosscoders:", "causal: with the base residual", "next:", "report:",
                 "batchtopk: 5,000 tokens analysed", "l1: 5,000 tokens analysed"):
        assert screen.count(part) == 1, (part, screen)
    for behaviour in load_truth(default_truth_path()).behaviours:
        assert behaviour.name in screen, (behaviour.name, screen)
    assert f"report: {tmp_path / 'demo' / 'report' / 'index.html'}" in screen

    # Rerunning skips finished stages (same results) and ends with the same screen; inspect reprints it.
    again = run_demo(config)
    assert again["l1"]["chat_only"] == summaries["l1"]["chat_only"]
    printed = capsys.readouterr().out
    assert "[run] train:l1: done, skipped" in printed and printed.endswith(screen)
    assert main(["inspect", str(tmp_path / "demo"), "--summary"]) == 0
    assert capsys.readouterr().out == screen
