"""Training cost of each crosscoder variant as a ratio to plain BatchTopK, in one run.

    python benchmarks/variants_cost.py [--d-in 256] [--d-sae 16384] [--k 32] [--batch 2048] [--reps 5] [--sparse auto]

Every variant (standard BatchTopK, dfc, matryoshka, delta) gets a Trainer of the same shape
and seed; each repetition times one ``Trainer._train_step`` (forward, backward, DFC's
gradient mask, clipping, Adam, threshold) of every variant on the same batch, the variants
interleaved so that a busy machine slows them alike. Reported: the median seconds per step
and its ratio to standard BatchTopK.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossdiff.config import from_dict  # noqa: E402
from crossdiff.train.trainer import TrainConfig, Trainer  # noqa: E402

VARIANTS = ("standard", "dfc", "matryoshka", "delta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sparse", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sparse = {"auto": None, "on": True, "off": False}[args.sparse]
    x = torch.randn(args.batch, 2, args.d_in, generator=torch.Generator().manual_seed(0)).to(args.device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for variant in VARIANTS:
            config = from_dict(TrainConfig, dict(variant=variant, d_sae=args.d_sae, k=args.k, batch_size=args.batch,
                                                 warmup_steps=1, threshold_start_step=0, sparse=sparse, device=args.device))
            trainers[variant] = Trainer(config, args.d_in, Path(tmp) / variant, quiet=True)
            trainers[variant]._train_step(x)  # warm-up (and b_dec's geometric median)
        for _ in range(args.reps):
            for variant, trainer in trainers.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                trainer._train_step(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[variant].append(time.perf_counter() - start)
    base = statistics.median(times["standard"])
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, sparse {trainers['standard'].sparse}, "
          f"{args.device}, {torch.get_num_threads()} threads, {args.reps} interleaved repetitions")
    print(f"{'variant':<12} {'s/step':>8} {'ratio':>6}")
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        print(f"{variant:<12} {median:>8.3f} {median / base:>6.2f}")


if __name__ == "__main__":
    main()
