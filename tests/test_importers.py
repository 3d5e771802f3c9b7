"""Importing dictionary_learning crosscoders (the paper's published checkpoints) losslessly.

The reference below re-implements the dictionary_learning CrossCoder / BatchTopKCrossCoder
forward pass from its definition, independently of crossdiff's code: encoder weight
[n, d, D], decoder weight [n, D, d], code normalisation chosen by an enum id.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from crossdiff.crosscoder import CrossCoder
from crossdiff.errors import CrossdiffError

CROSSCODER, SAE, MIXED, NONE, DECOUPLED = 1, 2, 3, 4, 5


class ReferenceDictionaryLearning:
    def __init__(self, state, alpha_sae=1.0, alpha_cc=0.1):
        self.s, self.alpha_sae, self.alpha_cc = state, alpha_sae, alpha_cc

    def weight_norm(self):
        dw = self.s["decoder.weight"]  # [n, D, d]
        mode = int(self.s["code_normalization_id"])
        if mode == CROSSCODER:
            return dw.norm(dim=2).sum(dim=0)
        if mode == SAE:
            return dw.norm(dim=(0, 2))
        if mode == MIXED:
            return self.alpha_sae * dw.norm(dim=(0, 2)) + self.alpha_cc * dw.norm(dim=2).sum(dim=0)
        return torch.ones(dw.shape[1], dtype=dw.dtype)

    def encode(self, x):
        f = torch.relu(torch.einsum("bld,ldf->bf", x, self.s["encoder.weight"]) + self.s["encoder.bias"])
        if "threshold" in self.s:
            f = f * (f * self.weight_norm() > self.s["threshold"])
        return f

    def decode(self, f):
        return torch.einsum("bf,lfd->bld", f, self.s["decoder.weight"]) + self.s["decoder.bias"]


def random_state(n=2, d=5, D=16, norm_id=CROSSCODER, batchtopk=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {
        "encoder.weight": torch.randn(n, d, D, generator=g),
        "encoder.bias": torch.randn(D, generator=g) * 0.1,
        "decoder.weight": torch.randn(n, D, d, generator=g),
        "decoder.bias": torch.randn(n, d, generator=g),
        "code_normalization_id": torch.tensor(norm_id),
    }
    if batchtopk:
        state["k"] = torch.tensor(4, dtype=torch.int)
        state["threshold"] = torch.tensor(2.0)
    return state


@pytest.mark.parametrize("norm_id", [CROSSCODER, SAE, MIXED, NONE])
@pytest.mark.parametrize("batchtopk", [False, True])
def test_import_matches_reference_forward(tmp_path, norm_id, batchtopk):
    state = random_state(norm_id=norm_id, batchtopk=batchtopk)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"activation_dim": 5, "dict_size": 16, "num_layers": 2}))
    # float64 on both sides, so a difference can only come from the conversion itself
    model = CrossCoder.from_pretrained(tmp_path, dtype=torch.float64)
    reference = ReferenceDictionaryLearning({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    x = torch.randn(32, 2, 5, dtype=torch.float64)
    f = model.encode(x)
    torch.testing.assert_close(f, reference.encode(x), rtol=0, atol=1e-12)
    if batchtopk:
        assert 0 < int((f != 0).sum()) < f.numel()  # the threshold really selects
    torch.testing.assert_close(model.decode(f), reference.decode(reference.encode(x)), rtol=0, atol=1e-12)
    assert model.config.activation == ("batchtopk" if batchtopk else "relu")


def test_import_from_torch_file_with_compile_prefix_and_resave(tmp_path):
    state = random_state(batchtopk=True)
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "crosscoder.pt")
    model = CrossCoder.from_pretrained(tmp_path)
    assert model.config.k == 4 and model.config.threshold == 2.0
    model.save_pretrained(tmp_path / "native")  # a converted checkpoint is an ordinary one
    again = CrossCoder.from_pretrained(tmp_path / "native")
    x = torch.randn(8, 2, 5)
    assert torch.equal(again(x), model(x))


def test_import_errors(tmp_path):
    state = random_state(norm_id=DECOUPLED)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CrossdiffError, match="DECOUPLED"):
        CrossCoder.from_pretrained(tmp_path)
    del state["decoder.bias"]
    state["code_normalization_id"] = torch.tensor(CROSSCODER)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CrossdiffError, match=r"missing \['decoder.bias'\]"):
        CrossCoder.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CrossdiffError, match="holds no crosscoder weights"):
        CrossCoder.from_pretrained(empty)


# ---------------------------------------------------------------------- which file, which path
def test_training_folder_prefers_the_final_model_then_the_highest_step(tmp_path, capsys):
    untrained, middle, final = (random_state(batchtopk=True, seed=s) for s in (0, 1, 2))
    torch.save(untrained, tmp_path / "checkpoint_0.pt")
    torch.save(middle, tmp_path / "checkpoint_10.pt")
    torch.save(middle, tmp_path / "checkpoint_9.pt")
    torch.save({"loss": torch.tensor(1.0)}, tmp_path / "eval_logs_10.pt")  # logs are not weights
    (tmp_path / "config.json").write_text(json.dumps({"activation_dim": 5, "dict_size": 16, "num_layers": 2}))
    model = CrossCoder.from_pretrained(tmp_path)
    assert torch.equal(model.W_enc, middle["encoder.weight"])  # checkpoint_10, not _9 nor _0
    assert model.config.metadata["imported_from"] == str(tmp_path / "checkpoint_10.pt")
    assert "importing " + str(tmp_path / "checkpoint_10.pt") in capsys.readouterr().err
    torch.save(final, tmp_path / "model_final.pt")
    model = CrossCoder.from_pretrained(tmp_path)
    assert torch.equal(model.W_enc, final["encoder.weight"])
    assert model.config.metadata["imported_from"] == str(tmp_path / "model_final.pt")


def test_ambiguous_folder_is_refused_listing_the_candidates(tmp_path):
    torch.save(random_state(), tmp_path / "a.pt")
    torch.save(random_state(), tmp_path / "b.pt")
    with pytest.raises(CrossdiffError, match=r"several crosscoder weight files \(a\.pt, b\.pt\)"):
        CrossCoder.from_pretrained(tmp_path)
    model = CrossCoder.from_pretrained(tmp_path / "b.pt")  # a file path is accepted
    assert model.config.metadata["imported_from"] == str(tmp_path / "b.pt")


# ---------------------------------------------------------------------- the activation normaliser
def normalised_state(target_rms=10.0):
    """A 2-model, d=2 crosscoder with dictionary_learning's normaliser buffers, values chosen by hand."""
    state = random_state(n=2, d=2, D=4, batchtopk=True)
    state["threshold"] = torch.tensor(0.5)
    state["activation_mean"] = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
    state["activation_std"] = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # total variance 25 and 1
    state["target_rms"] = torch.tensor(target_rms)
    total_var = (state["activation_std"] ** 2).sum(-1)
    state["activation_global_scale"] = target_rms / torch.sqrt(total_var + 1e-8)  # as dictionary_learning computes it
    return state


