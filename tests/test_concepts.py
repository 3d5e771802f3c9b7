"""Findings: latents ranked by evidence and grouped into concepts (crossdiff.analysis.concepts);
on the organism the template latents form one concept and no concept mixes two planted behaviours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crossdiff.analysis.concepts import FindingsConfig, format_findings, group_concepts, rank_latents, read_findings
from crossdiff.cli import main

PLANTED = ("refusal", "identity", "arithmetic")


def test_grouping_keeps_known_clusters_and_gathers_the_template():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    decoder = np.concatenate([centres[i] + 0.2 * rng.normal(size=(4, 16)) for i in range(3)])  # 3 clusters of 4
    template = np.zeros(12, dtype=bool)
    template[[1, 6]] = True  # template latents from two different directions: still one concept
    labels = group_concepts(decoder, None, template, join=0.5)
    assert labels[1] == labels[6] and (labels == labels[1]).sum() == 2
    for members in ([0, 2, 3], [4, 5, 7], [8, 9, 10, 11]):
        assert len(set(labels[members])) == 1
    assert len(set(labels)) == 4
    # Activation correlation joins latents whose directions differ; a latent active everywhere does not chain them.
    conversations = 30
    behaviour = np.repeat([0, 1, 2], 10)
    maxima = np.stack([(behaviour == b) + 0.1 * rng.random(conversations) for b in (0, 0, 1, 1)] + [np.ones(conversations)], axis=1)
    unit = np.eye(5, 16)  # orthogonal decoder directions
    labels = group_concepts(unit, maxima, np.zeros(5, dtype=bool), join=0.5)
    assert labels[0] == labels[1] != labels[2] == labels[3] and labels[4] not in labels[:4]


def test_rank_puts_rejected_latents_last_and_scores_by_dnorm_and_contrast():
    table = pd.DataFrame({"latent": range(6), "dead": [False] * 5 + [True], "dnorm": [0.9, 0.8, 0.7, 0.6, 0.5, 0.99],
                          "verdict": ["complete shrinkage", "chat-specific", "uncertain", "chat-specific", "uncertain", "chat-specific"]})
    maxima = np.zeros((6, 5))  # conversations x pool (pool in dnorm order: latents 0, 1, 2, 3, 4)
    maxima[:2, 3] = 5.0  # latent 3 fires on the two highest-KL conversations
    kl = np.array([6.0, 5.0, 3.0, 2.0, 1.0, 0.5])
    ranked = rank_latents(table, maxima, kl, None, FindingsConfig(pool=10))
    assert 5 not in ranked["latent"].tolist()  # dead
    assert ranked["latent"].tolist()[-1] == 0  # rejected by Latent Scaling, whatever its dnorm
    assert ranked["latent"].tolist()[0] == 3 and ranked.iloc[0]["contrast"] > 1


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_organism_concepts(organism_demo, capsys):
    findings = read_findings(organism_demo / "batchtopk")
    assert findings is not None and findings["behaviour"]["prompts"] == 70
    latents = {e["latent"]: e for e in findings["latents"]}
    template = [e["latent"] for e in findings["latents"] if (e["template_share"] or 0) >= 0.5]
    concepts = findings["concepts"]
    template_concepts = [c for c in concepts if c["kind"] == "chat template"]
    assert len(template) >= 2 and len(template_concepts) == 1 and sorted(template_concepts[0]["latents"]) == sorted(template)
    for concept in concepts:
        behaviours = {latents[i]["group"] for i in concept["latents"]} & set(PLANTED)
        assert len(behaviours) <= 1, (concept, [latents[i]["group"] for i in concept["latents"]])
    named = {c["group"] for c in concepts[:12]}
    assert set(PLANTED) <= named, named  # every planted behaviour has a concept among the first twelve
    assert all(e["lens"] and e["lens"]["chat"]["promoted"] for e in findings["latents"])
    screen = format_findings(findings, "batchtopk")
    assert len(screen.splitlines()) <= 40
    assert main(["inspect", str(organism_demo / "batchtopk" / "analysis"), "--findings"]) == 0
    assert capsys.readouterr().out.strip() == screen
    page = (organism_demo / "report" / "index.html").read_text()
    assert page.index("What changed: the behavioural diff") < page.index("Concepts: the latents that carry it") < page.index("<h2>Overview</h2>")
