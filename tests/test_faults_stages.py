"""Fault injection for every stage that writes, beyond the collect/train/analyze of test_faults.py.

kill -9 at seeded random moments, on the tiny Llama pair of conftest.py:

* ``crossdiff run`` killed in each stage of a recipe (data, collect, train, analyze, the
  causal answers, causal, report): the next run skips what was finished, resumes the rest,
  and the run ends with the files of an uninterrupted run;
* a streamed training run (``crossdiff train --stream``);
* ``crossdiff causal``, ``steer``, ``explain`` (a local model) and ``report`` (a first build
  and a rebuild over a finished report);
* one rank of a 2-rank torchrun training job (gloo, CPU): the job stops with one line, and
  the same command resumes to the weights of an uninterrupted 2-rank run.

Each fault is counted as held or failed (pytest -s prints the counts; docs/reliability.md
tabulates them) and all must hold.
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
from crossdiff.causal.progress import progress_path
from crossdiff.locks import lock_path
from crossdiff.recipe import load_recipe
from crossdiff.run.stages import plan

from test_faults import SUBPROCESS_ENV, Ledger, files_of, kill, metrics_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEED = 23
RECIPE = """
[run]
out = "{out}"
hardware = "cpu"

[data]
kind = "organism"
behaviour_conversations = 4
causal_per_behaviour = 1
causal_chitchat = 4

[collect]
base = "{base}"
chat = "{chat}"
layer = 1
max_len = 32
batch_size = 4
max_tokens = 500
dtype = "float32"
model_dtype = "float32"
device = "cpu"
shard_tokens = 200

[[collect.sources]]
name = "pretraining"
kind = "text"
path = "{{run}}/data/pretraining.jsonl"
column = "text"

[[collect.sources]]
name = "chat"
kind = "chat"
path = "{{run}}/data/chat.jsonl"
column = "messages"

[train]
d_sae = 64
k = 4
lr = 1e-3
warmup_steps = 4
steps = 150
batch_size = 32
threshold_start_step = 8
seed = 0
log_every = 10
checkpoint_every = 40
device = "cpu"

[train.data]
epochs = 8

[crosscoders.bt]
activation = "batchtopk"

[crosscoders.l1]
activation = "relu"

[stream]
buffer_tokens = 256
prefetch_batches = 1
analysis_tokens = 500

[analyze]
batch_size = 64
n_top = 5
per_bin = 1
device = "cpu"

[causal]
prompts = "{{run}}/data/causal_prompts.jsonl"
max_new_tokens = 8
batch_size = 2
pool_size = 10
random_seeds = 2
save_every_s = 0
device = "cpu"
"""
RESUME_FILES = ("autointerp_requests.sqlite",)  # explain's request cache: kept and filled as it goes
# Files a kill may leave that the next run must remove or take over.
LEFTOVER_MARKS = (".tmp", ".lock", ".new", ".old", ".partial", ".progress.json")


def tree(folder: Path) -> dict[str, bytes]:
    """files_of ``folder`` with the folder's own path written as RUN (results quote their inputs' paths)."""
    return {name: data.replace(str(folder).encode(), b"RUN") for name, data in files_of(folder).items()}


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS))


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "crossdiff.cli", *argv], env=SUBPROCESS_ENV,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_until(ready, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return ready()


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    assert main(argv) == 0, argv
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_pair_paths):
    """An uninterrupted run of the recipe, stage by stage (timed), and of the standalone commands."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (a module fixture runs before one_thread)
    root = tmp_path_factory.mktemp("stage-faults")
    base, chat = tiny_pair_paths
    recipe_file = root / "recipe.toml"
    recipe_file.write_text(RECIPE.format(out=root / "straight", base=base, chat=chat))
    out = root / "straight"
    seconds = {}
    for stage in plan(load_recipe(recipe_file), quiet=True):  # what run_recipe does, timing each stage
        start = time.perf_counter()
        stage.run()
        seconds[stage.name] = time.perf_counter() - start
    cc, analysis = out / "bt" / "crosscoder", out / "bt" / "analysis"
    commands = {
        "causal": ["causal", str(cc), str(analysis), "--conversations", str(out / "data" / "causal_conversations.jsonl"),
                   "--batch-size", "1", "--save-every", "0", "--pool-size", "10", "--random-seeds", "2", "--quiet"],
        "steer": ["steer", str(cc), str(analysis), "--latent", "1,2", "--latent", "3", "--prompt", "Hello! How are you?",
                  "--prompt", "Write a poem about the sea.", "--factor", "-1", "1", "--max-new-tokens", "6", "--quiet"],
        "explain": ["explain", "--local", str(chat), "--max-latents", "2", "--n-explain", "3", "--quiet"],
        "report": ["report", str(out)],
        "stream": ["train", "--stream", "--config", str(recipe_file), "--quiet", "--set", "steps=200", "--set", "batch_size=4",
                   "--set", "log_every=10", "--set", "checkpoint_every=40", "--set", "data.epochs=1"],
    }
    references = {"causal": root / "ref-causal", "steer": root / "ref-steer" / "steering.jsonl",
                  "explain": root / "ref-explain", "report": root / "ref-report", "stream": root / "ref-stream"}
    shutil.copytree(analysis, references["explain"])
    seconds["causal"] = timed([*commands["causal"], "--out", str(references["causal"])])
    seconds["steer"] = timed([*commands["steer"], "--out", str(references["steer"])])
    seconds["explain"] = timed([*commands["explain"][:1], str(references["explain"]), *commands["explain"][1:]])
    seconds["report"] = timed([*commands["report"], "-o", str(references["report"])])
    assert main([*commands["stream"], "--out", str(references["stream"])]) == 0
    torch.set_num_threads(threads)
    return {"root": root, "recipe": recipe_file, "out": out, "seconds": seconds, "commands": commands,
            "references": references}


