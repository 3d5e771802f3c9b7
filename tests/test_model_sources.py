"""Model specs: GGUF files converted once, base::adapter pairs merged, bad sources refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from crossdiff import model_sources
from crossdiff.errors import CrossdiffError
from crossdiff.models import load_model, load_model_pair


def _make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter with non-zero B (peft starts B at zero, which would merge to nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


def test_adapter_pair_logits_equal_the_unmerged_peft_model(tiny_pair_paths, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, _ = tiny_pair_paths
    adapter = _make_adapter(base_dir, tmp_path / "adapter")
    merged = load_model(f"{base_dir}::{adapter}", "chat", "float32")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        got, want, before = merged(ids).logits, reference(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the adapter changed something, so equality means something


def test_adapter_pair_records_the_adapter_identity(tiny_pair_paths, tmp_path):
    from crossdiff.files import sha256_file

    base_dir, _ = tiny_pair_paths
    adapter = _make_adapter(base_dir, tmp_path / "adapter")
    pair = load_model_pair(base_dir, f"{base_dir}::{adapter}", dtype="float32")
    base_id, chat_id = pair.identities
    assert base_id == {"spec": str(base_dir), "model": str(base_dir)}
    assert chat_id["adapter"] == str(adapter.resolve())
    assert chat_id["adapter_sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert pair.chat_name == f"{base_dir}::{adapter}"


def test_adapter_for_another_base_is_refused_in_one_line(tiny_pair_paths, make_tiny_model_pair, tmp_path):
    base_dir, _ = tiny_pair_paths
    wider, _ = make_tiny_model_pair("llama", base_overrides={"hidden_size": 48}, chat_overrides={"hidden_size": 48})
    adapter = _make_adapter(wider, tmp_path / "adapter")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(CrossdiffError, match="made for another base model") as err:
        load_model(f"{base_dir}::{adapter}", "chat")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_adapter_folder_without_config_is_refused(tiny_pair_paths, tmp_path):
    base_dir, _ = tiny_pair_paths
    adapter = _make_adapter(base_dir, tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CrossdiffError, match="no adapter_config.json: not a PEFT adapter folder"):
        load_model_pair(base_dir, f"{base_dir}::{adapter}")


def test_a_missing_local_path_says_so_not_the_hub(tmp_path):
    for spec, words in ((str(tmp_path / "nope"), "no such folder"), ("./models/x.gguf", "no such file"),
                        (f"{tmp_path}::{tmp_path / 'gone'}", "chat adapter .* no such folder")):
        with pytest.raises(CrossdiffError, match=words) as err:
            load_model_pair(spec if "::" not in spec else str(tmp_path), spec)
        assert "Hub" not in str(err.value) and "connect" not in str(err.value)


def test_spec_syntax():
    assert model_sources.parse("a/b::c") == model_sources.ModelSpec("a/b::c", "a/b", "c")
    assert model_sources.parse("google/gemma-2-2b").adapter is None
    with pytest.raises(CrossdiffError, match="BASE::ADAPTER"):
        model_sources.parse("::adapter")
    assert model_sources.looks_like_path("./x") and model_sources.looks_like_path("a/b/c")
    assert not model_sources.looks_like_path("google/gemma-2-2b") and not model_sources.looks_like_path("gpt2")
    assert model_sources.is_hub_gguf("org/repo/file.Q4_K_M.gguf") and not model_sources.is_hub_gguf("/x/file.gguf")


# ---------------------------------------------------------------- GGUF files


def test_truncated_or_foreign_gguf_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIFF_CACHE", str(tmp_path / "cache"))
    source = model_sources.smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(CrossdiffError, match="damaged or truncated") as err:
        load_model(cut)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "weights.gguf"
    foreign.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(CrossdiffError, match="is not a GGUF file"):
        load_model(foreign)
    with pytest.raises(CrossdiffError, match="no such file"):
        load_model(tmp_path / "missing.gguf")
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


def test_gguf_is_converted_once_and_reloads_from_the_copy(smollm2_folder, monkeypatch):
    # The session fixture converted it; asking again must find that folder without converting.
    monkeypatch.setattr(model_sources, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert model_sources.resolve("smollm2") == (str(smollm2_folder), None)
    record = model_sources.identity("smollm2")
    from crossdiff.files import sha256_file

    assert record["gguf_sha256"] == sha256_file(model_sources.smollm2_gguf())
    assert not any(smollm2_folder.glob("*.gguf")) and (smollm2_folder / "model.safetensors").is_file()
    config = (smollm2_folder / "config.json").read_text()
    assert "quantization_config" not in config


def test_smollm2_loads_as_a_real_llama(smollm2_folder):
    from transformers import AutoTokenizer

    model = load_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)


def test_copy_of_a_converted_folder_loads_like_any_folder(smollm2_folder, tmp_path):
    copy = tmp_path / "smol"
    shutil.copytree(smollm2_folder, copy)
    assert model_sources.resolve(str(copy)) == (str(copy), None)