def test_normaliser_is_imported_as_the_input_transform(tmp_path):
    state = normalised_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    model = CrossCoder.from_pretrained(tmp_path)
    # By hand: global scales are 10 / 5 = 2 and 10 / 1 = 10.
    x = torch.tensor([[[6.0, 7.0], [0.0, 1.0]]])
    expected = torch.tensor([[[(6 - 1) * 2.0, (7 - 2) * 2.0], [(0 + 1) * 10.0, (1 - 0) * 10.0]]])
    torch.testing.assert_close(model.normalize(x), expected, rtol=1e-6, atol=0)
    # Bit for bit what dictionary_learning computes: (x - mean) * scale, y / (scale + 1e-8) + mean.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, 2, generator=g) * 5
    scale = state["activation_global_scale"].view(1, 2, 1)
    assert torch.equal(model.normalize(x), (x - state["activation_mean"]) * scale)
    y = torch.randn(64, 2, 2, generator=g)
    assert torch.equal(model.denormalize(y), y / (scale + 1e-8) + state["activation_mean"])
    # The whole forward pass, against the reference (matmul order differs: float rounding only).
    reference = ReferenceDictionaryLearning(state)
    f = model.encode(model.normalize(x))
    torch.testing.assert_close(f, reference.encode((x - state["activation_mean"]) * scale), rtol=1e-5, atol=1e-5)
    assert 0 < int((f != 0).sum()) < f.numel()
    torch.testing.assert_close(model.denormalize(model.decode(f)),
                               reference.decode(f) / (scale + 1e-8) + state["activation_mean"], rtol=1e-5, atol=1e-5)
    # Saved and loaded again, a crossdiff checkpoint keeps the transform.
    again = CrossCoder.from_pretrained(model.save_pretrained(tmp_path / "native"))
    assert torch.equal(again.normalize(x), model.normalize(x))
    assert again.config.denormalize_epsilon == 1e-8


def test_unused_normaliser_is_identity_and_a_partial_one_is_refused(tmp_path):
    state = normalised_state()
    for key in ("activation_mean", "activation_std"):
        state[key] = torch.full((2, 2), float("nan"))  # dictionary_learning's "no normaliser"
    save_file(state, str(tmp_path / "model.safetensors"))
    x = torch.randn(4, 2, 2)
    assert torch.equal(CrossCoder.from_pretrained(tmp_path).normalize(x), x)
    state = normalised_state()
    del state["activation_global_scale"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CrossdiffError, match="incomplete activation normaliser \\(lacks activation_global_scale\\)"):
        CrossCoder.from_pretrained(tmp_path)


def test_crosscoder_and_cache_import_nothing_above_them():
    """crosscoder.py and cache.py sit at the bottom of the import graph (even lazily)."""
    import ast
    from pathlib import Path

    import crossdiff

    root = Path(crossdiff.__file__).parent

    def imports(module: str) -> set[str]:
        tree = ast.parse((root / f"{module}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crossdiff"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("crossdiff"))
        return found

    leaves = {"crossdiff.errors", "crossdiff.files", "crossdiff.config", "crossdiff.partition"}
    assert imports("partition") <= {"crossdiff.errors"}
    assert imports("importers") <= leaves
    assert imports("crosscoder") <= leaves | {"crossdiff.importers"}
    assert imports("cache/defaults") <= set() and imports("cache/filters") <= leaves | {"crossdiff.cache.defaults"}
    assert imports("cache/batch") <= set()  # the batch record: a leaf like defaults
    assert imports("cache/store") <= leaves | {"crossdiff.cache.defaults", "crossdiff.cache.filters", "crossdiff.cache.batch"}
    assert imports("files") <= {"crossdiff.errors"}
