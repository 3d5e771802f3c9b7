"""Every method on an organism, with several seeds, scored against its planted truth.

    python benchmarks/methods_compared.py --out RUN_DIR [--seeds 0 1] [--write docs/methods-compared.md]
    python benchmarks/methods_compared.py --recipe recipes/smollm2-lora.toml --out RUN_DIR [--write FILE]

Runs an organism's recipe (default: the bundled organism's, recipes/organism.toml at its
default size; ``--recipe`` another, e.g. the real-pair organism recipes/smollm2-lora.toml)
with one crosscoder per variant and seed (``batchtopk``, ``dfc``, ``matryoshka``, ``delta``;
seed 0 keeps the bare names, other seeds add ``-s1``...), without the KL experiment, with
the planted-steering stage (the recipe's ``[steer]`` table; the bundled organism's recipe
has none, so :data:`ORGANISM_STEER` is added), then the activation-difference baseline
once per seed (``adl``, ``adl-s1``: it trains nothing, so its seed draws which half of the
pretraining documents it averages over, and its random control directions), and
`crossdiff score` on the run folder.

Prints, and with --write writes, the table: recall, precision, first rank of each
behaviour, the behaviours whose steering succeeded, and each crosscoder's training time as
a ratio to BatchTopK of the same seed (train-stage wall time from its metrics; a busy
machine makes it noisy), then the mean over seeds per method. Text below the line
NOTES_MARK in an existing --write file is kept (the hand-written reading of the table).
Stages already complete in RUN_DIR are skipped, so an interrupted run resumes; the run's
report (RUN_DIR/report) is rebuilt at the end, with the ADL section and the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crossdiff.config import load_file  # noqa: E402
from crossdiff.errors import CrossdiffError  # noqa: E402
from crossdiff.organism.score import default_truth_path, format_steering, score_run  # noqa: E402
from crossdiff.organism.truth import load_truth  # noqa: E402
from crossdiff.recipe import recipe_from_dict  # noqa: E402
from crossdiff.report.build import build_report  # noqa: E402
from crossdiff.run.demo import DemoConfig, demo_recipe  # noqa: E402
from crossdiff.run.stages import run_recipe  # noqa: E402

VARIANTS = {"batchtopk": {"activation": "batchtopk"}, "dfc": {"variant": "dfc"},
            "matryoshka": {"variant": "matryoshka"}, "delta": {"variant": "delta"}}
ORGANISM_STEER = {"truth": str(default_truth_path()), "pick": "anticipation", "latents": 1, "factors": [0.5, 1.0, 2.0],
                  "controls": 3, "prompts": 10, "max_new_tokens": 24}
ADL_OPTIONS = {"positions": 5, "top_tokens": 10, "factors": [0.5, 1.0, 2.0], "models": ["base"], "controls": 3,
               "max_new_tokens": 24}
NOTES_MARK = "<!-- notes below are kept by benchmarks/methods_compared.py -->"


def name_of(method: str, seed: int) -> str:
    return method if seed == 0 else f"{method}-s{seed}"


def recipe_data(recipe_path: str | None, out: str, seeds: list[int]) -> dict[str, Any]:
    """The organism's recipe with one crosscoder per variant and seed, no KL experiment, a [steer] table."""
    if recipe_path is None:
        data = demo_recipe(DemoConfig(out=out))
        data["steer"] = dict(ORGANISM_STEER)
    else:
        data = load_file(recipe_path)
        data["run"] = {**data.get("run", {}), "out": out}
        if "steer" not in data:
            raise SystemExit(f"{recipe_path} has no [steer] table: steering success needs one (docs/causal.md)")
    data.pop("causal", None)
    data["steer"].pop("crosscoders", None)  # a recipe may steer only some of its crosscoders; here every one is
    data["crosscoders"] = {name_of(v, s): {**options, "seed": s} for s in seeds for v, options in VARIANTS.items()}
    return data


def run_seed(data: dict[str, Any], seed: int, source: str) -> Any:
    """Train, analyse and steer one seed's crosscoders (so each seed's results are complete
    before the next seed starts); a crosscoder whose steering stage fails (no latent to steer
    for a behaviour) is reported and left without steering results. Returns the recipe."""
    seeded = {**data, "crosscoders": {name: options for name, options in data["crosscoders"].items() if options["seed"] == seed}}
    run_recipe(recipe_from_dict({k: v for k, v in seeded.items() if k != "steer"}, source=source), quiet=True)
    recipe = recipe_from_dict(seeded, source=source)
    for name in seeded["crosscoders"]:
        try:
            run_recipe(recipe, quiet=True, only=[f"steer:{name}"])
        except CrossdiffError as err:
            print(f"steer:{name}: {err}", flush=True)
    return recipe


