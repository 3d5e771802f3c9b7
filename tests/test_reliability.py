"""Nothing lost, nothing damaged read silently: atomic rewrites, folder locks, checksums where
data is read, atomic re-analysis, and mismatched inputs refused (docs/reliability.md)."""

from __future__ import annotations

import builtins
import io
import json
import os
import socket

import pytest
import torch

from crossdiff.analysis import AnalysisConfig, analyze
from crossdiff.cache.store import CacheWriter, PairedCache
from crossdiff.cli import main
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError
from crossdiff.locks import lock_path, output_lock
from crossdiff.train.trainer import Trainer

from test_train import Crashing, _make_cache, small_config, synthetic_batches

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8


def flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def train_args(cache, out, *extra):
    return ["train", "--cache", str(cache), "--out", str(out), "--quiet", "--set", "d_sae=32", "--set", "k=2",
            "--set", "batch_size=16", "--set", "warmup_steps=2", "--set", "log_every=2", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("crossdiff: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- 1. metrics rewrite
def test_a_kill_while_trimming_metrics_keeps_the_finished_steps(tmp_path, monkeypatch):
    config = small_config()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path, quiet=True).fit(Crashing(synthetic_batches(), after=7))
    before = (tmp_path / "metrics.jsonl").read_text()
    assert before.count("\n") == 3  # steps 2, 4, 6; the checkpoint is at 4

    real_open = builtins.open

    class DiesMidWrite(io.StringIO):  # a file that is killed after a few characters
        def write(self, text):
            raise KeyboardInterrupt("killed while writing")

    def killing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and "metrics.jsonl" in str(file):
            handle = real_open(file, mode, *args, **kwargs)  # truncates, as a real open would
            handle.close()
            return DiesMidWrite()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", killing_open)
    monkeypatch.setattr(io, "open", killing_open)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path, quiet=True).fit(synthetic_batches())
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_metrics_temporary_left_by_a_kill_is_removed_by_the_next_run(tmp_path):
    config = small_config()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path, quiet=True).fit(Crashing(synthetic_batches(), after=7))
    # What write_text_atomic leaves when a kill lands between writing and renaming.
    stray = tmp_path / "0123456789ab.metrics.jsonl.tmp"
    stray.write_text('{"step": 2}\n')
    Trainer(config, 8, tmp_path, quiet=True).fit(synthetic_batches())
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------- 2. locks
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    with output_lock(tmp_path / "run", "train"):
        assert main(train_args(cache, tmp_path / "run")) == 2
        line = one_line_error(capsys)
        assert f"is in use by crossdiff train (pid {os.getpid()} on {socket.gethostname()})" in line
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(train_args(cache, tmp_path / "run")) == 0  # released
    assert not lock_path(tmp_path / "run").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    (tmp_path / "run").mkdir()
    lock_path(tmp_path / "run").write_text(json.dumps({"pid": 999999, "host": "gone", "command": "train"}))
    assert main(train_args(cache, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and "pid 999999 on gone" in err


# ---------------------------------------------------------------------- 3. cache checksums
def test_training_on_a_flipped_byte_stops_naming_the_shard(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    flip_byte(cache / "shard-00002" / "acts.npy")
    assert main(train_args(cache, tmp_path / "run")) == 2
    assert one_line_error(capsys) == "crossdiff: error: shard-00002/acts.npy does not match the sha256 recorded in manifest.json: the file or manifest.json is damaged"
    assert not (tmp_path / "run" / "crosscoder").exists()


def test_an_edited_manifest_checksum_does_not_blame_the_intact_shard_alone(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][2]["sha256"]["acts.npy"] = "0" * 64  # the data file is intact
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert main(train_args(cache, tmp_path / "run")) == 2
    line = one_line_error(capsys)
    assert "is corrupt" not in line
    assert line.endswith("shard-00002/acts.npy does not match the sha256 recorded in manifest.json: "
                         "the file or manifest.json is damaged")


def test_opening_a_cache_checks_every_file_and_size(tmp_path):
    cache = _make_cache(tmp_path / "cache")
    (cache / "shard-00003" / "tokens.npy").unlink()
    with pytest.raises(CrossdiffError, match=r"shard-00003/tokens\.npy is missing"):
        PairedCache(cache)
    cache = _make_cache(tmp_path / "cache2")
    with open(cache / "shard-00001" / "acts.npy", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(CrossdiffError, match=r"shard-00001/acts\.npy is corrupt \(size"):
        PairedCache(cache)


def test_analyze_stops_on_a_flipped_byte(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    crosscoder_dir = _crosscoder(layer=3).save_pretrained(tmp_path / "cc")
    flip_byte(cache / "shard-00000" / "tokens.npy", offset=-20)
    assert main(["analyze", str(crosscoder_dir), str(cache), "--out", str(tmp_path / "a"), "--quiet",
                 "--no-examples"]) == 2
    assert one_line_error(capsys) == "crossdiff: error: shard-00000/tokens.npy does not match the sha256 recorded in manifest.json: the file or manifest.json is damaged"


# ---------------------------------------------------------------------- 4. checkpoint checksums
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    config = small_config(steps=10, checkpoint_every=4)
    reference = Trainer(config, 8, tmp_path / "straight", quiet=True)
    reference.fit(synthetic_batches())
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, 8, tmp_path / "run", quiet=True).fit(Crashing(synthetic_batches(), after=9))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004", "step-000008"]
    flip_byte(checkpoints / "step-000008" / "training_state.pt", offset=-100)
    resumed = Trainer(config, 8, tmp_path / "run", quiet=True)
    resumed.fit(synthetic_batches())
    err = capsys.readouterr().err
    assert ("step-000008 is damaged (fails its checksum: training_state.pt does not match the sha256 recorded in "
            "checksums.json: the file or checksums.json is damaged); resuming from") in err
    assert "step-000004" in err
    assert torch.equal(resumed.model.W_dec, reference.model.W_dec)  # resumed from step 4: same result
    assert (checkpoints / "damaged-step-000008").is_dir()


def test_a_flipped_byte_in_saved_weights_is_refused(tmp_path):
    folder = _crosscoder().save_pretrained(tmp_path / "cc")
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    flip_byte(folder / "model.safetensors")
    with pytest.raises(CrossdiffError, match=r"model\.safetensors does not match the sha256 recorded in config\.json: the file or config\.json is damaged"):
        CrossCoder.from_pretrained(folder)


class _RunsCode:
    """Unpickled, it writes a file: the proof that loading ran code."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return exec, (f"open({self.sentinel!r}, 'w').write('ran')",)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    from crossdiff.files import write_checksums
    from crossdiff.train.stream import saved_data_state

    sentinel = tmp_path / "code-ran"
    cache = _make_cache(tmp_path / "cache")
    run = tmp_path / "run"
    assert main(train_args(cache, run, "--set", "checkpoint_every=4", "--set", "steps=8")) == 0
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    # A training state that is a hostile pickle, its checksum recorded too (as an attacker would).
    torch.save({"step": 8, "payload": _RunsCode(sentinel)}, checkpoint / "training_state.pt")
    write_checksums(checkpoint)
    assert main(train_args(cache, run, "--set", "checkpoint_every=4", "--set", "steps=12")) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"crossdiff: error: refusing {checkpoint / 'training_state.pt'}: it names Python objects "
                           "other than tensors, which could run code when loaded (")
    with pytest.raises(CrossdiffError, match="^refusing .*training_state.pt: it names Python objects"):
        saved_data_state(run)  # a streamed run's resume reads the same file
    # A dictionary_learning checkpoint (.pt) is a pickle too.
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": _RunsCode(sentinel)}, tmp_path / "ae.pt")
    with pytest.raises(CrossdiffError, match=r"^refusing .*ae\.pt: it names Python objects other than tensors"):
        CrossCoder.from_pretrained(tmp_path / "ae.pt")
    assert not sentinel.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------- 5. non-finite activations
def test_analyze_stops_on_nan_activations(tmp_path, capsys):
    writer = CacheWriter(tmp_path / "cache", models=("base-x", "chat-x"), layer=3, d_model=D, sources=["web"],
                         dtype="float32", shard_tokens=40)
    acts = torch.randn(30, 2, D)
    acts[17, 1, 2] = float("nan")
    writer.append(acts, [5] * 30, [0] * 30, range(30), 0, [False] * 30)
    writer.seal()
    writer.finish()
    crosscoder_dir = _crosscoder(layer=3).save_pretrained(tmp_path / "cc")
    assert main(["analyze", str(crosscoder_dir), str(tmp_path / "cache"), "--out", str(tmp_path / "a"), "--quiet",
                 "--no-examples"]) == 2
    line = one_line_error(capsys)
    assert "NaN or inf activations (1 tokens in one batch, the first in document 0 of source 0, position 17)" in line
    assert not (tmp_path / "a" / "summary.json").exists()


# ---------------------------------------------------------------------- 6. atomic re-analysis
def test_an_interrupted_reanalysis_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    cache = PairedCache(_make_cache(tmp_path / "cache"))
    crosscoder = _crosscoder(layer=3)
    out = tmp_path / "analysis"
    analyze(crosscoder, cache, out, AnalysisConfig(examples=False), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    from crossdiff.analysis import pipeline

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the summary")

    monkeypatch.setattr(pipeline, "write_table", killed)
    crosscoder.threshold.fill_(0.5)  # a different analysis: its files would differ
    with pytest.raises(KeyboardInterrupt):
        analyze(crosscoder, cache, out, AnalysisConfig(examples=False), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    result = analyze(crosscoder, cache, out, AnalysisConfig(examples=False), progress=False)
    assert {p.name for p in out.iterdir()} == set(before) and result.files["table"].parent == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "cache"]  # no leftovers


# ---------------------------------------------------------------------- 7. stray manifest temporaries
def test_a_stray_manifest_temporary_is_removed_on_reopening(tmp_path):
    settings = dict(models=("b", "c"), layer=0, d_model=D, sources=["web"], shard_tokens=8)
    CacheWriter(tmp_path / "c", **settings)
    (tmp_path / "c" / "0123abcd.manifest.json.tmp").write_text('{"half": ')  # a kill before the rename
    CacheWriter(tmp_path / "c", **settings)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json"]


# ---------------------------------------------------------------------- 8. layer / model mismatch
def test_analyze_refuses_a_cache_of_another_layer_or_models(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")  # layer 3, models base-x / chat-x
    other_layer = _crosscoder(layer=5).save_pretrained(tmp_path / "cc5")
    args = [str(cache), "--out", str(tmp_path / "a"), "--quiet", "--no-examples"]
    assert main(["analyze", str(other_layer), *args]) == 2
    assert one_line_error(capsys) == (
        "crossdiff: error: the cache does not match the crosscoder: layer 5 for the crosscoder, 3 for the cache "
        "(--allow-mismatch to analyse anyway)"
    )
    other_models = _crosscoder(layer=3, models=["org/base-y", "chat-x"]).save_pretrained(tmp_path / "ccm")
    assert main(["analyze", str(other_models), *args]) == 2
    assert "models ['org/base-y', 'chat-x'] for the crosscoder, ['base-x', 'chat-x'] for the cache" in one_line_error(capsys)
    same = _crosscoder(layer=3, models=["/models/base-x", "hub/chat-x"]).save_pretrained(tmp_path / "ok")
    assert main(["analyze", str(same), *args]) == 0
    assert main(["analyze", str(other_layer), *args, "--allow-mismatch"]) == 0


def _crosscoder(layer: int | None = None, models: list[str] | None = None) -> CrossCoder:
    crosscoder = CrossCoder(CrossCoderConfig(d_in=D, d_sae=16, activation="batchtopk", k=2, layer=layer,
                                             model_names=models or ["base-x", "chat-x"]), seed=0)
    crosscoder.threshold.fill_(0.1)
    return crosscoder


# ---------------------------------------------------------------------- collect reruns
def _collect_args(pair, texts, out):
    return ["collect", "--base", str(pair[0]), "--chat", str(pair[1]), "--layer", "1", "--out", str(out),
            *[a for t in texts for a in ("--source", t)], "--max-len", "16", "--batch-size", "2",
            "--shard-tokens", "40", "--max-tokens", "60", "--model-dtype", "float32", "--device", "cpu", "--quiet"]


def test_collect_rerun_over_a_damaged_complete_cache_says_so(tmp_path, tiny_pair_paths, capsys):
    (tmp_path / "web.txt").write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(40)))
    args = _collect_args(tiny_pair_paths, [f"web:text:{tmp_path / 'web.txt'}"], tmp_path / "c")
    assert main(args) == 0
    assert main(args) == 0  # complete and intact: nothing to do
    flip_byte(tmp_path / "c" / "shard-00001" / "acts.npy")
    assert main(args) == 2
    assert one_line_error(capsys) == "crossdiff: error: shard-00001/acts.npy does not match the sha256 recorded in manifest.json: the file or manifest.json is damaged"


def test_an_empty_text_source_is_an_error(tmp_path, tiny_pair_paths, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(_collect_args(tiny_pair_paths, [f"web:text:{tmp_path / 'empty.txt'}"], tmp_path / "c")) == 2
    assert "source 'web' gave no tokens" in one_line_error(capsys)


def test_a_cache_whose_collect_stopped_on_an_empty_source_says_why(tmp_path, tiny_pair_paths, capsys):
    (tmp_path / "web.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    (tmp_path / "chat.txt").write_text("")
    argv = _collect_args(tiny_pair_paths, [f"web:text:{tmp_path / 'web.txt'}", f"chat:text:{tmp_path / 'chat.txt'}"],
                         tmp_path / "c")
    assert main(argv) == 2
    capsys.readouterr()
    for command in (["train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "run"), "--quiet"],
                    ["analyze", str(_crosscoder().save_pretrained(tmp_path / "cc")), str(tmp_path / "c"),
                     "--out", str(tmp_path / "a"), "--quiet"]):
        assert main(command) == 2
        line = one_line_error(capsys)
        assert "rerun the same collect command" not in line
        assert "its collect stopped with \"source 'chat' gave no tokens" in line
    (tmp_path / "chat.txt").write_text("user asks a question and the model answers\n" * 4)
    assert main(argv) == 0  # the source fixed, the same command finishes the cache
    assert PairedCache(tmp_path / "c", verify=True).manifest.get("stopped") is None


# ---------------------------------------------------------------------- one clear line, not a traceback
def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    (tmp_path / "file").write_text("not a folder")
    assert main(train_args(cache, tmp_path / "file")) == 2
    assert one_line_error(capsys).endswith(f"output folder {tmp_path / 'file'} is a file, not a folder; choose a folder")
    crosscoder_dir = _crosscoder(layer=3).save_pretrained(tmp_path / "cc")
    assert main(["analyze", str(crosscoder_dir), str(cache), "--out", str(tmp_path / "file"), "--quiet"]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main(train_args(cache, tmp_path / "ro" / "run")) == 2
    assert "permission denied" in one_line_error(capsys)


def test_permission_errors_say_so():
    from crossdiff.files import read_error, write_error

    assert str(write_error("x", PermissionError(13, "Permission denied"))) == "cannot write x: permission denied"
    assert str(read_error("x", PermissionError(13, "Permission denied"))) == "cannot read x: permission denied"


def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from crossdiff import crosscoder as crosscoder_mod

    def save_to_full_disk(tensors, path, metadata=None):  # what safetensors raises on a full disk
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(crosscoder_mod, "save_file", save_to_full_disk)
    with pytest.raises(CrossdiffError, match=r"^disk full while writing .*step-000004/model\.safetensors; free space"):
        Trainer(small_config(), 8, tmp_path, quiet=True).fit(synthetic_batches())


def test_disk_full_while_writing_examples_is_one_line(tmp_path, monkeypatch, capsys):
    import sqlite3

    from crossdiff.analysis import examples

    real_connect = sqlite3.connect

    def tiny_disk(path, *args, **kwargs):  # sqlite's own "database or disk is full"
        db = real_connect(path, *args, **kwargs)
        db.execute("PRAGMA max_page_count = 3")
        return db

    monkeypatch.setattr(examples.sqlite3, "connect", tiny_disk)
    cache = _make_cache(tmp_path / "cache")
    crosscoder_dir = _crosscoder(layer=3).save_pretrained(tmp_path / "cc")
    assert main(["analyze", str(crosscoder_dir), str(cache), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert one_line_error(capsys).startswith(f"crossdiff: error: disk full while writing {tmp_path / 'a'}")


def test_manifest_damage_is_one_line_in_every_command(tmp_path, capsys):
    cache = _make_cache(tmp_path / "cache")
    crosscoder_dir = _crosscoder(layer=3).save_pretrained(tmp_path / "cc")
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["shards"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for argv in (train_args(cache, tmp_path / "run"), ["collect", "--verify", str(cache)],
                 ["analyze", str(crosscoder_dir), str(cache), "--out", str(tmp_path / "a"), "--quiet"]):
        assert main(argv) == 2
        assert one_line_error(capsys).endswith("is damaged: it lacks the key(s) shards")


def test_an_edited_token_count_blames_the_manifest(tmp_path):
    cache = _make_cache(tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "n_tokens": 150}))
    with pytest.raises(CrossdiffError, match=r"manifest\.json is inconsistent: n_tokens is 150 but its shards hold 160"):
        PairedCache(cache)
    manifest["shards"][1]["n_tokens"] = 30
    manifest["n_tokens"] = 150
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CrossdiffError, match=r"manifest\.json is inconsistent: it says shard-00001 holds 30 tokens, "
                                             r"its files hold 40"):
        PairedCache(cache)


def test_a_deleted_shard_folder_on_resume_is_one_line(tmp_path):
    import shutil

    settings = dict(models=("b", "c"), layer=0, d_model=D, sources=["web"], shard_tokens=8)
    writer = CacheWriter(tmp_path / "c", **settings)
    for doc in range(2):
        writer.append(torch.randn(8, 2, D), range(8), [doc] * 8, range(8), 0, [False] * 8)
        writer.seal({"next_doc": doc + 1})
    shutil.rmtree(tmp_path / "c" / "shard-00000")
    with pytest.raises(CrossdiffError, match=r"^shard-00000/acts\.npy is missing \(the cache at .* is damaged"):
        CacheWriter(tmp_path / "c", **settings)


@pytest.mark.parametrize("content", ["", '{"format": "crossdiff.crosscoder", "d_in": 8,'])
def test_a_damaged_config_json_is_one_line(tmp_path, content):
    folder = _crosscoder().save_pretrained(tmp_path / "cc")
    (folder / "config.json").write_text(content)
    with pytest.raises(CrossdiffError, match=r"config\.json is damaged \(not valid JSON"):
        CrossCoder.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CrossdiffError, match=r"config\.json is missing"):
        CrossCoder.from_pretrained(folder)


def test_a_damaged_checkpoint_config_is_one_line(tmp_path):
    Trainer(small_config(steps=4, checkpoint_every=4), 8, tmp_path, quiet=True).fit(synthetic_batches())
    (tmp_path / "checkpoints" / "step-000004" / "config.json").write_text("")
    with pytest.raises(CrossdiffError, match=r"step-000004 fails its checksum: config\.json does not match the sha256 recorded in checksums\.json"):
        Trainer(small_config(steps=8, checkpoint_every=4), 8, tmp_path, quiet=True).fit(synthetic_batches())


def test_source_ids_out_of_range_are_one_line(tmp_path):
    from crossdiff.analysis import TensorSource

    source = TensorSource(torch.randn(20, 2, D), source_ids=torch.full((20,), 3), sources=["web"])
    with pytest.raises(CrossdiffError, match=r"source id is outside 0\.\.0"):
        analyze(_crosscoder(), source, tmp_path / "a", AnalysisConfig(examples=False), progress=False)


# ---------------------------------------------------------------------- models' own code never runs
def _model_with_its_own_code(folder, model_type: str, tmp_path):
    """A copy of a tiny model whose config and tokenizer point at a module (auto_map) that, if
    imported, writes a sentinel file: what a hub repository with remote code looks like."""
    import shutil

    shutil.copytree(folder, tmp_path / "own-code")
    folder, sentinel = tmp_path / "own-code", tmp_path / "code-ran"
    (folder / "own_code.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        f"class OwnConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class OwnModel(LlamaForCausalLM):\n    config_class = OwnConfig\n"
        "class OwnTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "own_code.OwnConfig", "AutoModelForCausalLM": "own_code.OwnModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": [None, "own_code.OwnTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder, sentinel


def test_a_model_that_needs_its_own_code_is_refused_in_one_line_and_runs_none(tiny_pair_paths, tmp_path, capsys):
    folder, sentinel = _model_with_its_own_code(tiny_pair_paths[0], "own-architecture", tmp_path)
    (tmp_path / "t.txt").write_text("the quick brown fox\n" * 4)
    code = main(["collect", "--base", str(folder), "--chat", str(folder), "--layer", "1", "--source", f"t:text:{tmp_path / 't.txt'}",
                 "--out", str(tmp_path / "cache"), "--max-tokens", "20", "--quiet"])
    line = one_line_error(capsys)
    assert code == 2 and "contains custom code" in line and "crossdiff never runs code shipped with a model" in line
    assert not sentinel.exists()


def test_a_known_architecture_loads_without_the_code_its_folder_ships(tiny_pair_paths, tmp_path):
    from crossdiff.models import load_model, load_tokenizer_of

    folder, sentinel = _model_with_its_own_code(tiny_pair_paths[0], "llama", tmp_path)
    model, tokenizer = load_model(folder), load_tokenizer_of(folder)
    assert type(model).__module__.startswith("transformers.") and type(tokenizer).__module__.startswith("transformers.")
    assert not sentinel.exists()


def test_every_auto_class_load_in_src_passes_trust_remote_code_false():
    """transformers' Auto classes are where a model's own code could run: each call says False."""
    import ast
    from pathlib import Path

    calls = []
    for path in sorted((Path(__file__).parents[1] / "src" / "crossdiff").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
                flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
                calls.append((f"{path.name}:{node.lineno}", isinstance(flag, ast.Constant) and flag.value is False))
    assert len(calls) >= 7 and all(ok for _, ok in calls), calls
