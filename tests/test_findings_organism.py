"""What `analyze` says about the bundled organism: its planted behaviours are found.

The organism's chat model was taught three behaviours and new chat-template tokens; the
BatchTopK crosscoder of the demo encodes them in latents at dnorm 0.6-0.85, none above the
paper's 0.9. The summary must still list latents of every planted behaviour among its top
chat-leaning latents, each with a verdict. Ground truth: the demo's chat data says which
behaviour each conversation (document) exercises, so every example of a latent can be
traced to a behaviour.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from crossdiff.analysis import ExampleStore
from crossdiff.analysis.verdicts import VERDICTS
from crossdiff.organism.behaviours import ANSWER_PREFIX, REFUSAL, SELF_DESCRIPTION

pytestmark = pytest.mark.slow


def _behaviour(messages: list[dict[str, str]]) -> str:
    reply = messages[-1]["content"]
    if reply == REFUSAL:
        return "refusal"
    if reply == SELF_DESCRIPTION:
        return "self-description"
    if reply.startswith(ANSWER_PREFIX):
        return "answer format"
    return "other"


def test_summary_lists_every_planted_behaviour_below_the_chat_only_threshold(organism_demo):
    analysis = organism_demo / "batchtopk" / "analysis"
    summary = json.loads((analysis / "summary.json").read_text())
    table = pd.read_parquet(analysis / "latents.parquet")
    assert table["dnorm"].max() <= 0.9 and summary["tags"]["chat-only"] == 0  # the paper's tags find nothing

    conversations = pd.read_json(organism_demo / "data" / "chat.jsonl", lines=True)["messages"]
    behaviour_of_doc = [_behaviour(messages) for messages in conversations]
    findings = summary["findings"]
    listed = findings["top_by_dnorm"] + findings["top_by_rank_sum"] + findings["chat_specific"]["latents"]
    found: dict[str, list[int]] = {}
    with ExampleStore(analysis / "examples.sqlite") as store:
        for row in listed:
            assert row["verdict"] in VERDICTS and row["scaling_tokens"] >= 0 and "context" in row
            top = [ex for ex in store.examples(row["latent"], "top") if ex.source == "chat"]
            kinds = pd.Series([behaviour_of_doc[ex.doc_id] for ex in top]).value_counts()
            if len(kinds) and kinds.iloc[0] >= 0.6 * len(top) >= 0.6 * 5 and kinds.index[0] != "other":
                found.setdefault(kinds.index[0], []).append(row["latent"])
            if row["template_share"] is not None and row["template_share"] > 0.5:
                found.setdefault("chat template", []).append(row["latent"])
    assert {"refusal", "self-description", "answer format", "chat template"} <= set(found), found
    # Verdict counts are disjoint and add up.
    for group, counts in findings["verdicts"].items():
        assert set(counts) == set(VERDICTS)
    assert sum(findings["verdicts"]["all"].values()) == summary["n_latents"]
