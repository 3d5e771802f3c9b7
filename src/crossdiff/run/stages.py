"""`crossdiff run RECIPE.toml`: every stage of a recipe, skipping the finished ones.

A run is a list of :class:`Stage`\\ s, each a name, a ``done`` check on the run folder
and a ``run`` function (plus an ``estimate`` for ``--dry-run``). The runner walks the
list in order: a stage whose output is complete is skipped, any other is run, and an
interrupted stage resumes because every stage function does (collect from its last
sealed shard, training from its last checkpoint; analysis writes summary.json last).

Stages, for a recipe with crosscoders ``batchtopk`` and ``l1``::

    data              RUN/data/        (only with a [data] table: the organism's texts)
    behaviour         RUN/behaviour_diff.json(l)  (with a [behaviour] table: both models' answers, KL per prompt)
    collect           RUN/cache/       (with train_from = "stream": a small cache for analysis only)
    train:batchtopk   RUN/batchtopk/crosscoder/   from the cache, or from a stream of both models
    train:l1          RUN/l1/crosscoder/
    analyze:batchtopk RUN/batchtopk/analysis/
    analyze:l1        RUN/l1/analysis/
    findings:batchtopk RUN/batchtopk/findings.json  (with [behaviour]: latents ranked by evidence, grouped into concepts)
    findings:l1       RUN/l1/findings.json
    causal:answers    RUN/data/causal_conversations.jsonl  (with [causal] prompts: the chat model's answers)
    causal:batchtopk  RUN/batchtopk/causal/    (with a [causal] table: the KL experiment)
    causal:l1         RUN/l1/causal/
    steer:batchtopk   RUN/batchtopk/causal/planted/  (with a [steer] table: each planted behaviour steered into the base)
    steer:l1          RUN/l1/causal/planted/
    report            RUN/report/      (both crosscoders side by side; rebuilt when an input is newer)

Adding a stage is one more ``Stage(...)`` in :func:`plan` (see docs/run.md).

Stages print progress only (``[run]`` lines, progress bars; ``--quiet`` hides both). What
they found is said once, at the end, by the end screen (crossdiff.analysis.screen), which
`crossdiff inspect RUN --summary` reprints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from crossdiff.causal.planted import steer_planted
from crossdiff.config import save_json, to_dict
from crossdiff.errors import CrossdiffError
from crossdiff.organism.data import write_demo_data
from crossdiff.recipe import Recipe, load_recipe
from crossdiff.run import estimate as est


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    """True when the stage's output is complete (then the runner skips it)."""
    run: Callable[[], Any]
    """Produce (or finish producing) the output; must resume an interrupted attempt."""
    estimate: Callable[[], est.Cost] | None = None
    """Disk, memory and time for --dry-run; None if negligible."""
    notes: list[str] = field(default_factory=list)


def plan(recipe: Recipe, *, quiet: bool = False, hardware: str | None = None) -> list[Stage]:
    """The stages of ``recipe`` in the order they run (``hardware`` is for their estimates)."""
    out = recipe.out
    costs = _Costs(recipe, hardware)
    stages = []
    if recipe.data is not None:
        stages.append(Stage("data", lambda: _data_done(recipe), lambda: _write_data(recipe)))
    if recipe.behaviour is not None:
        stages.append(Stage("behaviour", (out / "behaviour_diff.json").is_file, lambda: _behaviour(recipe)))
    collect = _collect_config(recipe)
    stages.append(Stage("collect", lambda: _cache_complete(collect), lambda: _collect(collect, quiet), costs.collect))
    for name, config in recipe.crosscoders.items():
        stages.append(Stage(
            f"train:{name}",
            lambda name=name: (out / name / "crosscoder" / "model.safetensors").is_file(),
            lambda name=name, config=config: _train(recipe, name, config, quiet),
            lambda config=config: costs.train(config),
        ))
    for name in recipe.crosscoders:
        stages.append(Stage(
            f"analyze:{name}",
            lambda name=name: (out / name / "analysis" / "summary.json").is_file(),  # written last
            lambda name=name: _analyze(recipe, name, quiet),
            costs.analyze,
        ))
    if recipe.behaviour is not None:
        stages += _findings_stages(recipe)
    if recipe.causal is not None or recipe.steer is not None:
        stages += _causal_stages(recipe)
    stages.append(Stage("report", lambda: _report_current(out), lambda: _report(out, quiet)))
    return stages


