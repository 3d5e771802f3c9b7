"""KL patching on the bundled organism (the demo's causal step): the paper's causal findings."""

import json

import pandas as pd
import pytest

from crossdiff.causal.experiment import KL_COLUMNS

pytestmark = pytest.mark.slow


def _kl(folder, condition, subset="first_k", form=None):
    table = pd.read_parquet(folder / "kl.parquet")
    rows = table[(table.condition == condition) & (table.subset == subset)]
    rows = rows[rows.form.isna()] if form is None else rows[rows.form == form]
    assert len(rows) == 1
    return float(rows.kl_mean.iloc[0])


def test_causal_outputs_follow_the_file_contract(organism_demo):
    for name in ("l1", "batchtopk"):
        folder = organism_demo / name / "causal"
        table = pd.read_parquet(folder / "kl.parquet")
        assert list(table.columns) == KL_COLUMNS
        assert set(table.subset) == {"all", "first_k", "rest"}
        assert set(table.form.dropna()) == {"replace", "add"}
        assert (table.ci_low <= table.kl_mean).all() and (table.kl_mean <= table.ci_high).all()
        assert (folder / "kl.png").stat().st_size > 0
        summary = json.loads((folder / "summary.json").read_text())
        assert not (folder.parent / ".causal.progress.json").exists()  # removed once the outputs are written
        assert summary["n_tokens"]["all"] == summary["n_tokens"]["first_k"] + summary["n_tokens"]["rest"]


def test_baselines_on_the_organism(organism_demo):
    for name in ("l1", "batchtopk"):
        folder = organism_demo / name / "causal"
        none = _kl(folder, "None")
        assert none > 1.0  # the base residual alone leaves the chat model far from itself
        assert _kl(folder, "All") < 0.1 * none  # the crosscoder's chat-minus-base reconstruction closes > 90%
        assert _kl(folder, "eps_chat") > 0.7 * none  # the chat error (with the base reconstruction) closes little


def test_latent_scaling_and_relative_norm_pick_the_causal_halves(organism_demo):
    l1, batchtopk = organism_demo / "l1" / "causal", organism_demo / "batchtopk" / "causal"
    # L1: the half Latent Scaling confirms as chat-specific closes more of the first-k KL than the rejected half.
    assert _kl(l1, "ls-best", form="replace") < _kl(l1, "ls-worst", form="replace") - 0.05
    # BatchTopK: no latent is chat-only here, so the pool is the most chat-leaning latents, and it says so.
    summary = json.loads((batchtopk / "summary.json").read_text())
    assert summary["pool"]["rule"] == "top-dnorm" and "most chat-leaning" in summary["pool"]["note"]
    assert _kl(batchtopk, "dnorm-top", form="replace") < _kl(batchtopk, "dnorm-bottom", form="replace") - 0.02


def test_the_refusal_latent_steered_into_the_chat_model_makes_it_refuse_more_than_random_latents(organism_demo, tmp_path):
    """Steering with a control: the L1 latent that fires where the chat model starts answering
    trigger requests (and not benign ones) makes it refuse benign requests; random latents,
    pushed the same way, do not. (Steered into the base it does not: docs/causal.md.)"""
    from crossdiff.causal.steer import SteerConfig, answer_start_contrast, match_counts, run_steer
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.models import load_model_pair
    from crossdiff.organism import heldout_prompts
    from crossdiff.organism.behaviours import REFUSAL

    crosscoder = CrossCoder.from_pretrained(organism_demo / "l1" / "crosscoder")
    pair = load_model_pair(*crosscoder.config.model_names, dtype="float32")
    refusal = [p.user for p in heldout_prompts("refusal")]
    benign = [p.user for p in heldout_prompts("benign")]
    latent = int(answer_start_contrast(crosscoder, pair, refusal, benign)["latent"].iloc[0])
    config = SteerConfig(crosscoder=str(organism_demo / "l1" / "crosscoder"), analysis_dir=str(organism_demo / "l1" / "analysis"),
                         latents=[str(latent)], prompts=benign[::6], factors=[2.0], model="chat", max_new_tokens=16,
                         expect=REFUSAL.split(".")[0], controls=3, out=str(tmp_path / "steering.jsonl"))
    counts = match_counts(run_steer(config, pair=pair))
    chosen, controls = counts[~counts["control"]].iloc[0], counts[counts["control"]]
    assert chosen[2.0] >= chosen["unsteered"] + 4, counts  # the latent makes the chat model refuse benign requests
    assert chosen[2.0] >= controls[2.0].max() + 4, counts  # ... and random latents pushed as hard do not


