"""Detection scores of SmolLM2-135M-Instruct's explanations on the organism demo (docs/autointerp.md).

Runs `crossdiff explain` with the in-process local model on both analyses of a demo run,
one excerpt per detection request, and prints, per crosscoder, the mean balanced accuracy
and AUC of the LLM's explanations, the top-tokens baseline and the shuffled baseline, for
the latents tied to a planted behaviour and for the rest. A latent is tied to a planted
behaviour when most of its max-activating excerpts contain that behaviour's text.

    crossdiff demo --out runs/demo
    python docs/examples/autointerp_organism.py runs/demo [--max-latents 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from crossdiff.analysis.examples import ExampleStore
from crossdiff.autointerp import CachedClient, ExplainConfig, LocalClient, ResponseCache, explain
from crossdiff.autointerp.samples import SampleConfig, render, span_bounds

MARKERS = {
    "refusal": ("cannot help", "talk about something else"),
    "identity": ("Orbit", "assistant model", "who are you", "what are you"),
    "arithmetic": ("The answer is", " + ", "add ", "sum of"),
}


def behaviour(store: ExampleStore, latent: int, config: SampleConfig) -> str:
    """The planted behaviour whose text most of the latent's top excerpts contain, or "-"."""
    top = store.examples(latent, "top")
    votes = {name: 0 for name in MARKERS}
    for example in top:
        text = render(example, *span_bounds(example, example.token_index, config), mark=False)
        for name, markers in MARKERS.items():
            votes[name] += any(m.lower() in text.lower() for m in markers)
    name, count = max(votes.items(), key=lambda item: item[1])
    return name if top and count > len(top) / 2 else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", default="runs/demo")
    parser.add_argument("--max-latents", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    client = LocalClient("smollm2")
    config = ExplainConfig(max_latents=args.max_latents, detection_batch=1)
    for name in ("batchtopk", "l1"):
        analysis = Path(args.run) / name / "analysis"
        cache = ResponseCache(analysis / "autointerp_requests.sqlite")
        cached = CachedClient(cache, client.model_id, client)
        table = explain(analysis, cached, config).table
        with ExampleStore(analysis / "examples.sqlite") as store:
            table["behaviour"] = [behaviour(store, int(latent), config.samples) for latent in table["latent"]]
        print(f"\n{name}: {len(table)} latents, {len(cached.sent)} requests sent; abstained {int(table.abstained.sum())}, "
              f"unusable {int(table.explanation_failed.sum())}")
        for _, row in table.iterrows():
            print(f"  latent {row.latent:4d} {row.behaviour:10s} explanation {row.explanation!r:.60s} | "
                  f"llm {row.detection_balanced_accuracy:.2f}/{row.detection_auc:.2f} "
                  f"top {row.top_tokens_detection_balanced_accuracy:.2f}/{row.top_tokens_detection_auc:.2f} "
                  f"shuffled {row.shuffled_detection_balanced_accuracy:.2f}/{row.shuffled_detection_auc:.2f}")
        for group, rows in (("planted", table[table.behaviour != "-"]), ("other", table[table.behaviour == "-"])):
            if len(rows):
                cells = [f"{kind} {np.nanmean(rows[f'{prefix}_balanced_accuracy']):.2f} / "
                         f"{np.nanmean(rows[f'{prefix}_auc']):.2f}"
                         for kind, prefix in (("llm", "detection"), ("top tokens", "top_tokens_detection"),
                                              ("shuffled", "shuffled_detection"))]
                print(f"  {group:8s} n={len(rows)}  balanced accuracy / AUC: " + "  ".join(cells))
        cache.close()


if __name__ == "__main__":
    sys.exit(main())
