"""A recipe: one TOML file describing a whole run, one table per stage.

    [run]            out (the run folder), hardware (for --dry-run estimates), train_from
    [data]           optional: texts the run writes itself (kind = "organism": the demo's texts)
    [collect]        CollectConfig (out defaults to RUN/cache)
    [stream]         StreamConfig: shuffle-buffer size when training from a stream, no cache
    [train]          TrainConfig keys shared by every crosscoder (with its [train.data] table)
    [crosscoders.NAME]  one table per crosscoder: overrides of [train]; RUN/NAME/ holds it
    [analyze]        AnalysisConfig
    [behaviour]      optional: BehaviourConfig, the behavioural diff (RUN/behaviour_diff.json), run first
    [causal]         optional: CausalConfig options for the KL experiment on every crosscoder
                     (``prompts`` are answered once by the chat model and shared by all)
    [steer]          optional: PlantedSteerConfig: steer each planted behaviour of a truth
                     file into the base with its latents, against random controls
    [models."ID"]    optional known shapes (d_model, n_layers, params, vocab) for --dry-run

Every string may use ``{run}`` (the run folder), ``{organism}`` (the bundled model
organism's weights folder) and ``{smollm2_lora}`` (the SmolLM2 LoRA organism's folder, holding
``adapter/``). A recipe without ``[crosscoders]`` trains one crosscoder named
after its activation (``batchtopk``, ``l1`` for relu, ``topk``), or its variant (``dfc``,
``matryoshka``, ``delta``). The stage tables are the
ones ``crossdiff collect/train/analyze --config`` read, so one file serves both the
runner and the single-stage commands.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crossdiff.causal.planted import PlantedSteerConfig
from crossdiff.config import from_dict, load_file, merge
from crossdiff.errors import CrossdiffError
from crossdiff.organism import WEIGHTS_DIR
from crossdiff.organism.smollm2 import ADAPTER_DIR

TABLES = ("run", "data", "behaviour", "collect", "stream", "train", "crosscoders", "analyze", "causal", "steer", "models")
# Set by the runner for each crosscoder, never by the recipe's [causal] table.
CAUSAL_PER_CROSSCODER = ("crosscoder", "analysis_dir", "out", "compare")
ACTIVATION_NAMES = {"batchtopk": "batchtopk", "relu": "l1", "topk": "topk"}


@dataclass
class RunSettings:
    """The recipe's ``[run]`` table."""

    out: str
    """Run folder: RUN/data, RUN/cache, RUN/<crosscoder>/..."""
    train_from: Literal["cache", "stream"] = "cache"
    """`cache`: collect every token to disk, then train; `stream`: train while the models run (no cache)."""
    hardware: str = "1xH100"
    """What --dry-run estimates time for: `cpu`, or `N x GPU` such as `1xA100`, `8xH100` (see crossdiff.run.estimate)."""


@dataclass
class DataSettings:
    """The recipe's optional ``[data]`` table: texts written into RUN/data before collecting."""

    kind: Literal["organism", "smollm2-lora"] = "organism"
    """`organism`: the bundled organism's held-out texts plus planted-behaviour conversations;
    `smollm2-lora`: the same plain text, and requests of every planted behaviour of the SmolLM2
    LoRA organism answered by its chat model (crossdiff.organism.smollm2.data)."""
    behaviour_conversations: int = 400
    """Conversations per planted behaviour (smollm2-lora: at most this many requests of each kind)."""
    chitchat_conversations: int = 400
    """smollm2-lora: human chitchat conversations added to the chat source."""
    answer_tokens: int = 48
    """smollm2-lora: the longest answer the chat model writes to a data request."""
    seed: int = 0
    causal_per_behaviour: int = 10
    """Held-out prompts per planted behaviour written to RUN/data/causal_prompts.jsonl."""
    causal_chitchat: int = 30
    """Held-out chitchat openers added to those prompts."""


@dataclass
class Recipe:
    run: RunSettings
    collect: Any  # CollectConfig
    stream: Any  # StreamConfig
    crosscoders: dict[str, Any]  # name -> TrainConfig
    analyze: Any  # AnalysisConfig
    data: DataSettings | None = None
    behaviour: Any = None
    """The [behaviour] table (a BehaviourConfig), or None: no behavioural diff."""
    causal: dict[str, Any] | None = None
    """The [causal] table (CausalConfig options shared by every crosscoder), or None: no KL experiment."""
    steer: Any = None
    """The [steer] table (PlantedSteerConfig), or None: no planted-behaviour steering."""
    models: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "recipe"

    @property
    def out(self) -> Path:
        return Path(self.run.out)

    @property
    def streaming(self) -> bool:
        return self.run.train_from == "stream"


