"""L1 vs BatchTopK on planted truth: which crosscoder invents chat-only latents?

Trains both crosscoders on the same synthetic pair for several seeds, analyses them with
`crossdiff.analysis.analyze`, and prints a Markdown table (the one in docs/analysis.md).
CPU, about a minute per seed:

    python docs/examples/l1_vs_batchtopk.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from crossdiff.analysis.artifacts import ArtifactExperiment, compare_sparsity

COLUMNS = ["fve", "l0", "chat_only", "confirmed", "rejected", "shrinkage", "decoupling",
           "chat_only_on_genuine", "chat_only_on_shared_concept", "verdict_correct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=ArtifactExperiment.steps)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only add contention
    print("| seed | crosscoder | " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 2))
    for seed in args.seeds:
        base = ArtifactExperiment(steps=args.steps, seed=seed)
        experiment = dataclasses.replace(base, synthetic=dataclasses.replace(base.synthetic, seed=seed))
        table = compare_sparsity(experiment)
        for name, row in table.iterrows():
            cells = [f"{row[c]:.3f}" if c == "fve" else f"{row[c]:.2f}" if c == "l0" else str(int(row[c])) for c in COLUMNS]
            print(f"| {seed} | {'L1' if name == 'relu' else 'BatchTopK'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
