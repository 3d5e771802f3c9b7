"""Fault injection: kill -9, flipped bytes and concurrent runs against collect, train and analyze.

Real subprocesses (``python -m crossdiff.cli``) are killed at random, seeded moments; the
same command then resumes in this process and must give the bytes of an uninterrupted
run. While each subprocess holds its output folder, a second run into that folder must be
refused; after the kill, the dead holder's lock must be taken over. Flipped bytes in cache
shards, checkpoints and crosscoders must stop a run with one line or fall back to the
previous checkpoint. Every fault is counted as held or failed, the counts are printed
(pytest -s) and all must hold. docs/reliability.md tabulates the faults.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossdiff.cli import main
from crossdiff.locks import lock_path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEED = 8
TRAIN = ["--set", "d_sae=32", "--set", "k=2", "--set", "batch_size=16", "--set", "warmup_steps=5",
         "--set", "log_every=5", "--set", "checkpoint_every=20", "--set", "data.epochs=12",
         "--set", "threshold_start_step=10", "--quiet"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Ledger:
    """Each fault and whether crossdiff held (did what docs/reliability.md promises)."""

    def __init__(self):
        self.rows: list[tuple[str, bool, str]] = []

    def check(self, fault: str, held: bool, detail: str = "") -> None:
        self.rows.append((fault, bool(held), detail))

    def run(self, fault: str, scenario) -> None:
        try:
            scenario()
        except Exception as err:  # a scenario that crashes is a fault that did not hold
            self.check(fault, False, f"{type(err).__name__}: {err}")

    def report(self) -> str:
        held = sum(ok for _, ok, _ in self.rows)
        lines = [f"faults: {len(self.rows)}, held {held}, failed {len(self.rows) - held}"]
        lines += [f"  {'held  ' if ok else 'FAILED'} {fault}" + (f" ({detail})" if detail else "") for fault, ok, detail in self.rows]
        return "\n".join(lines)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; metrics without their timings, training states without the global
    RNG state (a fresh process starts from another one, and training never draws from it)."""
    import io

    import torch

    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in ("checksums.json", "metrics.jsonl"):
            continue
        if p.name == "training_state.pt":
            state = torch.load(p, weights_only=True)
            state.pop("torch_rng")
            buffer = io.BytesIO()
            torch.save(state, buffer)
            files[str(p.relative_to(folder))] = buffer.getvalue()
        else:
            files[str(p.relative_to(folder))] = p.read_bytes()
    return files


def differing(a: Path, b: Path) -> str:
    fa, fb = files_of(a), files_of(b)
    names = sorted(n for n in fa.keys() | fb.keys() if fa.get(n) != fb.get(n))
    return f"differ: {names}" if names else ""


def metrics_of(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def flip(path: Path, rng: random.Random, start: int = 0) -> int:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(start, len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


def spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crossdiff.cli", *argv], env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.005)
    return path.exists()


def kill(proc: subprocess.Popen, after: float) -> bool:
    """SIGKILL ``proc`` after ``after`` seconds; False if it had finished by then."""
    deadline = time.monotonic() + after
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return not finished


def refused_while_held(capsys, argv: list[str], folder: Path) -> tuple[bool, str]:
    """Run ``argv`` here while a subprocess holds ``folder``: it must be refused with one line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code == 2 and err.startswith("crossdiff: error:") and "is in use by crossdiff" in err and "\n" not in err, err


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_pair_paths):
    """Uninterrupted collect, train and analyze: the bytes every faulty run must end with."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (a module fixture runs before one_thread)
    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog model chat user answer question paris rome sea".split()
    (root / "web.txt").write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) + "\n"
                                          for _ in range(80)))
    collect_args = ["collect", "--base", str(tiny_pair_paths[0]), "--chat", str(tiny_pair_paths[1]), "--layer", "1",
                    "--source", f"web:text:{root / 'web.txt'}", "--max-len", "16", "--batch-size", "2",
                    "--shard-tokens", "64", "--max-tokens", "400", "--model-dtype", "float32", "--device", "cpu",
                    "--quiet"]
    assert main([*collect_args, "--out", str(root / "cache")]) == 0
    assert main(["train", "--cache", str(root / "cache"), "--out", str(root / "run"), *TRAIN]) == 0
    analyze_args = [str(root / "run" / "crosscoder"), str(root / "cache"), "--quiet", "--batch-size", "16"]
    assert main(["analyze", *analyze_args, "--out", str(root / "analysis")]) == 0
    torch.set_num_threads(threads)
    return {"root": root, "collect": collect_args, "analyze": analyze_args}