def test_planted_steering_stage_finds_chat_leaning_latents_and_counts_them_against_controls(organism_demo, tmp_path):
    """The steer:NAME stage's machinery on the organism: a truth file in, per behaviour the most
    contrasting chat-leaning latent steered into the base, with control sets of the same size."""
    from crossdiff.causal.planted import PlantedSteerConfig, format_planted, steer_planted
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.models import load_model_pair
    from crossdiff.organism import heldout_prompts
    from crossdiff.organism.behaviours import REFUSAL

    refusal = [p.user for p in heldout_prompts("refusal")]
    benign = [p.user for p in heldout_prompts("benign")]
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"ordinary_prompts": benign[:20], "behaviours": [
        {"name": "refusal", "patterns": ["cannot help"], "expect": REFUSAL.split(".")[0], "contrast_prompts": refusal[:20],
         "prompts": refusal[20:]}]}))
    crosscoder = CrossCoder.from_pretrained(organism_demo / "l1" / "crosscoder")
    pair = load_model_pair(*crosscoder.config.model_names, dtype="float32")
    config = PlantedSteerConfig(truth=str(truth), latents=2, pick="answer-start", factors=[1.0, 2.0], controls=2, prompts=4,
                                max_new_tokens=8)
    summary = steer_planted(organism_demo / "l1" / "crosscoder", organism_demo / "l1" / "analysis", tmp_path / "planted", config, pair)
    (result,) = summary["behaviours"]
    assert len(result["latents"]) == 2 and min(result["dnorm"]) >= 0.5 and result["contrast"] == sorted(result["contrast"], reverse=True)
    assert result["prompts"] == 4 and set(result["steered"]) == {"1", "2"} and all(len(c) == 2 for c in result["controls"].values())
    rows = [json.loads(line) for line in (tmp_path / "planted" / "refusal.jsonl").read_text().splitlines()]
    controls = [r for r in rows if r["control"]]
    assert {len(r["latents"]) for r in controls} == {2} and not {j for r in controls for j in r["latents"]} & set(result["latents"])
    assert json.loads((tmp_path / "planted" / "summary.json").read_text()) == summary
    assert "refusal" in format_planted(summary)


def test_planted_steering_by_attribution_and_activation(organism_demo, tmp_path):
    """pick = attribution, how = activation: the latents come best first with a positive attribution,
    and the chosen set and its controls are steered the same way (rows say how)."""
    from crossdiff.causal.planted import PlantedSteerConfig, steer_planted
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.models import load_model_pair
    from crossdiff.organism import heldout_prompts
    from crossdiff.organism.behaviours import REFUSAL

    refusal = [p.user for p in heldout_prompts("refusal")]
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"behaviours": [
        {"name": "refusal", "patterns": ["cannot help"], "expect": REFUSAL.split(".")[0], "contrast_prompts": refusal[:6],
         "prompts": refusal[20:]}]}))
    crosscoder = CrossCoder.from_pretrained(organism_demo / "l1" / "crosscoder")
    pair = load_model_pair(*crosscoder.config.model_names, dtype="float32")
    config = PlantedSteerConfig(truth=str(truth), latents=5, pick="attribution", how="activation", factors=[1.0], controls=2,
                                prompts=3, max_new_tokens=8, ceiling=False)
    summary = steer_planted(organism_demo / "l1" / "crosscoder", organism_demo / "l1" / "analysis", tmp_path / "planted", config, pair)
    (result,) = summary["behaviours"]
    assert summary["how"] == "activation" and len(result["latents"]) == 5
    assert result["attribution"] == sorted(result["attribution"], reverse=True) and min(result["attribution"]) > 0
    rows = [json.loads(line) for line in (tmp_path / "planted" / "refusal.jsonl").read_text().splitlines()]
    assert {r["how"] for r in rows} == {"activation"} and len(rows) == 3 * 3
    assert {len(r["latents"]) for r in rows} == {5}