def run_adl_seeds(recipe: Any, seeds: list[int]) -> None:
    """`crossdiff adl` once per seed into RUN/adl[-sN], on half the pretraining documents drawn by
    the seed, steering the base on every behaviour's held-out prompts."""
    from crossdiff.analysis.adl import ADLConfig, run_adl
    from crossdiff.models import load_model_pair

    truth = load_truth(recipe.steer.truth)
    prompts = [prompt for behaviour in truth.behaviours for prompt in behaviour.prompts[: recipe.steer.prompts]]
    documents = (recipe.out / "data" / "pretraining.jsonl").read_text().splitlines()
    pair = None
    for seed in seeds:
        out = recipe.out / name_of("adl", seed)
        if (out / "adl_steering.jsonl").is_file():
            continue
        texts = recipe.out / "data" / f"adl_texts_s{seed}.jsonl"
        texts.write_text("\n".join(random.Random(seed).sample(documents, len(documents) // 2)) + "\n")
        pair = pair or load_model_pair(recipe.collect.base, recipe.collect.chat, dtype="float32", device="cpu")
        run_adl(ADLConfig(base=recipe.collect.base, chat=recipe.collect.chat, layer=recipe.collect.layer, texts=str(texts),
                          out=str(out), max_docs=len(documents), prompts=prompts, seed=seed, **ADL_OPTIONS),
                pair=pair, quiet=True)


def training_seconds(run_dir: Path, name: str) -> float | None:
    """Wall time of a crosscoder's training from its metrics (tokens / mean tokens per second)."""
    path = run_dir / name / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    speeds = [line["tokens_per_s"] for line in lines if line.get("tokens_per_s")]
    return lines[-1]["tokens"] / (sum(speeds) / len(speeds)) if speeds else None


def table(result: dict[str, Any], run_dir: Path, seeds: list[int]) -> str:
    """One row per method and seed, then the mean over seeds per method."""
    behaviours = result["behaviours"]
    lines = ["| method | seed | recall | precision (top 20) | " + " | ".join(f"first {b}" for b in behaviours)
             + " | steering succeeded | train time / BatchTopK |", "|---" * (6 + len(behaviours)) + "|"]
    means: dict[str, list[tuple[float, float, int]]] = {}
    for method in [*VARIANTS, "adl"]:
        for seed in seeds:
            graded = result["methods"].get(name_of(method, seed))
            if graded is None:
                continue
            steering = graded["steering_success"]
            won = [b for b, r in steering.items() if r and r["success"]]
            steered = f"{len(won)} of {sum(r is not None for r in steering.values())}" + (f" ({', '.join(won)})" if won else "")
            seconds, reference = training_seconds(run_dir, name_of(method, seed)), training_seconds(run_dir, name_of("batchtopk", seed))
            ratio = f"{seconds / reference:.2f}" if seconds and reference else "-"
            ranks = " | ".join(str(graded["first_rank"][b] or "-") for b in behaviours)
            lines.append(f"| {method} | {seed} | {graded['recall']:.2f} | {graded['precision']:.2f} | {ranks} | {steered} | {ratio} |")
            means.setdefault(method, []).append((graded["recall"], graded["precision"], len(won)))
    lines += ["", "| method | seeds | mean recall | mean precision | mean behaviours steered |", "|---|---|---|---|---|"]
    for method, rows in means.items():
        lines.append(f"| {method} | {len(rows)} | {mean(r[0] for r in rows):.2f} | {mean(r[1] for r in rows):.2f} | "
                     f"{mean(r[2] for r in rows):.1f} |")
    return "\n".join(lines)


def steering_lines(result: dict[str, Any]) -> str:
    """Each method's best steering count per behaviour (of the held-out prompts)."""
    return "\n".join(f"- {name}: {format_steering(graded['steering_success'])}" for name, graded in result["methods"].items())


def write_doc(path: Path, command: str, body: str) -> None:
    """The generated part, then the notes already below NOTES_MARK in ``path`` (if any)."""
    notes = path.read_text().split(NOTES_MARK, 1)[1] if path.is_file() and NOTES_MARK in path.read_text() else "\n"
    path.write_text(f"# Methods compared on planted truth\n\nMade by `{command}`.\n\n{body}\n\n{NOTES_MARK}{notes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the run folder")
    parser.add_argument("--recipe", help="an organism's recipe with a [steer] table (default: the bundled organism's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--write", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("give at least two seeds: one seed cannot tell a method's advantage from seed noise")
    data = recipe_data(args.recipe, args.out, args.seeds)
    for seed in args.seeds:
        recipe = run_seed(data, seed, args.recipe or "the organism recipe")
    run_adl_seeds(recipe, args.seeds)
    result = score_run(args.out, recipe.steer.truth)
    build_report(args.out, say=lambda line: None)  # again: with the steering, the ADL section and the scores
    body = table(result, Path(args.out), args.seeds) + "\n\nBest steering result per behaviour (answers showing it, of " \
        "the held-out prompts; yes = more than half, and more than unsteered and every control):\n\n" + steering_lines(result)
    print(body)
    if args.write:
        shown = os.path.relpath(args.write, ROOT) if Path(args.write).resolve().is_relative_to(ROOT) else args.write
        command = "python benchmarks/methods_compared.py" + (f" --recipe {args.recipe}" if args.recipe else "") \
            + f" --out RUN --seeds {' '.join(map(str, args.seeds))} --write {shown}"
        write_doc(Path(args.write), command, body)


if __name__ == "__main__":
    main()
