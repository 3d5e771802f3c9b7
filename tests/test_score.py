"""Planted truth files (crossdiff.organism.truth) and `crossdiff score` (crossdiff.organism.score)."""

import json
from pathlib import Path

import pytest

from crossdiff.cli import main
from crossdiff.errors import CrossdiffError
from crossdiff.organism.behaviours import REFUSAL, heldout_prompts, planted_truth, shows_refusal
from crossdiff.organism.score import Finding, _by_dnorm, adl_findings, default_truth_path, grade, score_run
from crossdiff.organism.steered import adl_success, planted_success, succeeded
from crossdiff.organism.truth import load_truth, truth_from_dict


def test_bundled_truth_file_is_the_generated_one():
    assert json.loads(default_truth_path().read_text()) == planted_truth()
    truth = load_truth(default_truth_path())
    assert [b.name for b in truth.behaviours] == ["refusal", "identity", "arithmetic"]
    refusal = truth.behaviours[0]
    assert refusal.matches(f"<start_of_turn>model\n{REFUSAL}") and not refusal.matches("How to bake bread")
    assert len(refusal.prompts) == 10 and set(refusal.prompts) <= {p.user for p in heldout_prompts("refusal")}
    import re

    assert re.search(refusal.expect, REFUSAL) and shows_refusal(REFUSAL)
    assert truth.is_template("<start_of_turn>") and not truth.is_template("hello")


