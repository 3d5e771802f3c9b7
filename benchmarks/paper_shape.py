"""A few training steps at the paper's shape on this machine, with time and peak memory.

    python benchmarks/paper_shape.py [--steps 3] [--threads 2] [--precision fp32] [--min-free-gib 14]

Shape: Gemma 2 2B layer 13 (d_in 2304 per model, 2 models), d_sae 73,728, BatchTopK k 100,
batch 2048 tokens: 340M encoder + 340M decoder weights. The step is the one users run
(``Trainer._train_step``: sparse BatchTopK step, gradient clipping, fused Adam, dead-latent
counters, threshold EMA), plus one logged metrics line, on random normalised activations.
``dead_after_tokens`` is set to one batch so that from the second step on the latents that
did not fire are dead and the auxiliary loss runs at its real size too.

Peak memory is the process's maximum resident set size (``resource.getrusage``), which
includes torch's own footprint (~0.4 GiB). The script refuses to start when less than
``--min-free-gib`` of memory is available (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from crossdiff.train.trainer import TrainConfig, Trainer  # noqa: E402

D_IN, D_SAE, K, BATCH = 2304, 73_728, 100, 2048


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-free-gib", type=float, default=14.0)
    args = parser.parse_args()
    free = available_gib()
    if free < args.min_free_gib:
        sys.exit(f"only {free:.1f} GiB available, need {args.min_free_gib}: not starting")
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        activation="batchtopk", d_sae=D_SAE, k=K, batch_size=BATCH, warmup_steps=0, threshold_start_step=0,
        dead_after_tokens=BATCH, lr=1e-4, device=args.device, precision=args.precision,
    )
    out = Path(tempfile.mkdtemp())
    trainer = Trainer(config, D_IN, out, quiet=True)
    trainer.out.mkdir(parents=True, exist_ok=True)
    print(f"built: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.0f}M parameters, sparse step {trainer.sparse}, "
          f"peak {peak_gib():.1f} GiB, {free:.1f} GiB were available", flush=True)
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.steps):
        x = torch.randn(BATCH, 2, D_IN, generator=g)
        start = time.perf_counter()
        terms = trainer._train_step(trainer._prepare(x))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        record = trainer._log(x, terms, BATCH / times[-1])
        print(f"step {step + 1}: {times[-1]:.1f} s, L0 {record['l0']:.1f}, aux {record['aux']:.3g}, "
              f"dead {record['dead_fraction']:.2f}, threshold {record['threshold']:.3g}, peak {peak_gib():.1f} GiB", flush=True)
    steady = times[1:] or times
    print(json.dumps({
        "shape": {"d_in": D_IN, "n_models": 2, "d_sae": D_SAE, "k": K, "batch": BATCH},
        "precision": args.precision, "device": str(trainer.device), "threads": args.threads,
        "step_s": times, "tokens_per_s": BATCH / (sum(steady) / len(steady)), "peak_rss_gib": round(peak_gib(), 2),
    }))


if __name__ == "__main__":
    main()
