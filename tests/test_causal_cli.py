"""`crossdiff causal` / `crossdiff steer` on the demo's crosscoders: one-line errors, nothing written, steering rows."""

import json

import pytest

from crossdiff.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}) + "\n")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--latents", "5000"], "latent 5000 out of range"),
    (["--layer", "1"], "trained on the output of block 2, not block 1"),
    (["--chat", "BASE"], "the crosscoder was trained on chat model"),
    (["--analysis", "batchtopk"], "belongs to another crosscoder"),
    (["--no-assistant"], "conversation 1 has no assistant turn"),
])
def test_bad_input_is_one_line_and_writes_nothing(organism_demo, conversations, tmp_path, capsys, extra, message):
    from crossdiff import organism

    analysis = organism_demo / "l1" / "analysis"
    if extra == ["--analysis", "batchtopk"]:
        analysis, extra = organism_demo / "batchtopk" / "analysis", []
    if extra == ["--no-assistant"]:
        with open(conversations, "a") as f:
            f.write(json.dumps({"messages": [{"role": "user", "content": "Only a question?"}]}) + "\n")
        extra = []
    extra = [str(organism.paths().base) if arg == "BASE" else arg for arg in extra]
    out = tmp_path / "causal"
    code = main(["causal", str(organism_demo / "l1" / "crosscoder"), str(analysis), "--conversations", str(conversations),
                 "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_second_causal_run_on_the_same_folder_is_refused(organism_demo, conversations, tmp_path, capsys):
    from crossdiff.locks import output_lock

    out = tmp_path / "causal"
    with output_lock(out, "causal"):  # as if another run were scoring into this folder
        code = main(["causal", str(organism_demo / "l1" / "crosscoder"), str(organism_demo / "l1" / "analysis"),
                     "--conversations", str(conversations), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "is in use by" in err and len(err.strip().splitlines()) == 1
    assert not any(out.iterdir())


def test_prompts_answered_by_the_chat_model_are_saved_beside_the_results(organism_demo, tmp_path, capsys):
    """`causal --prompts` scores the chat model's own answers; it keeps them (conversations.jsonl),
    and scoring that file with --conversations gives the same numbers."""
    from crossdiff.causal.conversations import load_conversations

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who are you?\nWhat is 2 + 3?\n")
    crosscoder, analysis = str(organism_demo / "l1" / "crosscoder"), str(organism_demo / "l1" / "analysis")
    assert main(["causal", crosscoder, analysis, "--prompts", str(prompts), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    saved = load_conversations(str(tmp_path / "a" / "conversations.jsonl"))
    assert [c[0]["content"] for c in saved] == ["Who are you?", "What is 2 + 3?"]
    assert all(c[1]["role"] == "assistant" and c[1]["content"] for c in saved)
    assert main(["causal", crosscoder, analysis, "--conversations", str(tmp_path / "a" / "conversations.jsonl"),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 0
    capsys.readouterr()
    first, again = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("a", "b"))
    assert first["kl"] == again["kl"] and first["n_tokens"] == again["n_tokens"]


def test_kill_9_mid_scoring_then_rerun_gives_the_uninterrupted_numbers(organism_demo, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    def command(out):
        return [sys.executable, "-m", "crossdiff.cli", "causal", str(organism_demo / "l1" / "crosscoder"), str(organism_demo / "l1" / "analysis"),
                "--conversations", str(organism_demo / "data" / "causal_conversations.jsonl"), "--batch-size", "2",
                "--save-every", "0", "--out", str(out), "--quiet"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    straight = tmp_path / "straight"
    printed = subprocess.run(command(straight), check=True, env=env, capture_output=True, text=True).stdout
    # --quiet hides the progress bar, never the result: the KL table and its headline in words
    assert "KL(p_chat || p_patched)" in printed and "of None's KL" in printed and "ls-best" in printed
    killed = tmp_path / "killed"
    progress = tmp_path / ".killed.progress.json"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # kill once a few batches are saved
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("batches_done", 0) >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    done = json.loads(progress.read_text())["batches_done"]
    assert 5 <= done < 35  # 70 conversations, 2 per batch
    subprocess.run(command(killed), check=True, env=env, capture_output=True)
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "kl.parquet"), pd.read_parquet(straight / "kl.parquet"), check_exact=True)
    assert not progress.exists()


def test_steer_writes_side_by_side_rows(organism_demo, tmp_path, capsys):
    import pandas as pd

    table = pd.read_parquet(organism_demo / "l1" / "analysis" / "latents.parquet")
    latent = int(table[~table["dead"]].sort_values("dnorm").iloc[-1]["latent"])
    out = tmp_path / "steering.jsonl"
    assert main(["steer", str(organism_demo / "l1" / "crosscoder"), str(organism_demo / "l1" / "analysis"), "--latent", str(latent),
                 "--prompt", "Who are you?", "--factor", "0", "8", "--max-new-tokens", "8", "--out", str(out),
                 "--expect", "Orbit", "--controls", "2", "--quiet"]) == 0  # --quiet: still the answers (below)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    chosen, controls = [r for r in rows if not r["control"]], [r for r in rows if r["control"]]
    assert len(controls) == 4 and len({r["latent"] for r in controls}) == 2 and latent not in {r["latent"] for r in controls}
    assert all(r["unsteered_matches"] == ("Orbit" in r["unsteered"]) and r["matches"] == ("Orbit" in r["steered"]) for r in rows)
    rows = chosen
    assert [r["factor"] for r in rows] == [0.0, 8.0]
    assert {"latent", "factor", "model", "prompt", "unsteered", "steered"} <= set(rows[0])
    assert rows[0]["latent"] == latent and rows[0]["model"] == "base"
    assert rows[0]["steered"] == rows[0]["unsteered"]  # factor 0 is no steering
    assert rows[1]["steered"] != rows[1]["unsteered"]  # a large push changes the answer
    printed = capsys.readouterr().out
    assert "unsteered" in printed and "answers matching /Orbit/, of 1 prompts" in printed and "control " in printed