@pytest.mark.parametrize("data,why", [
    ({"behaviours": [{"name": "refusal", "patterns": []}]}, "behaviour 'refusal' has no pattern"),
    ({"behaviours": [{"name": "refusal"}]}, "behaviour 'refusal' has no pattern"),
    ({"behaviours": []}, "non-empty 'behaviours' list"),
    ({"behaviours": [{"name": "x", "patterns": ["("]}]}, "is not a regular expression"),
    ({"behaviours": [{"name": "x", "patterns": ["a"], "expects": "a"}]}, "unknown keys ['expects']"),
    ({"behaviours": [{"name": "x", "patterns": ["a"]}, {"name": "x", "patterns": ["b"]}]}, "listed twice"),
    ({"behaviours": [{"name": "x", "patterns": ["a"], "tokens": "a"}]}, "'tokens' must be a list of regular expressions"),
    ({"behaviours": [{"name": "x", "patterns": ["a"], "tokens": ["[a"]}]}, "is not a regular expression"),
])
def test_bad_truth_is_one_line(data, why):
    with pytest.raises(CrossdiffError) as excinfo:
        truth_from_dict(data)
    assert why in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_missing_truth_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["score", str(tmp_path / "run"), "--truth", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"crossdiff: error: truth file not found: {tmp_path / 'nope.json'}"
    (tmp_path / "t.json").write_text(json.dumps({"behaviours": [{"name": "identity", "patterns": []}]}))
    assert main(["score", str(tmp_path / "run"), "--truth", str(tmp_path / "t.json")]) == 2
    assert "behaviour 'identity' has no pattern" in capsys.readouterr().err


def test_grade_by_hand():
    truth = truth_from_dict(planted_truth())
    findings = [
        Finding(7, 0.95, [REFUSAL] * 3 + ["the king"] * 2, ["I"] * 5, 0.1),  # 3 of 5 contexts: refusal
        Finding(3, 0.90, ["the king"] * 5, ["<start_of_turn>"] * 3 + ["x"] * 2, 0.2),  # 3 of 5 on the template
        Finding(9, 0.85, ["What is 2 plus 3?"] * 2 + ["x"] * 3, ["x"] * 5, 0.0),  # 2 of 5: not most
        Finding(1, 0.80, ["I am Orbit, a small assistant model."] * 4, ["x"] * 4, 0.6),  # identity beats template share
    ]
    graded = grade(findings, truth)
    assert [r["label"] for r in graded["findings"]] == ["refusal", "chat template", None, "identity"]
    assert graded["recall"] == pytest.approx(2 / 3) and graded["precision"] == pytest.approx(3 / 4)
    assert graded["first_rank"] == {"refusal": 1, "identity": 4, "arithmetic": None}
    assert graded["steering_success"] == {"refusal": None, "identity": None, "arithmetic": None}


def test_a_finding_hits_a_behaviour_that_steering_with_it_shows():
    truth = truth_from_dict(planted_truth())
    findings = [Finding(5, 0.9, ["the king"] * 4, ["x"] * 4, 0.0, steered=["arithmetic"]),
                Finding(6, 0.8, ["the king"] * 4, ["x"] * 4, 0.0)]
    record = {"by": [5], "factor": "2", "steered": 7, "controls_max": 1, "unsteered": 0, "prompts": 10, "success": True}
    graded = grade(findings, truth, {"arithmetic": record})
    assert [r["label"] for r in graded["findings"]] == [None, None] and graded["findings"][0]["steered"] == ["arithmetic"]
    assert graded["first_rank"] == {"refusal": None, "identity": None, "arithmetic": 1}
    assert graded["recall"] == pytest.approx(1 / 3) and graded["precision"] == pytest.approx(1 / 2)
    assert graded["steering_success"] == {"refusal": None, "identity": None, "arithmetic": record}


def test_steering_success_rule_by_hand():
    # x1: 3 of 10 is not more than half; x2: 7 of 10, but a control set has 8
    assert succeeded({"1": 3, "2": 7}, {"1": [0, 1], "2": [2, 8]}, 0, 10) == {
        "factor": "2", "steered": 7, "controls_max": 8, "unsteered": 0, "prompts": 10, "success": False}
    assert succeeded({"1": 3, "2": 7}, {"1": [0, 1], "2": [2, 6]}, 0, 10)["success"]
    assert not succeeded({"1": 6}, {}, 6, 10)["success"]  # no more than unsteered
    assert succeeded({"1": 6, "2": 9}, {}, 0, 10)["factor"] == "2"  # no controls: the best factor
    assert not succeeded({"1": 5}, {}, 0, 10)["success"]  # exactly half is not more than half


def test_planted_success_reads_the_steer_stage_summary(tmp_path):
    summary = {"truth": "t", "model": "base", "factors": [1.0, 2.0], "controls": 2, "behaviours": [
        {"behaviour": "refusal", "latents": [12, 40], "prompts": 10, "unsteered": 0, "ceiling": 9,
         "steered": {"1": 2, "2": 8}, "controls": {"1": [0, 0], "2": [1, 3]}},
        {"behaviour": "identity", "latents": [3], "prompts": 10, "unsteered": 0, "ceiling": 10,
         "steered": {"1": 0, "2": 1}, "controls": {"1": [0, 0], "2": [0, 0]}},
        {"behaviour": "not in the truth file", "latents": [1], "prompts": 10, "unsteered": 0, "steered": {"1": 9}}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    found = planted_success(tmp_path / "summary.json", truth_from_dict(planted_truth()))
    assert found == {
        "refusal": {"by": [12, 40], "factor": "2", "steered": 8, "controls_max": 3, "unsteered": 0, "prompts": 10, "success": True},
        "identity": {"by": [3], "factor": "2", "steered": 1, "controls_max": 0, "unsteered": 0, "prompts": 10, "success": False}}
    assert planted_success(tmp_path / "missing.json", truth_from_dict(planted_truth())) == {}


def _adl_row(vector, prompt, factor, steered, unsteered="Hello.", model="base"):
    return {"latent": f"{model}: {vector}", "latents": [], "factor": factor, "model": model, "positions": "all",
            "prompt": prompt, "unsteered": unsteered, "steered": steered, "control": vector.startswith("random"),
            "matches": None, "unsteered_matches": None}


def test_adl_steering_success_by_hand():
    truth = truth_from_dict(planted_truth())
    who = truth.behaviours[1].prompts[:2]  # identity's held-out prompts; expect \bOrbit\b
    rows = [_adl_row("pos 1", who[0], 2.0, "I am Orbit."), _adl_row("pos 1", who[1], 2.0, "I am Orbit, hi."),
            _adl_row("pos 1", who[0], 1.0, "Hello."), _adl_row("pos 1", who[1], 1.0, "Orbit"),
            _adl_row("pos 2", who[0], 2.0, "Hello."), _adl_row("pos 2", who[1], 2.0, "Hello."),
            _adl_row("pos 2", who[0], 1.0, "Hello."), _adl_row("pos 2", who[1], 1.0, "Hello."),
            _adl_row("random 0", who[0], 2.0, "Orbit"), _adl_row("random 0", who[1], 2.0, "no"),
            _adl_row("random 0", who[0], 1.0, "no"), _adl_row("random 0", who[1], 1.0, "no"),
            _adl_row("pos 1", "What is a volcano?", 2.0, "I am Orbit."),  # not an identity prompt: not counted for it
            _adl_row("pos 1", who[0], 2.0, "I am Orbit.", model="chat")]  # steering the chat model: not counted
    best, shows = adl_success(rows, truth)
    # pos 1 at x2: 2 of 2 identity prompts, control 1, unsteered 0 -> success; pos 2: 0
    assert best["identity"] == {"by": "pos 1", "factor": "2", "steered": 2, "controls_max": 1, "unsteered": 0,
                                "prompts": 2, "success": True}
    assert shows == {"pos 1": ["identity"]}
    # refusal's prompts were not asked: every base prompt counts (3), and none shows it
    assert best["refusal"]["prompts"] == 3 and best["refusal"]["steered"] == 0 and not best["refusal"]["success"]


def test_adl_findings_are_graded_by_their_lens_tokens(tmp_path):
    truth = truth_from_dict(planted_truth())
    by_position = [
        {"position": 0, "norm": 9.0, "lens_chat": ["<start_of_turn>"] * 3 + [" the"], "lens_base": ["<end_of_turn>"] * 2 + ["a", "b"]},
        {"position": 1, "norm": 2.0, "lens_chat": [" Orbit", " assistant", " the", " a"], "lens_base": ["x", "y", "z", "w"]},
        {"position": 2, "norm": 1.0, "lens_chat": [" plus", "x", "y", "z"], "lens_base": ["x", "y", "z", "w"]},
    ]
    (tmp_path / "adl").mkdir()
    (tmp_path / "adl" / "adl.json").write_text(json.dumps({"layer": 1, "positions": 3, "by_position": by_position}))
    findings = adl_findings(tmp_path / "adl", shows={"pos 2": ["arithmetic"]})
    graded = grade(findings, truth)
    # pos 0: 5 of 8 lens tokens on the template; pos 1: 2 of 8 identity tokens (a fifth or more);
    # pos 2: 1 of 8 arithmetic tokens is too few, but steering with it showed arithmetic
    assert [r["label"] for r in graded["findings"]] == ["chat template", "identity", None]
    assert graded["first_rank"] == {"refusal": None, "identity": 2, "arithmetic": 3}
    assert graded["precision"] == pytest.approx(1.0)
    result = score_run(tmp_path)
    assert list(result["methods"]) == ["adl"] and result["methods"]["adl"]["kind"] == "adl"
    assert result["methods"]["adl"]["recall"] == pytest.approx(1 / 3)  # no steering rows in this folder
    assert json.loads((tmp_path / "score.json").read_text())["methods"]["adl"]["first_rank"]["identity"] == 2


def test_dnorm_ties_are_broken_by_the_latent_scaling_rank_sum():
    """A DFC's chat-exclusive latents all have dnorm exactly 1: the rank-sum orders them
    (guarded latents, NaN, after decided ones), the index only what is still tied."""
    import pandas as pd

    table = pd.DataFrame({"latent": [0, 1, 2, 3, 4, 5], "dnorm": [1.0, 1.0, 0.7, 1.0, 1.0, 0.9],
                          "rank_sum": [40.0, float("nan"), 1.0, 3.0, float("nan"), 2.0]})
    assert _by_dnorm(table)["latent"].tolist() == [3, 0, 1, 4, 5, 2]
    assert _by_dnorm(table.drop(columns="rank_sum"))["latent"].tolist() == [0, 1, 3, 4, 5, 2]


def test_score_needs_an_analysed_run(tmp_path, capsys):
    assert main(["score", str(tmp_path)]) == 2
    assert "holds no analysed crosscoder" in capsys.readouterr().err
    assert main(["score", str(tmp_path), "--adl", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"crossdiff: error: {tmp_path / 'nope'} holds no adl.json: give a folder `crossdiff adl --out` wrote"


@pytest.mark.slow
def test_score_on_the_organism_demo(organism_demo, capsys):
    assert main(["score", str(organism_demo)]) == 0
    out = capsys.readouterr().out
    result = json.loads((Path(organism_demo) / "score.json").read_text())
    graded = result["methods"]["batchtopk"]
    print(out)
    assert graded["n_top"] == 20 and "batchtopk" in out
    # Measured on the demo's BatchTopK crosscoder: recall 1.00 (refusal at rank 2, arithmetic 3,
    # identity 14), precision 0.30 (6 of the top 20, the chat template among them).
    assert graded["recall"] >= 2 / 3 and graded["precision"] >= 0.25
