"""Streaming training against collect-then-train, on the same tokens, in one run.

Both sides turn the organism recipe's texts into a trained BatchTopK crosscoder with the
same training options, one epoch (every token once):

- cache: ``collect()`` into a temporary cache, then ``Trainer.fit`` on a
  ``ShuffledPairLoader`` over it (one epoch);
- stream: ``train_streaming`` (both models and the crosscoder in one process, the buffer
  refilled by a background thread).

Each side's wall time includes loading the models; reported: tokens trained per second,
the ratio stream / cache, and the disk each left behind (cache + checkpoints, or
checkpoints only). The sides alternate for ``--repeats`` rounds; the best time of each
is kept.

    python benchmarks/stream.py [--tokens 20000] [--batch-size 256] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from crossdiff.cache.store import PairedCache
from crossdiff.collect.collector import collect
from crossdiff.organism.data import write_demo_data
from crossdiff.run.demo import DemoConfig, demo_recipe
from crossdiff.train.loader import ShuffledPairLoader
from crossdiff.recipe import recipe_from_dict
from crossdiff.train.stream import train_streaming
from crossdiff.train.trainer import Trainer

RATIO = {"pretraining": 0.5, "chat": 0.5}


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cache_side(recipe, config, out: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    collect(recipe.collect, quiet=True)
    loader = ShuffledPairLoader(PairedCache(recipe.collect.out), config.batch_size, source_ratio=RATIO,
                                seed=config.seed, epochs=1, normalize=True)
    trainer = Trainer(config, loader.cache.d_model, out / "trained", input_scale=loader.normalization, quiet=True)
    trainer.fit(loader)
    return time.perf_counter() - start, trainer.tokens, disk_bytes(Path(recipe.collect.out)) + disk_bytes(out / "trained")


def stream_side(recipe, config, out: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    model = train_streaming(recipe.collect, recipe.stream, config, out / "streamed", quiet=True)
    return time.perf_counter() - start, int(model.config.metadata["tokens"]), disk_bytes(out / "streamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per source")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--expansion-factor", type=int, default=8)
    parser.add_argument("--buffer-tokens", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base = recipe_from_dict(demo_recipe(DemoConfig(out=str(Path(tmp) / "run"), tokens_per_source=args.tokens)))
        write_demo_data(base.out / "data", base.data)
        config = dataclasses.replace(base.crosscoders["batchtopk"], steps=None, batch_size=args.batch_size,
                                     expansion_factor=args.expansion_factor, checkpoint_every=0, log_every=10**9)
        config.data = dataclasses.replace(config.data, epochs=1)
        results: dict[str, list[tuple[float, int, int]]] = {"cache": [], "stream": []}
        for round_ in range(args.repeats):
            for side, run in (("cache", cache_side), ("stream", stream_side)):
                out = Path(tmp) / f"{side}-{round_}"
                recipe = dataclasses.replace(
                    base, collect=dataclasses.replace(base.collect, out=str(out / "cache")),
                    stream=dataclasses.replace(base.stream, buffer_tokens=args.buffer_tokens),
                )
                results[side].append(run(recipe, config, out))
                shutil.rmtree(out)
        best = {side: min(runs) for side, runs in results.items()}
        rate = {side: tokens / seconds for side, (seconds, tokens, _) in best.items()}
        report = {
            "tokens_per_source": args.tokens, "batch_size": args.batch_size,
            "d_sae": config.expansion_factor * 128, "buffer_tokens": args.buffer_tokens, "threads": args.threads,
            **{f"{side}_seconds": round(best[side][0], 2) for side in best},
            **{f"{side}_tokens_trained": best[side][1] for side in best},
            **{f"{side}_tokens_per_s": round(rate[side]) for side in rate},
            **{f"{side}_disk_mib": round(best[side][2] / 2**20, 2) for side in best},
            "ratio_stream_over_cache": round(rate["stream"] / rate["cache"], 3),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