def test_faults_all_held(straight, tmp_path, capsys):
    rng = random.Random(SEED)
    ledger = Ledger()
    root = straight["root"]
    cache, run, analysis = root / "cache", root / "run", root / "analysis"

    # -- kill -9 during collect, then the same command again
    def collect_killed():
        out = tmp_path / "cache-killed"
        proc = spawn([*straight["collect"], "--out", str(out)])
        if wait_for(lock_path(out), proc):
            ok, err = refused_while_held(capsys, [*straight["collect"], "--out", str(out)], out)
            ledger.check("concurrent collect into a held cache folder", ok, err[-120:])
        delay = rng.uniform(0.5, 2.5)
        killed = kill(proc, delay)
        capsys.readouterr()
        assert main([*straight["collect"], "--out", str(out)]) == 0
        resumed_err = capsys.readouterr().err
        ledger.check(f"kill -9 of collect {delay:.2f} s after it locked its folder"
                     + ("" if killed else " (it had finished)"),
                     files_of(out) == files_of(cache) and not list(out.glob("*.tmp")),
                     "stale lock taken over" if "taking over the stale lock" in resumed_err else "")

    ledger.run("kill -9 of collect", collect_killed)

    # -- kill -9 during train (twice), then the same command again
    def train_killed(i: int):
        out = tmp_path / f"run-killed-{i}"
        argv = ["train", "--cache", str(cache), "--out", str(out), *TRAIN]
        proc = spawn(argv)
        if wait_for(out / "metrics.jsonl", proc) and proc.poll() is None:
            ok, err = refused_while_held(capsys, argv, out)
            ledger.check("concurrent train into a held run folder", ok, err[-120:])
        delay = rng.uniform(0.0, 1.5)
        killed = kill(proc, delay)
        step = len(metrics_of(out)) * 5 if (out / "metrics.jsonl").exists() else 0
        capsys.readouterr()
        assert main(argv) == 0
        ledger.check(f"kill -9 of train {delay:.2f} s after its first metrics line (~step {step})"
                     + ("" if killed else " (it had finished)"),
                     files_of(out) == files_of(run) and metrics_of(out) == metrics_of(run), differing(out, run))

    for i in range(2):
        ledger.run(f"kill -9 of train #{i}", lambda: train_killed(i))

    # -- kill -9 during analyze: a first analysis, and a re-analysis over a finished one
    def analyze_killed(i: int):
        out = tmp_path / f"analysis-killed-{i}"
        if i == 1:
            shutil.copytree(analysis, out)
        argv = ["analyze", *straight["analyze"], "--out", str(out)]
        proc = spawn(argv)
        if wait_for(lock_path(out), proc) and proc.poll() is None:
            ok, err = refused_while_held(capsys, argv, out)
            ledger.check("concurrent analyze into a held folder", ok, err[-120:])
        delay = rng.uniform(0.0, 0.6)
        killed = kill(proc, delay)
        # Right after the kill: the previous analysis whole, or none; never a mix.
        whole = not out.exists() or not any(out.iterdir()) or files_of(out) == files_of(analysis)
        capsys.readouterr()
        assert main(argv) == 0
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        ledger.check(f"kill -9 of {'a re-' if i else ''}analysis {delay:.2f} s after it locked its folder"
                     + ("" if killed else " (it had finished)"),
                     whole and files_of(out) == files_of(analysis) and not leftovers, f"leftovers {leftovers}" if leftovers else "")

    for i in range(2):
        ledger.run(f"kill -9 of analyze #{i}", lambda: analyze_killed(i))

    # -- flipped bytes in cache shards: train and analyze stop with one line naming the shard
    def shard_flipped(i: int):
        damaged = tmp_path / f"cache-flipped-{i}"
        shutil.copytree(cache, damaged)
        shard = rng.choice(sorted(damaged.glob("shard-*/*.npy")))
        offset = flip(shard, rng)
        name = f"{shard.parent.name}/{shard.name}"
        for argv in (["train", "--cache", str(damaged), "--out", str(tmp_path / f"run-flipped-{i}"), *TRAIN],
                     ["analyze", *straight["analyze"][:1], str(damaged), "--quiet", "--out", str(tmp_path / f"a-flipped-{i}")]):
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err.strip()
            ledger.check(f"flipped bit at byte {offset} of {name}, then {argv[0]}",
                         code == 2 and name in err and "\n" not in err, err[-100:])

    for i in range(3):
        ledger.run(f"flipped shard byte #{i}", lambda: shard_flipped(i))

    # -- flipped bytes in the newest checkpoint: resume falls back to the previous one
    def checkpoint_flipped(i: int):
        out = tmp_path / f"run-ckpt-{i}"
        shutil.copytree(run, out)
        shutil.rmtree(out / "crosscoder")
        newest = sorted((out / "checkpoints").glob("step-*"))[-1]
        target = rng.choice(sorted(p for p in newest.iterdir() if p.name != "checksums.json"))
        offset = flip(target, rng)
        metrics = (out / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text("\n".join(metrics[:-3]) + "\n")  # as if killed before the last logs
        capsys.readouterr()
        code = main(["train", "--cache", str(cache), "--out", str(out), *TRAIN])
        err = capsys.readouterr().err
        ledger.check(f"flipped bit at byte {offset} of {newest.name}/{target.name}, then resume",
                     code == 0 and "is damaged" in err and newest.name in err and "resuming from" in err
                     and files_of(out / "crosscoder") == files_of(run / "crosscoder") and metrics_of(out) == metrics_of(run),
                     err.strip().splitlines()[-1][-120:] if err.strip() else "")

    for i in range(2):
        ledger.run(f"flipped checkpoint byte #{i}", lambda: checkpoint_flipped(i))

    # -- flipped bytes in a saved crosscoder: analyze refuses it
    def crosscoder_flipped(i: int):
        damaged = tmp_path / f"crosscoder-flipped-{i}"
        shutil.copytree(run / "crosscoder", damaged)
        offset = flip(damaged / "model.safetensors", rng)
        capsys.readouterr()
        code = main(["analyze", str(damaged), str(cache), "--quiet", "--out", str(tmp_path / f"a-cc-{i}")])
        err = capsys.readouterr().err.strip()
        ledger.check(f"flipped bit at byte {offset} of crosscoder/model.safetensors, then analyze",
                     code == 2 and "model.safetensors" in err and "\n" not in err, err[-100:])

    for i in range(2):
        ledger.run(f"flipped crosscoder byte #{i}", lambda: crosscoder_flipped(i))

    report = ledger.report()
    print("\n" + report)
    assert all(ok for _, ok, _ in ledger.rows), report
