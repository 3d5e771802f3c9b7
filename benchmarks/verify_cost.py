"""What checking shard checksums while training costs: training steps fed by the loader,
with sha256 verification on first read (the default) against without (``checksums=False``).

    python benchmarks/verify_cost.py [--d-in 256] [--d-sae 16384] [--k 32] [--batch 4096] [--tokens 65536] [--reps 3]

Each repetition opens the cache afresh (so every shard is hashed again, as in a new
process) and trains one epoch; the two variants alternate so that a busy machine slows
both alike. Reported: median seconds per step of each, the time per step the loop spent blocked on checksums, and the overhead in percent.
Also printed: the machine's sha256 rate on the cache files, and what that rate means for
a step of the given size if the hash were not overlapped with training (the worst case).
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

from crossdiff.cache.store import CacheWriter, PairedCache  # noqa: E402
from crossdiff.files import sha256_file  # noqa: E402
from crossdiff.train.loader import ShuffledPairLoader  # noqa: E402
from crossdiff.train.trainer import TrainConfig, Trainer  # noqa: E402


def make_cache(path: Path, tokens: int, d_in: int, shard_tokens: int) -> Path:
    writer = CacheWriter(path, models=("b", "c"), layer=0, d_model=d_in, sources=["web"], shard_tokens=shard_tokens)
    g = torch.Generator().manual_seed(0)
    for start in range(0, tokens, 1024):
        if writer.room < 1024:
            writer.seal()
        writer.append(torch.randn(1024, 2, d_in, generator=g), [5] * 1024, [start] * 1024, range(1024), 0, [False] * 1024)
    writer.seal()
    writer.finish()
    return path


def epoch_seconds_per_step(cache_path: Path, args, checksums: bool, out: Path) -> tuple[float, float]:
    """(seconds per step, seconds per step the loop spent blocked on checksums)."""
    config = TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch, warmup_steps=0, device="cpu",
                         threshold_start_step=10**9)
    trainer = Trainer(config, args.d_in, out, quiet=True)
    start = time.perf_counter()
    cache = PairedCache(cache_path, checksums=checksums)
    blocked = [0.0]
    ensure = cache._ensure_verified

    def timed_ensure(*a):  # the time the training loop waits for a hash (its own or the background one)
        t = time.perf_counter()
        ensure(*a)
        blocked[0] += time.perf_counter() - t

    cache._ensure_verified = timed_ensure
    loader = ShuffledPairLoader(cache, args.batch, seed=0, window_shards=2, drop_last=True)
    steps = 0
    for batch in loader:
        trainer._train_step(trainer._prepare(batch))
        steps += 1
    return (time.perf_counter() - start) / steps, blocked[0] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    cache_path = make_cache(tmp / "cache", args.tokens, args.d_in, args.shard_tokens)
    files = sorted(cache_path.glob("shard-*/*.npy"))
    size = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    for f in files:
        sha256_file(f)
    hash_rate = size / (time.perf_counter() - start)

    with_check, without, waited = [], [], []
    epoch_seconds_per_step(cache_path, args, False, tmp / "warm")  # warm-up: page cache, allocations
    for rep in range(args.reps):
        without.append(epoch_seconds_per_step(cache_path, args, False, tmp / f"off-{rep}")[0])
        step, wait = epoch_seconds_per_step(cache_path, args, True, tmp / f"on-{rep}")
        with_check.append(step)
        waited.append(wait)
    on, off, wait = statistics.median(with_check), statistics.median(without), statistics.median(waited)
    bytes_per_step = size / args.tokens * args.batch
    print(f"cache: {args.tokens:,} tokens, d_in {args.d_in}, {size / 2**20:.0f} MiB in {len(files)} files; "
          f"sha256 {hash_rate / 2**20:,.0f} MiB/s")
    print(f"step (batch {args.batch}, d_sae {args.d_sae}, k {args.k}, {args.threads} threads): "
          f"without checksums {off * 1e3:.1f} ms, with {on * 1e3:.1f} ms")
    print(f"blocked on checksums: {wait * 1e3:.2f} ms per step = {100 * wait / off:.2f}% of a step")
    print(f"overhead (medians of {args.reps} epochs each): {100 * (on - off) / off:+.1f}% of a step "
          f"(hashing a step's {bytes_per_step / 2**20:.1f} MiB un-overlapped would be {100 * bytes_per_step / hash_rate / off:.1f}%)")


if __name__ == "__main__":
    main()