def run_recipe(recipe: Recipe, *, quiet: bool = False, only: list[str] | None = None) -> dict[str, str]:
    """Run every unfinished stage (or those named in ``only``); returns {stage: "ran" | "skipped"}."""
    stages = plan(recipe, quiet=quiet)
    _check_only(stages, only)
    outcome = {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        if stage.done():
            _say(quiet, f"[run] {stage.name}: done, skipped")
            outcome[stage.name] = "skipped"
            continue
        _say(quiet, f"[run] {stage.name}: running")
        start = time.perf_counter()
        stage.run()
        _say(quiet, f"[run] {stage.name}: finished in {time.perf_counter() - start:,.1f} s")
        outcome[stage.name] = "ran"
    return outcome


def dry_run(recipe: Recipe, hardware: str | None = None) -> str:
    """The plan as text: each stage's status, disk, memory and time, and the assumptions."""
    costs = _Costs(recipe, hardware)
    stages = plan(recipe, quiet=True, hardware=hardware)
    lines = [f"plan for {recipe.source} -> {recipe.out} on {costs.hardware}"
             f" ({'streaming: no activation cache for training' if recipe.streaming else 'training from an activation cache'})",
             f"  {'stage':22s} {'status':8s} {'disk':>11s} {'memory/device':>14s} {'host RAM':>10s} {'time':>10s}"]
    total = est.Cost()
    for stage in stages:
        cost = stage.estimate() if stage.estimate else est.Cost()
        status = "done" if stage.done() else "to run"
        if stage.estimate is None:  # a stage with no estimate of its own: not counted
            lines.append(f"  {stage.name:22s} {status:8s} {'-':>11s} {'-':>14s} {'-':>10s} {'-':>10s}")
        else:
            lines.append(f"  {stage.name:22s} {status:8s} {est.human_bytes(cost.disk):>11s} {est.human_bytes(cost.memory):>14s} "
                         f"{est.human_bytes(cost.host_memory):>10s} {est.human_seconds(cost.seconds):>10s}")
        total.disk += cost.disk
        total.seconds += cost.seconds if status == "to run" else 0
        total.memory = max(total.memory, cost.memory)
    lines.append(f"  {'total (what is left)':22s} {'':8s} {est.human_bytes(total.disk):>11s} {est.human_bytes(total.memory):>14s} "
                 f"{'':>10s} {est.human_seconds(total.seconds):>10s}")
    if total.memory > costs.hardware.memory_gib * 2**30:
        lines.append(f"  WARNING: the largest stage needs {est.human_bytes(total.memory)} per device; "
                     f"{costs.hardware.kind} has {costs.hardware.memory_gib:g} GiB")
    lines.append("assumptions:")
    if any(stage.estimate is None for stage in stages):
        lines.append("  - stages shown with '-' (data, behaviour, findings, causal, steer, report) are not estimated; "
                     "they are small next to the rest")
    lines.extend(f"  - {note}" for note in costs.assumptions())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stages


def _behaviour(recipe: Recipe) -> None:
    from crossdiff.causal.behaviour import run_behaviour  # deferred: imports torch; `crossdiff run --help` stays light

    collect = recipe.collect
    # quiet: the diff's screen is part of the run's end screen (crossdiff.analysis.screen), not printed twice
    run_behaviour(recipe.behaviour, recipe.out, base=collect.base, chat=collect.chat, sources=collect.sources, quiet=True)


def _findings_stages(recipe: Recipe) -> list[Stage]:
    """Per crosscoder, RUN/NAME/findings.json: latents ranked by evidence and grouped into concepts
    (crossdiff.analysis.concepts); one model pair serves every crosscoder."""
    out, loaded = recipe.out, {}

    def run(name: str) -> None:
        # deferred: these import torch; `crossdiff run --help` stays light
        from crossdiff.analysis.concepts import find_concepts, write_findings
        from crossdiff.analysis.table import read_table
        from crossdiff.causal.behaviour import read_behaviour
        from crossdiff.crosscoder import CrossCoder

        if "pair" not in loaded:
            from crossdiff.models import load_model_pair  # deferred: imports torch, as above

            settings = recipe.behaviour
            loaded["pair"] = load_model_pair(recipe.collect.base, recipe.collect.chat, dtype=settings.model_dtype, device=settings.device)
        crosscoder = CrossCoder.from_pretrained(out / name / "crosscoder").to(loaded["pair"].device)
        table = read_table(out / name / "analysis")
        findings = find_concepts(crosscoder, table, pair=loaded["pair"], layer=recipe.collect.layer, behaviour=read_behaviour(out),
                                 examples=out / name / "analysis" / "examples.sqlite")
        write_findings(findings, out / name)  # shown by the end screen

    return [Stage(f"findings:{name}", lambda name=name: _newer(out / name / "findings.json", out / name / "analysis" / "summary.json"),
                  lambda name=name: run(name)) for name in recipe.crosscoders]


def _causal_stages(recipe: Recipe) -> list[Stage]:
    """The KL experiment and the planted-behaviour steering on every crosscoder; prompts are
    answered once and shared by all, and one loaded model pair serves every stage."""
    out, options = recipe.out, dict(recipe.causal or {})
    loaded: dict[str, Any] = {}

    def pair():
        if "pair" not in loaded:
            from crossdiff.models import load_model_pair  # deferred: imports torch; `crossdiff run --help` stays light

            loaded["pair"] = load_model_pair(recipe.collect.base, recipe.collect.chat,
                                             dtype=options.get("model_dtype", "float32"), device=options.get("device", "cpu"))
        return loaded["pair"]

    stages = []
    names = list(recipe.crosscoders)
    if recipe.causal is not None and "prompts" in options:
        answers = out / "data" / "causal_conversations.jsonl"
        asked = dict(options)
        stages.append(Stage("causal:answers", answers.is_file, lambda: _answer_prompts(asked, answers, pair())))
        options.pop("prompts")
        options.pop("prompt_column", None)
        options["conversations"] = str(answers)
    for i, name in enumerate(names if recipe.causal is not None else []):
        stages.append(Stage(
            f"causal:{name}",
            lambda name=name: _newer(out / name / "causal" / "summary.json", out / name / "analysis" / "summary.json"),
            lambda name=name, i=i: _causal(out, name, names[:i], options, pair()),
        ))
    steered = [] if recipe.steer is None else [n for n in names if recipe.steer.crosscoders is None or n in recipe.steer.crosscoders]
    for name in steered:
        stages.append(Stage(
            f"steer:{name}",
            lambda name=name: _newer(out / name / "causal" / "planted" / "summary.json", out / name / "analysis" / "summary.json"),
            lambda name=name: _steer_planted(out, name, recipe.steer, pair()),
        ))
    return stages


def _newer(path: Path, than: Path) -> bool:
    """``path`` exists and was written after ``than`` (summary.json files are written last, so
    a causal result older than its analysis belongs to an analysis that was since redone)."""
    return path.is_file() and (not than.is_file() or path.stat().st_mtime_ns > than.stat().st_mtime_ns)


def _answer_prompts(options: dict[str, Any], path: Path, pair: Any) -> None:
    # deferred: imports torch; `crossdiff run --help` stays light
    from crossdiff.causal.conversations import answer_prompts, load_prompts, write_conversations

    prompts = load_prompts(options["prompts"], column=options.get("prompt_column", "prompt"), limit=options.get("limit"))
    answered = answer_prompts(pair.chat, pair.tokenizer, prompts, max_new_tokens=options.get("max_new_tokens", 64),
                              batch_size=max(options.get("batch_size", 8), 16))
    write_conversations(path, answered)  # atomic: the stage is done once every answer is on disk


def _causal(out: Path, name: str, earlier: list[str], options: dict[str, Any], pair: Any) -> None:
    from crossdiff.causal.experiment import CausalConfig, run_causal  # deferred: imports torch; `crossdiff run --help` stays light

    config = CausalConfig(crosscoder=str(out / name / "crosscoder"), analysis_dir=str(out / name / "analysis"),
                          out=str(out / name / "causal"), compare=[str(out / other / "causal") for other in earlier],
                          **options)
    run_causal(config, pair=pair, quiet=True)  # its headline is on the end screen; the table: crossdiff causal prints it


def _steer_planted(out: Path, name: str, config: Any, pair: Any) -> None:
    steer_planted(out / name / "crosscoder", out / name / "analysis", out / name / "causal" / "planted", config, pair)  # on the end screen


def _report_current(out: Path) -> bool:
    """The report exists and is newer than every analysis and causal output it shows."""
    index = out / "report" / "index.html"
    inputs = [*out.glob("*/analysis/summary.json"), *out.glob("*/causal/*"), *out.glob("behaviour_diff.json"),
              *out.glob("*/findings.json")]
    return index.is_file() and all(path.stat().st_mtime < index.stat().st_mtime for path in inputs)


def _report(out: Path, quiet: bool) -> None:
    from crossdiff.report import build_report  # deferred: imports torch and matplotlib; `crossdiff run --help` stays light

    build_report(out, out / "report", say=lambda line: _say(quiet, line))  # the end screen names the index


def _collect_config(recipe: Recipe):
    """The recipe's collect; when streaming, only ``analysis_tokens`` per source (the analysis cache)."""
    collect = recipe.collect
    if not recipe.streaming:
        return collect
    cap = recipe.stream.analysis_tokens
    if cap is None:
        raise CrossdiffError(f"{recipe.source}: streaming runs still analyse on a small cache; set [stream] analysis_tokens")
    budget = collect.max_tokens
    per_source = {s.name: min(cap, budget.get(s.name, cap) if isinstance(budget, dict) else (budget or cap)) for s in collect.sources}
    return replace(collect, max_tokens=per_source)


def _cache_complete(collect) -> bool:
    from crossdiff.cache.store import MANIFEST  # deferred: imports torch; `crossdiff run --help` stays light

    manifest = Path(collect.out) / MANIFEST
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def _collect(collect, quiet: bool) -> None:
    # deferred: these import torch; `crossdiff run --help` stays light
    from crossdiff.collect.collector import collect as run_collect
    from crossdiff.train.stream import with_rank_from_environment

    summary = run_collect(with_rank_from_environment(collect), quiet=quiet)  # under torchrun: this rank's part
    _say(quiet, str(summary))


def _train(recipe: Recipe, name: str, config, quiet: bool) -> None:
    out = recipe.out / name
    if recipe.streaming:
        from crossdiff.train.stream import train_streaming  # deferred: imports torch; `crossdiff run --help` stays light

        train_streaming(recipe.collect, recipe.stream, config, out, quiet=quiet)  # under torchrun: each rank its texts
        return
    # deferred: these import torch; `crossdiff run --help` stays light
    from crossdiff.cache.store import PairedCache
    from crossdiff.train.loader import loader_from_config
    from crossdiff.train.trainer import Trainer

    cache = PairedCache(recipe.collect.out)
    if config.data.epochs is None and config.steps is None:
        raise CrossdiffError(f"{recipe.source}: crosscoder {name}: an endless loader (data.epochs unset) needs 'steps'")
    loader = loader_from_config(cache, config)
    trainer = Trainer(config, cache.d_model, out, model_names=list(cache.model_names), layer=cache.layer,
                      input_scale=loader.normalization, token_filter=loader.token_filter, quiet=quiet)
    if not quiet:
        print(f"train {name}: {loader.left_out.line()} per pass", file=sys.stderr)
    trainer.fit(loader)


def _analyze(recipe: Recipe, name: str, quiet: bool) -> None:
    # deferred: these import torch; `crossdiff run --help` stays light
    from crossdiff.analysis.pipeline import analyze, load_tokenizer
    from crossdiff.cache.store import PairedCache
    from crossdiff.crosscoder import CrossCoder

    cache = PairedCache(recipe.collect.out)
    crosscoder = CrossCoder.from_pretrained(recipe.out / name / "crosscoder")
    tokenizer = load_tokenizer(cache.model_names[-1]) if recipe.analyze.examples else None
    analyze(crosscoder, cache, recipe.out / name / "analysis", recipe.analyze, tokenizer=tokenizer, progress=not quiet)


def _data_done(recipe: Recipe) -> bool:
    stamp = recipe.out / "data" / "settings.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == to_dict(recipe.data)


def _write_data(recipe: Recipe) -> None:
    folder = recipe.out / "data"
    if recipe.data.kind == "smollm2-lora":
        from crossdiff.organism.smollm2.data import write_data  # deferred: imports torch; `crossdiff run --help` stays light

        write_data(folder, recipe.data, recipe.collect.chat)
    else:
        write_demo_data(folder, recipe.data)
    save_json(recipe.data, folder / "settings.json")  # last: the stage's completion mark


# ----------------------------------------------------------------------------- estimates


class _Costs:
    """Per-stage estimates for one recipe on one hardware (see crossdiff.run.estimate)."""

    def __init__(self, recipe: Recipe, hardware: str | None = None):
        self.recipe = recipe
        self.hardware = est.Hardware.parse(hardware or recipe.run.hardware)
        self._shape: est.ModelShape | None = None
        self._chat_shape: est.ModelShape | None = None

    @property
    def shape(self) -> est.ModelShape:
        if self._shape is None:
            self._shape = est.model_shape(self.recipe.collect.base, self.recipe.models)
            self._chat_shape = est.model_shape(self.recipe.collect.chat, self.recipe.models)
        return self._shape

    def tokens(self, collect=None) -> int:
        collect = collect or self.recipe.collect
        budget = collect.max_tokens
        if budget is None:
            raise CrossdiffError(f"{self.recipe.source}: set [collect] max_tokens for an estimate (it bounds every stage)")
        if isinstance(budget, dict):
            missing = [s.name for s in collect.sources if s.name not in budget]
            if missing:
                raise CrossdiffError(f"{self.recipe.source}: [collect] max_tokens has no budget for source {missing[0]!r}")
            return sum(budget.values())
        return budget * len(collect.sources)

    def _forward_seconds(self, tokens: int) -> float:
        collect = self.recipe.collect
        flops = tokens * est.forward_flops_per_token(self.shape, collect.layer, collect.max_len / 2)
        return self.hardware.seconds(flops, "forward")

    def _model_memory(self) -> float:
        c = self.recipe.collect
        return est.model_memory(self.shape, c.model_dtype, c.batch_size, c.max_len)

    def collect(self) -> est.Cost:
        collect = _collect_config(self.recipe)
        tokens = self.tokens(collect)
        disk = tokens * (2 * self.shape.d_model * est.BYTES[collect.dtype] + est.TOKEN_RECORD_BYTES)
        seconds = max(self._forward_seconds(tokens), disk / est.DISK_BYTES_PER_S["write"])
        return est.Cost(disk=disk, memory=self._model_memory(), seconds=seconds)

    def _trained_tokens(self, config) -> int:
        tokens = self.tokens()
        if config.steps is not None:
            return config.steps * config.batch_size
        return tokens * (config.data.epochs or 1)

    def train(self, config) -> est.Cost:
        d = self.shape.d_model
        d_sae = config.d_sae or config.expansion_factor * d
        tokens = self._trained_tokens(config)
        steps = est.ceil_div(tokens, config.batch_size)
        seconds = self.hardware.seconds(steps * est.training_step_flops(d, d_sae, config.batch_size), "crosscoder", devices=1)
        if not self.recipe.streaming:  # reading the cache may be slower than the steps
            read = tokens * 2 * d * est.BYTES[self.recipe.collect.dtype] / est.DISK_BYTES_PER_S["read"]
            seconds = max(seconds, read)
        memory = est.training_memory(d, d_sae, config.batch_size)
        checkpoints = (config.keep_checkpoints + 1) * est.crosscoder_params(d, d_sae) * 4 * 3  # weights + Adam moments
        cost = est.Cost(disk=checkpoints, memory=memory, seconds=seconds)
        if self.recipe.streaming:
            buffer = self.recipe.stream.buffer_tokens * 2 * d * est.BYTES[self.recipe.collect.dtype]
            cost.memory += self._model_memory()
            cost.host_memory = buffer
            cost.disk += (config.keep_checkpoints + 1) * buffer  # the buffer is saved with each checkpoint
            cost.seconds += self._forward_seconds(min(tokens, self.tokens()))
        return cost

    def analyze(self) -> est.Cost:
        d = self.shape.d_model
        tokens = self.tokens(_collect_config(self.recipe))
        config = next(iter(self.recipe.crosscoders.values()))
        d_sae = config.d_sae or config.expansion_factor * d
        flops = 3 * tokens * 2 * 2 * (2 * d) * d_sae  # three passes of encode + decode
        examples = d_sae * (self.recipe.analyze.n_top + 10 * self.recipe.analyze.per_bin) * 60 * 8
        memory = 4 * (est.crosscoder_params(d, d_sae) + 4 * self.recipe.analyze.batch_size * d_sae)
        read = 3 * tokens * 2 * d * est.BYTES[self.recipe.collect.dtype] / est.DISK_BYTES_PER_S["read"]
        seconds = max(self.hardware.seconds(flops, "crosscoder", devices=1), read)
        return est.Cost(disk=examples, memory=memory, seconds=seconds)

    def assumptions(self) -> list[str]:
        shape = self.shape
        notes = [
            f"model shapes from {shape.source}: d_model {shape.d_model}, {shape.n_layers} blocks, "
            f"{est.human_count(shape.params)} parameters (base {self.recipe.collect.base}, chat {self.recipe.collect.chat}, "
            f"chat shape from {self._chat_shape.source})",
            f"{self.hardware}: {self.hardware.tflops:g} peak TFLOP/s and {self.hardware.memory_gib:g} GiB per device; "
            f"model forwards sustain {est.UTILISATION['forward']:.0%} of peak, crosscoder steps "
            f"{est.UTILISATION['crosscoder']:.0%}; collecting splits evenly over the {self.hardware.count} device(s), "
            "training and analysis use one (see docs/scaling.md for data-parallel training)",
            f"disks write {est.DISK_BYTES_PER_S['write'] / 1e6:,.0f} MB/s and read {est.DISK_BYTES_PER_S['read'] / 1e6:,.0f} MB/s; "
            "a stage takes the longer of its compute and its disk traffic",
            f"collect runs both models up to block {self.recipe.collect.layer} only; documents average half of "
            f"max_len ({self.recipe.collect.max_len}) tokens",
            "training time counts dense matmuls (the sparse BatchTopK step is faster for large dictionaries); "
            "memory is fp32 weights, gradients and two Adam moments plus the batch's activations",
            "time excludes downloading models and texts and tokenizing them (often the bottleneck for hub datasets)",
            "disk excludes the models' own download (hub cache) and counts the cache, checkpoints and analysis files",
            "memory/device is GPU memory on GPUs, RAM on a CPU; the largest stage decides",
        ]
        if self.recipe.streaming:
            notes.append(
                f"streaming: both models and the crosscoder share each device; the shuffle buffer "
                f"({self.recipe.stream.buffer_tokens:,} tokens) lives in host RAM and is saved with each checkpoint; "
                "each crosscoder reruns the models over its own pass of the texts; "
                f"the analysis cache holds {self.recipe.stream.analysis_tokens:,} tokens per source"
            )
        return notes


def _check_only(stages: list[Stage], only: list[str] | None) -> None:
    names = [s.name for s in stages]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise CrossdiffError(f"unknown stage {unknown[0]!r}; this recipe's stages are {', '.join(names)}")


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


# ----------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        description="Run every stage of a recipe file (docs/run.md). Stages whose output is complete are skipped "
        "and interrupted ones resume, so rerunning the same command continues a run.",
    )
    parser.add_argument("recipe", help="recipe file (.toml), e.g. recipes/organism.toml")
    parser.add_argument("--out", help="run folder (default: the recipe's [run] out)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with disk, memory and time estimates; run nothing")
    parser.add_argument("--hardware", help="for --dry-run: cpu or NxGPU, e.g. 8xH100 (default: the recipe's [run] hardware)")
    parser.add_argument("--stage", action="append", metavar="NAME", help="run only this stage (repeatable), e.g. train:l1")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage lines (the end screen is still printed)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, out=args.out)
    if args.dry_run:
        print(dry_run(recipe, args.hardware))
        return 0
    if args.hardware:
        raise CrossdiffError("--hardware only applies to --dry-run (the run uses each stage's device setting)")
    outcome = run_recipe(recipe, quiet=args.quiet, only=args.stage)
    ran = [name for name, what in outcome.items() if what == "ran"]
    from crossdiff.analysis.screen import run_screen  # pandas: deferred so that --help stays fast

    screen = run_screen(recipe.out, list(recipe.crosscoders))
    if screen:
        print(screen)
    print(f"run {recipe.out}: {len(ran)} stage(s) ran, {len(outcome) - len(ran)} already done")
    return 0