def load_recipe(path: str | Path, *, out: str | None = None) -> Recipe:
    """Read a recipe file; ``out`` replaces its ``[run] out``."""
    return recipe_from_dict(load_file(path), source=str(path), out=out)


def recipe_from_dict(data: dict[str, Any], *, source: str = "recipe", out: str | None = None) -> Recipe:
    # deferred: these import torch; the --help of run, demo and train imports this module
    from crossdiff.analysis.pipeline import AnalysisConfig
    from crossdiff.causal.behaviour import BehaviourConfig
    from crossdiff.collect.collector import CollectConfig
    from crossdiff.train.stream import StreamConfig
    from crossdiff.train.trainer import TrainConfig

    try:
        unknown = sorted(set(data) - set(TABLES))
        if unknown:
            raise CrossdiffError(f"unknown table [{unknown[0]}]; a recipe has {', '.join(TABLES)}")
        data = copy.deepcopy(data)
        run_table = dict(data.get("run") or {})
        if out is not None:
            run_table["out"] = out
        collect_out = (data.get("collect") or {}).get("out")
        if "out" not in run_table and isinstance(collect_out, str) and "{run}" not in collect_out:
            run_table["out"] = str(Path(collect_out).parent)  # a stage-by-stage recipe: the cache's folder
        if "out" not in run_table:
            raise CrossdiffError("[run] needs 'out', the run folder (or pass --out)")
        run = from_dict(RunSettings, run_table, "run")
        data = _substitute(data, {"{run}": run.out, "{organism}": _organism_root(data),
                                  "{smollm2_lora}": _smollm2_lora_root(data)})
        collect_table = dict(data.get("collect") or {})
        collect_table.setdefault("out", str(Path(run.out) / "cache"))
        collect = from_dict(CollectConfig, collect_table, "collect")
        stream = from_dict(StreamConfig, data.get("stream") or {}, "stream")
        train_table = data.get("train") or {}
        named = data.get("crosscoders") or {}
        if not named:
            activation = train_table.get("activation", "batchtopk")
            variant = train_table.get("variant", "standard")  # a variant names its crosscoder
            named = {ACTIVATION_NAMES.get(activation, str(activation)) if variant == "standard" else str(variant): {}}
        crosscoders = {}
        for name, overrides in named.items():
            if not isinstance(overrides, dict):
                raise CrossdiffError(f"[crosscoders.{name}] must be a table of training options")
            if name in ("data", "cache", "report") or "/" in name:
                raise CrossdiffError(f"crosscoder name {name!r} would clash with the run folder's layout")
            crosscoders[name] = from_dict(TrainConfig, merge(train_table, overrides), f"crosscoders.{name}")
        analyze = from_dict(AnalysisConfig, data.get("analyze") or {}, "analyze")
        data_settings = from_dict(DataSettings, data["data"], "data") if "data" in data else None
        causal = _causal_table(data["causal"]) if "causal" in data else None
        behaviour = from_dict(BehaviourConfig, data["behaviour"] or {}, "behaviour") if "behaviour" in data else None
        steer = from_dict(PlantedSteerConfig, data["steer"], "steer") if "steer" in data else None
        unknown = sorted(set(steer.crosscoders or ()) - set(crosscoders)) if steer is not None else []
        if unknown:
            raise CrossdiffError(f"[steer] crosscoders names {', '.join(unknown)}, not a crosscoder of this recipe "
                                 f"({', '.join(crosscoders)})")
        models = data.get("models") or {}
    except CrossdiffError as err:
        raise CrossdiffError(f"{source}: {err}") from None
    return Recipe(run=run, collect=collect, stream=stream, crosscoders=crosscoders, analyze=analyze,
                  data=data_settings, behaviour=behaviour, causal=causal, steer=steer, models=models, source=source)


def _causal_table(table: Any) -> dict[str, Any]:
    """The [causal] table, checked now (unknown keys, bad values) rather than after training."""
    from crossdiff.causal.experiment import CausalConfig  # deferred: imports torch, as in recipe_from_dict

    if not isinstance(table, dict):
        raise CrossdiffError("[causal] must be a table of KL-experiment options")
    fixed = sorted(set(table) & set(CAUSAL_PER_CROSSCODER))
    if fixed:
        raise CrossdiffError(f"[causal] {fixed[0]} is set by the runner for each crosscoder; remove it")
    from_dict(CausalConfig, {"crosscoder": "", "analysis_dir": "", **table}, "causal")
    return dict(table)


def _organism_root(data: dict[str, Any]) -> str:
    if "{organism}" not in repr(data):
        return "{organism}"  # no placeholder: left as is

    return str(WEIGHTS_DIR)


def _smollm2_lora_root(data: dict[str, Any]) -> str:
    if "{smollm2_lora}" not in repr(data):
        return "{smollm2_lora}"

    return str(ADAPTER_DIR.parent)


def _substitute(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace(key, replacement)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    return value