# ----------------------------------------------------------------------------- crossdiff run
def owner(name: str, stages: list[str]) -> str:
    """The stage that writes file ``name`` (relative to the run folder)."""
    parts = name.split("/")
    if name == "data/causal_conversations.jsonl":
        return "causal:answers"
    if parts[0] in ("data", "report"):
        return parts[0]
    if parts[0] == "cache":
        return "collect"
    if len(parts) > 1 and parts[0] in {s.split(":")[-1] for s in stages}:  # NAME/analysis, NAME/.causal.progress.json, ...
        kind = next((kind for folder, kind in (("analysis", "analyze"), ("causal", "causal")) if folder in parts[1]), "train")
        return f"{kind}:{parts[0]}"
    return "?"


def in_progress(stage: str, out: Path, log: Path):
    """(a test that ``stage`` of the run in ``out`` has begun writing, the largest fraction of its
    uninterrupted time to wait after that): the kill then lands while the stage writes."""
    kind, _, name = stage.partition(":")
    path = {"data": out / "data",  # some 30 ms of work: killed as soon as it makes its folder
            "collect": out / "cache" / "shard-00000",  # the first of five shards sealed
            "train": out / name / "checkpoints",  # its first checkpoint saved (step 40 of 150)
            "analyze": lock_path(out / name / "analysis"),
            "causal": progress_path(out / name / "causal"),  # its first batch scored
            "report": out / ".report.new"}.get(kind if name != "answers" else "answers")  # its staging folder
    # Collect seals its first shard about a fifth of the way in, and a loaded machine can run this
    # collect twice as fast as the timed uninterrupted one: waiting more than 0.15 of that time
    # after the first shard sometimes kills after the stage has finished, which tests nothing.
    fraction = {"data": 0.0, "collect": 0.15, "train": 0.4, "causal": 0.3, "report": 0.3}.get(kind, 0.5)
    if path is None:  # the causal answers write their one file at the end
        return (lambda: f"[run] {stage}: running" in log.read_text()), fraction
    return path.exists, fraction


