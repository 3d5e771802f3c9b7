"""The CrossCoder object: init, encode/decode maths, sparsity modes, save/load."""

import json

import pytest
import torch

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError


def make(activation="batchtopk", k=3, d_in=6, d_sae=20, n_models=2, seed=0, **kw):
    config = CrossCoderConfig(d_in=d_in, d_sae=d_sae, n_models=n_models, activation=activation,
                              k=None if activation == "relu" else k, **kw)
    return CrossCoder(config, seed=seed).double()


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_paper_init_is_shared_transposed_and_scaled():
    for activation, scale in [("relu", 0.005), ("batchtopk", 1.0)]:
        model = make(activation)
        assert torch.equal(model.W_enc[0], model.W_enc[1])  # one draw for both models
        assert torch.equal(model.W_dec, model.W_enc.permute(2, 0, 1))
        torch.testing.assert_close(model.decoder_norms(), torch.full((20, 2), scale, dtype=torch.float64))
        assert model.b_enc.abs().sum() == 0 and model.b_dec.abs().sum() == 0
        assert torch.allclose(model.relative_decoder_norm(), torch.full((20,), 0.5, dtype=torch.float64))


def test_seed_makes_init_reproducible():
    assert torch.equal(make(seed=3).W_enc, make(seed=3).W_enc)
    assert not torch.equal(make(seed=3).W_enc, make(seed=4).W_enc)


def test_encode_decode_match_explicit_sums():
    model = randomize(make("relu", n_models=3))
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    pre = torch.stack([sum(x[b, m] @ model.W_enc[m] for m in range(3)) + model.b_enc for b in range(4)])
    torch.testing.assert_close(model.pre_activations(x), pre)
    f = model.encode(x)
    torch.testing.assert_close(f, pre.clamp_min(0))
    x_hat = torch.stack([
        torch.stack([sum(f[b, j] * model.W_dec[j, m] for j in range(20)) + model.b_dec[m] for m in range(3)])
        for b in range(4)
    ])
    torch.testing.assert_close(model.decode(f), x_hat)


@pytest.mark.parametrize("mode", ["crosscoder", "sae", "mixed", "none"])
def test_code_norm_modes(mode):
    model = randomize(make(code_normalization=mode))
    per_model = model.W_dec.norm(dim=-1)
    expected = {
        "crosscoder": per_model.sum(-1),
        "sae": model.W_dec.reshape(20, -1).norm(dim=-1),
        "mixed": 1.0 * model.W_dec.reshape(20, -1).norm(dim=-1) + 0.1 * per_model.sum(-1),
        "none": torch.ones(20, dtype=torch.float64),
    }[mode]
    torch.testing.assert_close(model.code_norm(), expected)


def test_batchtopk_training_keeps_exactly_kB_selected_by_scaled_value_with_raw_values():
    model = randomize(make("batchtopk", k=3))
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    raw = model.pre_activations(x).clamp_min(0)
    f = model.encode(x, use_threshold=False)
    assert int((f != 0).sum()) == 3 * 5
    nonzero = f != 0
    torch.testing.assert_close(f[nonzero], raw[nonzero])  # raw values kept
    scaled = model.scale(raw)
    assert scaled[nonzero].min() >= scaled[~nonzero].max()  # selection by scaled value


def test_batchtopk_inference_uses_threshold():
    model = randomize(make("batchtopk", k=3))
    x = torch.randn(50, 2, 6, dtype=torch.float64)
    raw = model.pre_activations(x).clamp_min(0)
    model.threshold.fill_(1.5)
    f = model.encode(x)
    keep = model.scale(raw) > 1.5
    torch.testing.assert_close(f, raw * keep)
    assert int((f != 0).sum()) != 3 * 50  # not batch top-k
    model.threshold.fill_(-1.0)  # not learned yet: falls back to batch top-k
    assert int((model.encode(x) != 0).sum()) == 3 * 50


def test_topk_is_per_token():
    model = randomize(make("topk", k=2))
    f = model.encode(torch.randn(7, 2, 6, dtype=torch.float64))
    assert ((f != 0).sum(dim=1) == 2).all()


def test_relative_norm_orientation():
    model = make("relu")
    with torch.no_grad():
        model.W_dec[0, 0] = 0  # latent 0 exists only in the chat model
        model.W_dec[1, 1] = 0  # latent 1 exists only in the base model
    dnorm = model.relative_decoder_norm()
    assert dnorm[0] == 1.0 and dnorm[1] == 0.0 and dnorm[2] == 0.5


def test_normalize_roundtrip():
    model = make(input_scale=[2.0, 0.5])
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(model.normalize(x)[:, 0], 2 * x[:, 0])
    torch.testing.assert_close(model.denormalize(model.normalize(x)), x)


def test_save_load_roundtrip(tmp_path):
    model = randomize(make("batchtopk", input_scale=[2.0, 0.5], model_names=["base", "chat"], layer=3)).float()
    model.threshold.fill_(0.25)
    model.save_pretrained(tmp_path / "cc")
    loaded = CrossCoder.from_pretrained(tmp_path / "cc")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.config.threshold == 0.25 and loaded.config.layer == 3
    x = torch.randn(9, 2, 6)
    assert torch.equal(model(x), loaded(x))
    saved = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert saved["threshold"] == 0.25 and saved["input_scale"] == [2.0, 0.5] and saved["k"] == 3


def test_bad_inputs_are_one_line_errors(tmp_path):
    model = make()
    with pytest.raises(CrossdiffError, match=r"shape \[batch, 2, 6\]"):
        model.encode(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(CrossdiffError, match="needs a positive k"):
        CrossCoderConfig(d_in=4, d_sae=8, activation="batchtopk")
    model.float().save_pretrained(tmp_path / "cc")
    (tmp_path / "cc" / "model.safetensors").unlink()
    with pytest.raises(CrossdiffError, match="missing model.safetensors"):
        CrossCoder.from_pretrained(tmp_path / "cc")
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    config["d_sea"] = 3
    (tmp_path / "cc" / "config.json").write_text(json.dumps(config))
    make().float().save_pretrained(tmp_path / "cc2")
    (tmp_path / "cc2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CrossdiffError, match="unknown config key 'd_sea'.*did you mean 'd_sae'"):
        CrossCoder.from_pretrained(tmp_path / "cc2")


def test_push_to_hub_uploads_the_checkpoint_folder(tmp_path):
    uploaded = {}

    class RecordingApi:  # stands in for the network; records what would be uploaded
        def create_repo(self, repo_id, private, exist_ok):
            uploaded["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
            uploaded["model"] = CrossCoder.from_pretrained(folder_path)

    model = make().float()
    model.push_to_hub("me/cc", api=RecordingApi())
    assert uploaded["repo"] == "me/cc"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(uploaded["model"].W_dec, model.W_dec)


def test_missing_hub_repo_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CrossdiffError, match="neither a local folder nor a loadable hub repository"):
        CrossCoder.from_pretrained("nobody/not-a-real-crosscoder")
