"""`crossdiff analyze` on a small real cache and a saved crosscoder."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch

from crossdiff.analysis import ExampleStore
from crossdiff.analysis.cli import add_cli
from crossdiff.cache.store import CacheWriter
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError

D_IN = 16


def run_cli(argv: list[str]) -> int:
    # The stage's own parser, as crossdiff.cli builds it (independent of the other stages).
    parser = argparse.ArgumentParser(prog="crossdiff")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def cache_and_crosscoder(tmp_path_factory, tiny_tokenizer_path):
    root = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    writer = CacheWriter(root / "cache", models=(str(tiny_tokenizer_path), str(tiny_tokenizer_path)), layer=1,
                         d_model=D_IN, sources=["fineweb", "lmsys"], dtype="float32", shard_tokens=400)
    for source_id in (0, 1):
        for doc in range(8):
            n = 50
            writer.append(torch.randn(n, 2, D_IN, generator=g), torch.randint(10, 500, (n,), generator=g),
                          [doc] * n, list(range(n)), source_id, [source_id == 1 and p < 4 for p in range(n)])
        writer.seal()
    writer.finish()
    cc = CrossCoder(CrossCoderConfig(d_in=D_IN, d_sae=32, activation="batchtopk", k=4, norm_init_scale=1.0,
                                     input_scale=[0.5, 0.5]), seed=0)
    cc.threshold.fill_(1.0)
    cc.save_pretrained(root / "cc")
    return root


def test_analyze_command_writes_every_file(cache_and_crosscoder, capsys):
    root = cache_and_crosscoder
    out = root / "analysis"
    code = run_cli(["analyze", str(root / "cc"), str(root / "cache"), "--out", str(out), "--batch-size", "128",
                    "--n-top", "3", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out  # --quiet: no progress bars, but the end screen
    assert printed.startswith(f"what changed ({out})") and "chat-only" in printed and "confirmed" in printed
    assert "next: crossdiff inspect" in printed and len(printed.splitlines()) <= 41  # the screen and the files written
    table = pd.read_parquet(out / "latents.parquet")
    assert len(table) == 32 and {"freq__fineweb", "max_act__lmsys", "nu_error", "nu_recon"} <= set(table.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tokens"] == 800 and summary["n_tokens_per_source"] == {"fineweb": 400, "lmsys": 400}
    assert summary["config"]["batch_size"] == 128
    assert (table.loc[~table["dead"], "template_share"].dropna() >= 0).all()
    assert (table["freq__fineweb"] > 0).any() and (table["freq__lmsys"] > 0).any()
    with ExampleStore(out / "examples.sqlite") as store:
        live = int(table.loc[~table["dead"], "latent"].iloc[0])
        examples = store.examples(live, "top")
        assert 1 <= len(examples) <= 3 and examples[0].tokens is not None  # text from the cache's chat tokenizer


def test_analyze_options_from_a_config_file(cache_and_crosscoder, tmp_path):
    root = cache_and_crosscoder
    config = tmp_path / "analysis.toml"
    config.write_text("max_tokens = 300\nexamples = false\n[scaling]\nnu_error_max = 0.3\n")
    assert run_cli(["analyze", str(root / "cc"), str(root / "cache"), "-o", str(tmp_path / "a"), "--config",
                    str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n_tokens"] == 300 and summary["config"]["scaling"]["nu_error_max"] == 0.3
    assert not (tmp_path / "a" / "examples.sqlite").exists()


def test_bad_input_is_a_one_line_error(cache_and_crosscoder, tmp_path):
    root = cache_and_crosscoder
    bad = tmp_path / "bad.toml"
    bad.write_text("n_topp = 3\n")
    with pytest.raises(CrossdiffError, match="n_topp"):
        run_cli(["analyze", str(root / "cc"), str(root / "cache"), "-o", str(tmp_path / "b"), "--config", str(bad)])
    with pytest.raises(CrossdiffError, match="no paired-activation cache"):
        run_cli(["analyze", str(root / "cc"), str(tmp_path), "-o", str(tmp_path / "c")])
    unthresholded = CrossCoder(CrossCoderConfig(d_in=D_IN, d_sae=8, activation="batchtopk", k=2))
    unthresholded.save_pretrained(tmp_path / "cc")
    with pytest.raises(CrossdiffError, match="threshold"):
        run_cli(["analyze", str(tmp_path / "cc"), str(root / "cache"), "-o", str(tmp_path / "d"), "--quiet"])
    wider = CrossCoder(CrossCoderConfig(d_in=D_IN + 1, d_sae=8, activation="relu"))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(CrossdiffError, match="wrong cache or crosscoder"):
        run_cli(["analyze", str(tmp_path / "wider"), str(root / "cache"), "-o", str(tmp_path / "g"), "--quiet"])
    if not torch.cuda.is_available():
        with pytest.raises(CrossdiffError, match="CUDA is not available"):
            run_cli(["analyze", str(root / "cc"), str(root / "cache"), "-o", str(tmp_path / "h"), "--device", "cuda",
                     "--quiet"])


def test_crossdiff_entry_point_lists_and_runs_analyze(cache_and_crosscoder, tmp_path, capsys):
    from crossdiff.cli import main

    root = cache_and_crosscoder
    assert main(["analyze", str(root / "cc"), str(root / "cache"), "-o", str(tmp_path / "e"), "--no-examples",
                 "--quiet"]) == 0
    assert (tmp_path / "e" / "latents.parquet").is_file()
    # User errors become one line on stderr and exit code 2.
    assert main(["analyze", str(root / "cc"), str(tmp_path), "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossdiff: error:") and len(err.strip().splitlines()) == 1


def test_unknown_tokenizer_name_offline_fails_at_once(monkeypatch, capsys):
    """No network: one connection attempt, then the local cache only (no hub retries)."""
    import socket

    import huggingface_hub.constants

    from crossdiff import hub
    from crossdiff.analysis.pipeline import load_tokenizer

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if the variable were never set
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    hub._reachable.cache_clear()
    try:
        assert load_tokenizer("no-such-org/no-such-model") is None
    finally:
        hub._reachable.cache_clear()
    assert len(attempts) <= 2  # our probe (and at most one look by the hub client): no five retries
    assert "unavailable" in capsys.readouterr().out
