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
