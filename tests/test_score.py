"""Planted truth files (crossdiff.organism.truth) and `crossdiff score` (crossdiff.organism.score)."""

import json
from pathlib import Path

import pytest

from crossdiff.cli import main
from crossdiff.errors import CrossdiffError
from crossdiff.organism.behaviours import REFUSAL, heldout_prompts, planted_truth, shows_refusal
from crossdiff.organism.score import Finding, default_truth_path, grade
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


def test_score_needs_an_analysed_run(tmp_path, capsys):
    assert main(["score", str(tmp_path)]) == 2
    assert "holds no analysed crosscoder" in capsys.readouterr().err


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