def test_run_killed_in_every_stage_resumes_to_the_same_files(straight, tmp_path):
    """One kill in each stage, in order: each rerun is the next kill's victim, the last one finishes."""
    rng = random.Random(SEED)
    ledger = Ledger()
    out = tmp_path / "run"
    argv = ["run", str(straight["recipe"]), "--out", str(out)]
    stages = plan(load_recipe(straight["recipe"], out=str(out)), quiet=True)
    names = [s.name for s in stages]
    done_before: list[str] = []
    kills = {}
    for i, stage in enumerate(stages):
        log = tmp_path / f"run-{i}.log"
        proc = spawn(argv, log)
        sign, fraction = in_progress(stage.name, out, log)
        started = wait_until(sign, proc)
        delay = rng.uniform(0.0, fraction) * straight["seconds"][stage.name]
        killed = kill(proc, delay) if started else False
        text = log.read_text()
        skipped = [n for n in names if f"[run] {n}: done, skipped" in text]
        kills[stage.name] = (delay, killed and not stage.done(), skipped == done_before)
        done_before = [s.name for s in stages if s.done()]
    assert main([*argv, "--quiet"]) == 0

    got, expected = tree(out), tree(straight["out"])
    differ = sorted(n for n in got.keys() | expected.keys() if got.get(n) != expected.get(n))
    for name in ("bt", "l1"):
        if metrics_of(out / name) != metrics_of(straight["out"] / name):
            differ.append(f"{name}/metrics.jsonl")
    left = leftovers(out) + [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    for name, (delay, mid, resumed) in kills.items():
        wrong = sorted({n for n in differ + left if owner(n, names) == name})
        ledger.check(f"kill -9 of `crossdiff run` {delay:.2f} s into {name}" + ("" if mid else " (it had finished)"),
                     mid and resumed and not wrong,
                     ("" if resumed else "the rerun did not skip exactly the finished stages; ")
                     + (f"differ or left over: {wrong}" if wrong else ""))
    strays = sorted({n for n in differ + left if owner(n, names) not in kills})
    ledger.check("no file of an unknown stage differs or is left over", not strays, str(strays))
    report = ledger.report()
    print("\n" + report)
    assert all(ok for _, ok, _ in ledger.rows), report


# ----------------------------------------------------------------------------- streamed training
def test_streamed_training_killed_resumes_to_the_same_run(straight, tmp_path, capsys):
    rng = random.Random(SEED + 1)
    ledger = Ledger()
    reference = straight["references"]["stream"]
    for i in range(2):
        delay = rng.uniform(0.0, 0.3)
        for attempt in range(3):  # one that finished before its kill (a busy machine) is killed sooner next time
            out = tmp_path / f"stream-{i}-{attempt}"
            argv = [*straight["commands"]["stream"], "--out", str(out)]
            proc = spawn(argv, tmp_path / f"{out.name}.log")
            # The models load for seconds, then 200 steps take about a second: killed in those.
            started = wait_until(lambda: (out / "checkpoints").exists(), proc)
            killed = kill(proc, delay) if started else False
            killed = killed and not (out / "crosscoder").exists()  # before the end of training
            if killed:
                break
            delay /= 3
        step = len(metrics_of(out)) * 10 if (out / "metrics.jsonl").exists() else 0
        capsys.readouterr()
        assert main(argv) == 0
        same = files_of(out) == files_of(reference) and metrics_of(out) == metrics_of(reference)
        ledger.check(f"kill -9 of a streamed training {delay:.2f} s after its first checkpoint (~step {step} of 200)"
                     + ("" if killed else " (it had finished)"), killed and same and not leftovers(out),
                     "" if same else "differs from the uninterrupted run")
    report = ledger.report()
    print("\n" + report)
    assert all(ok for _, ok, _ in ledger.rows), report


# ----------------------------------------------------------------------------- causal, steer, explain, report
def test_causal_steer_explain_and_report_killed_then_rerun(straight, tmp_path, capsys):
    rng = random.Random(SEED + 2)
    ledger = Ledger()
    commands, references, seconds = straight["commands"], straight["references"], straight["seconds"]

    def outputs(path: Path) -> dict[str, bytes] | None:
        """The files a reader would use (explain's request cache is its resume point, filled as it goes)."""
        if not path.exists():
            return None
        files = tree(path) if path.is_dir() else {path.name: path.read_bytes()}
        return {n: data for n, data in files.items() if not n.startswith(RESUME_FILES)}

    def case(fault: str, argv: list[str], out: Path, reference: Path, started, seconds_: float) -> None:
        before, want = outputs(out), outputs(reference)
        delay = rng.uniform(0.1, 0.9) * seconds_
        for _ in range(3):  # a command that finished before its kill (a busy machine) is killed sooner next time
            proc = spawn(argv, tmp_path / f"{out.name}.log")
            killed = kill(proc, delay) if wait_until(started, proc) else False
            if killed:
                break
            delay /= 3
        # Right after the kill a reader finds the previous version whole, the new one whole, or
        # none: never a mix (an empty folder is what the lock leaves of a first report or causal).
        whole = outputs(out) in (None, {}, before, want)
        capsys.readouterr()
        assert main(argv) == 0
        got = outputs(out)
        differ = sorted(n for n in got.keys() | want.keys() if got.get(n) != want.get(n))
        left = [p.name for p in out.parent.iterdir() if any(m in p.name for m in LEFTOVER_MARKS)]
        ledger.check(f"{fault} {delay:.2f} s after it started" + ("" if killed else " (it had finished)"),
                     killed and whole and not differ and not left,
                     f"differ {differ} left {left} whole-after-kill {whole}" if differ or left or not whole else "")

    out = tmp_path / "causal"
    case("kill -9 of causal", [*commands["causal"], "--out", str(out)], out, references["causal"],
         lambda: lock_path(out).exists(), seconds["causal"])

    out = tmp_path / "steer" / "steering.jsonl"
    out.parent.mkdir()
    # steer writes nothing before its one file: killed at a random moment of its whole run
    case("kill -9 of steer", [*commands["steer"], "--out", str(out)], out, references["steer"],
         lambda: True, seconds["steer"] + 3.0)

    out = tmp_path / "explain"
    shutil.copytree(straight["out"] / "bt" / "analysis", out)
    case("kill -9 of explain (a local model)", [*commands["explain"][:1], str(out), *commands["explain"][1:]], out,
         references["explain"], lambda: lock_path(out).exists(), seconds["explain"])

    for i, fault in enumerate(["kill -9 of report", "kill -9 of a report rebuilt over a finished one"]):
        out = tmp_path / f"report-{i}"
        if i:
            shutil.copytree(references["report"], out)
        case(fault, [*commands["report"], "-o", str(out)], out, references["report"],
             lambda out=out: lock_path(out).exists(), seconds["report"])

    report = ledger.report()
    print("\n" + report)
    assert all(ok for _, ok, _ in ledger.rows), report


# ----------------------------------------------------------------------------- torchrun
def torchrun(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "crossdiff.cli", *argv], env=SUBPROCESS_ENV, stdout=out, stderr=subprocess.STDOUT)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the process torchrun started for ``rank`` (from Linux's /proc, no dependency)."""
    pending = [launcher.pid]
    while pending:
        pid = pending.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in map(int, children.read_text().split()):
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                if f"RANK={rank}".encode() in environ:
                    return child
                pending.append(child)
    return None


def test_one_torchrun_rank_killed_stops_the_job_in_one_line_and_resumes(straight, tmp_path):
    rng = random.Random(SEED + 3)
    ledger = Ledger()
    cache = straight["out"] / "cache"
    train = lambda out: ["train", "--cache", str(cache), "--out", str(out), "--quiet",  # noqa: E731
                         "--set", "d_sae=64", "--set", "k=4", "--set", "batch_size=32", "--set", "steps=300",
                         "--set", "checkpoint_every=50", "--set", "log_every=10", "--set", "data.epochs=30",
                         "--set", "warmup_steps=4", "--set", "threshold_start_step=8"]
    reference = tmp_path / "ref"
    uninterrupted = torchrun(train(reference), tmp_path / "ref.log")  # meanwhile, the killed jobs
    for victim in (1, 0):
        out = tmp_path / f"rank-{victim}-killed"
        job = torchrun(train(out), tmp_path / f"{out.name}.log")
        started = wait_until(lambda: any((out / "checkpoints").glob("step-*")), job, timeout=240)
        time.sleep(rng.uniform(0.0, 1.0))
        pid = rank_pid(job, victim) if started and job.poll() is None else None
        if pid:
            os.kill(pid, signal.SIGKILL)
        try:
            code = job.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a rank left waiting forever: the fault did not hold
            job.kill()
            code = "hung"
        text = (tmp_path / f"{out.name}.log").read_text(errors="replace")
        errors = [line for line in text.splitlines() if "crossdiff: error:" in line]
        one_line = (len(errors) == 1 and f"rank {1 - victim} of 2" in errors[0] and "rerun the same command" in errors[0]
                    and f"[rank{1 - victim}]: Traceback" not in text)
        ledger.check(f"kill -9 of rank {victim} of 2 during torchrun training: the job stops with one line",
                     pid is not None and code not in (0, "hung") and one_line, errors[0][:220] if errors else text[-300:])
        rerun = torchrun(train(out), tmp_path / f"{out.name}-rerun.log")
        assert rerun.wait(timeout=300) == 0, (tmp_path / f"{out.name}-rerun.log").read_text()[-3000:]
        if uninterrupted.poll() is None:
            assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
        assert uninterrupted.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
        same = files_of(out) == files_of(reference) and metrics_of(out) == metrics_of(reference)
        ledger.check(f"the same torchrun command after rank {victim} was killed", same and not leftovers(out),
                     "" if same else "differs from the uninterrupted 2-rank run")
    report = ledger.report()
    print("\n" + report)
    assert all(ok for _, ok, _ in ledger.rows), report


def test_a_rank_stopped_by_torchrun_says_so_in_one_line(tmp_path):
    """torchrun stops the other ranks with SIGTERM; one busy outside a collective (writing a
    checkpoint, say) must still end with one line, not die silently or with a traceback."""
    script = ("import sys, time, types\n"
              "from crossdiff import cli\n"
              "busy = types.ModuleType('busy')\n"
              "busy.add_cli = lambda sub: sub.add_parser('busy').set_defaults(func=lambda args: print('ready', flush=True) or time.sleep(60))\n"
              "sys.modules['busy'] = busy\n"
              "cli.COMMANDS['busy'] = ('busy', 'a stage busy outside any collective')\n"
              "sys.exit(cli.main(['busy']))\n")
    env = {**SUBPROCESS_ENV, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == ("crossdiff: error: rank 1 of 2: stopped by torchrun (SIGTERM), which stops every rank when one "
                           "fails; rerun the same command to resume from the last checkpoint")
