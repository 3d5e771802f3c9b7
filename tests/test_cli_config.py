"""One CLI scheme for every stage (crossdiff.cli_config): each config field is a flag and a
--set key, help comes from the field's docstring, and `--help` never imports torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from crossdiff import cli_config
from crossdiff.analysis.config import ADLConfig, AnalysisConfig
from crossdiff.autointerp.config import ExplainConfig
from crossdiff.causal.config import BehaviourConfig, CausalConfig, SteerConfig
from crossdiff.cli import COMMANDS, build_parser
from crossdiff.collect.config import CollectConfig
from crossdiff.errors import CrossdiffError
from crossdiff.train.config import TrainConfig

# command -> its dataclass config and the recipe table its --config reads
STAGES = {
    "collect": (CollectConfig, "collect"), "train": (TrainConfig, "train"), "analyze": (AnalysisConfig, "analyze"),
    "explain": (ExplainConfig, "explain"), "causal": (CausalConfig, "causal"), "steer": (SteerConfig, "steer"),
    "behaviour": (BehaviourConfig, "behaviour"), "adl": (ADLConfig, "adl"),
}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser([command])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_config_field_is_a_flag_and_a_set_key(command):
    cls, section = STAGES[command]
    parser = _subparser(command)
    dests = {action.dest for action in parser._actions}
    paths = [path for path, *_ in cli_config.fields(cls)]
    assert paths and set(paths) <= dests, set(paths) - dests
    assert {"config", "set"} <= dests
    for path, hint, default, doc in cli_config.fields(cls):
        if default is cli_config.dataclasses.MISSING:
            continue
        raw = "null" if default is None else json.dumps(default) if not isinstance(default, str) else default
        args = argparse.Namespace(config=None, set=[f"{path}={raw}"])
        data = cli_config.config_data(cls, args, section)
        node = data
        for part in path.split("."):
            node = node[part]
        assert node == (list(default) if isinstance(default, tuple) else default), path


def test_flags_take_the_field_docstring_as_help():
    help_text = _subparser("train").format_help()
    assert "--data.epochs" in help_text and "Passes over the cache" in help_text
    assert "--no-data.normalize" in help_text
    # a trailing comment serves where a field has no docstring
    assert "tokens per document" in _subparser("collect").format_help()


def test_flags_file_and_set_in_order(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nk = 5\nlr = 0.5\n[train.data]\nepochs = 3\n")
    parser = build_parser(["train"])
    args = parser.parse_args(["train", "--synthetic", "--out", "x", "--config", str(recipe), "--k", "7",
                              "--data.window-shards", "2", "--set", "lr=0.25", "--precision", "bf16"])
    data = cli_config.config_data(TrainConfig, args, "train")
    assert data == {"k": 7, "lr": 0.25, "precision": "bf16", "data": {"epochs": 3, "window_shards": 2}}


def test_values_are_read_by_the_field_type():
    parse = cli_config.parse_at
    assert parse(CollectConfig, "base", "123") == "123"  # a string field keeps digits as text
    assert parse(CollectConfig, "layer", "3") == 3
    assert parse(TrainConfig, "data.source_ratio", '{"a": 0.5}') == {"a": 0.5}
    assert parse(TrainConfig, "steps", "null") is None
    assert parse(SteerConfig, "factors", "2") == [2]
    assert parse(SteerConfig, "factors", "[1, 2]") == [1, 2]


def test_older_spellings_still_work():
    args = build_parser(["steer"]).parse_args(["steer", "cc", "an", "--latent", "3,4", "--factor", "1", "2",
                                               "--prompts", "p.txt", "--prompt", "hi"])
    config = cli_config.config_from_args(SteerConfig, args, "steer")
    assert (config.latents, config.factors, config.prompts_file, config.prompts) == (["3,4"], [1.0, 2.0], "p.txt", ["hi"])
    args = build_parser(["analyze"]).parse_args(["analyze", "c", "k", "-o", "o", "--no-examples", "--allow-mismatch"])
    config = cli_config.config_from_args(AnalysisConfig, args, "analyze")
    assert config.examples is False and config.allow_mismatch is True
    args = build_parser(["adl"]).parse_args(["adl", "--base", "b", "--chat", "c", "--layer", "1", "--texts", "t",
                                             "--out", "o", "--docs", "5", "--top", "3", "--model", "chat"])
    config = cli_config.config_from_args(ADLConfig, args, "adl")
    assert (config.max_docs, config.top_tokens, config.models) == (5, 3, ["chat"])


def test_a_missing_required_field_names_its_flag():
    args = build_parser(["adl"]).parse_args(["adl", "--base", "b", "--chat", "c", "--layer", "1"])
    with pytest.raises(CrossdiffError, match="adl needs --texts, --out"):
        cli_config.config_from_args(ADLConfig, args, "adl")


def test_a_typo_in_set_gets_a_hint():
    args = argparse.Namespace(config=None, set=["warmup_step=1"])
    with pytest.raises(CrossdiffError, match="did you mean 'warmup_steps'"):
        cli_config.config_from_args(TrainConfig, args, "train")


def test_help_imports_no_torch():
    """`crossdiff --help` and every `crossdiff COMMAND --help` run without importing torch
    (checked in a fresh interpreter, not timed: the heavy imports wait for the command)."""
    code = (
        "import sys\nfrom crossdiff.cli import main\nfor argv in [['--help']] + [[c, '--help'] for c in sys.argv[1:]]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "    heavy = [m for m in ('torch', 'transformers', 'pandas') if m in sys.modules]\n"
        "    assert not heavy, (argv, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
