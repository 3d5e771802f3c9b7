"""Every crosscoder variant on the bundled organism, scored against its planted truth.

    python benchmarks/methods_compared.py --out RUN_DIR [--seeds 0 1] [--write docs/methods-compared.md]

Runs the demo's recipe (recipes/organism.toml at its default size: one activation cache)
with one crosscoder per variant and seed (``batchtopk``, ``dfc``, ``matryoshka``,
``delta``; seed 0 keeps the demo's names, other seeds add ``-s1``...), without the causal
stage, then `crossdiff score` on the run folder. Prints, and with --write writes, the table
of recall, precision and first rank of each behaviour per crosscoder, and each variant's
training time as a ratio to BatchTopK of the same seed (wall time of the train stage in
this run; a busy machine makes it noisy). Stages already complete in RUN_DIR are skipped,
so a finished demo folder is reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossdiff.run.demo import DemoConfig, demo_recipe  # noqa: E402
from crossdiff.recipe import recipe_from_dict  # noqa: E402
from crossdiff.run.stages import run_recipe  # noqa: E402
from crossdiff.organism.score import score_run  # noqa: E402

VARIANTS = {"batchtopk": {"activation": "batchtopk"}, "dfc": {"variant": "dfc"},
            "matryoshka": {"variant": "matryoshka"}, "delta": {"variant": "delta"}}


def name_of(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}-s{seed}"


def training_seconds(run_dir: Path, name: str) -> float | None:
    """Wall time of a crosscoder's training from its metrics (tokens / mean tokens per second)."""
    path = run_dir / name / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    speeds = [line["tokens_per_s"] for line in lines if line.get("tokens_per_s")]
    return lines[-1]["tokens"] / (sum(speeds) / len(speeds)) if speeds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--write", help="also write the table to this markdown file")
    args = parser.parse_args()
    data = demo_recipe(DemoConfig(out=args.out))
    data.pop("causal")
    data["crosscoders"] = {name_of(v, s): {**options, "seed": s} for s in args.seeds for v, options in VARIANTS.items()}
    run_recipe(recipe_from_dict(data), quiet=True)
    result = score_run(args.out)
    behaviours = result["behaviours"]
    lines = ["| crosscoder | seed | recall | precision (top 20) | " + " | ".join(f"first {b}" for b in behaviours)
             + " | train time / BatchTopK |", "|---" * (5 + len(behaviours)) + "|"]
    run_dir = Path(args.out)
    for seed in args.seeds:
        reference = training_seconds(run_dir, name_of("batchtopk", seed))
        for variant in VARIANTS:
            name = name_of(variant, seed)
            graded = result["methods"].get(name)
            if graded is None:
                continue
            seconds = training_seconds(run_dir, name)
            ratio = f"{seconds / reference:.2f}" if seconds and reference else "-"
            ranks = " | ".join(str(graded["first_rank"][b] or "-") for b in behaviours)
            lines.append(f"| {variant} | {seed} | {graded['recall']:.2f} | {graded['precision']:.2f} | {ranks} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).write_text(
            "# Methods compared on the bundled organism\n\n"
            "Made by `python benchmarks/methods_compared.py --out RUN --seeds "
            + " ".join(map(str, args.seeds)) + f" --write {args.write}` (crossdiff score, top 20 findings by relative "
            "decoder norm; steering success not measured; the activation-difference baseline is not scored yet).\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
