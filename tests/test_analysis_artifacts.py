"""The paper's central finding, reproduced on planted truth (short training runs)."""

from __future__ import annotations

import dataclasses


from crossdiff.analysis.artifacts import ArtifactExperiment, compare_sparsity


def test_l1_makes_chat_only_latents_that_latent_scaling_rejects(one_thread, tmp_path):
    base = ArtifactExperiment(steps=1000, eval_tokens=10_000, seed=1)
    experiment = dataclasses.replace(base, synthetic=dataclasses.replace(base.synthetic, seed=1))
    table = compare_sparsity(experiment, work_dir=tmp_path)
    l1, topk = table.loc["relu"], table.loc["batchtopk"]
    # Both learned the data; the planted genuinely chat-only features are found by both.
    assert l1["fve"] > 0.9 and topk["fve"] > 0.95
    assert topk["chat_only_on_genuine"] >= 3 and l1["chat_only_on_genuine"] >= 2
    # L1 turns concepts the base model has into chat-only latents; BatchTopK does not ...
    assert l1["chat_only_on_shared_concept"] >= 2 and topk["chat_only_on_shared_concept"] == 0
    # ... and Latent Scaling rejects some of them, while confirming every BatchTopK chat-only latent.
    assert l1["rejected"] >= 2 and l1["rejected"] > topk["rejected"]
    assert topk["confirmed"] == topk["chat_only"]
