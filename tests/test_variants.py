"""Crosscoder variants (docs/method.md 8): DFC, Matryoshka BatchTopK, Delta-Crosscoder.

Hand computations on tiny inputs, the DFC import against outputs of dfc_learning's own code
(tests/fixtures/dfc, made by make_fixtures.py there), training through the Trainer, and the
planted-feature recovery every variant must match BatchTopK on.
"""

import json
from pathlib import Path

import pytest
import torch

from crossdiff.cli import main
from crossdiff.config import from_dict
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.errors import CrossdiffError
from crossdiff.files import load_tensors
from crossdiff.train.losses import crosscoder_losses, delta_loss, matryoshka_reconstruction
from crossdiff.partition import allowed_latents, largest_forbidden, partition_sizes, zero_forbidden
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.trainer import TrainConfig, Trainer, synthetic_recovery

FIXTURES = Path(__file__).parent / "fixtures" / "dfc"


def small_config(**overrides) -> TrainConfig:
    base = dict(d_sae=32, k=2, batch_size=16, steps=10, lr=1e-2, warmup_steps=3, threshold_start_step=1,
                dead_after_tokens=32, log_every=2, checkpoint_every=4, seed=3)
    return from_dict(TrainConfig, {**base, **overrides})


def synthetic_batches(d_in=8, batch_size=16, seed=1):
    pair = SyntheticPair(SyntheticConfig(d_in=d_in, n_shared=6, n_chat_only=2, n_base_only=2, n_different=2, p_active=0.2))
    return pair.batches(batch_size, seed=seed)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------- DFC: the partition by hand
def test_partition_layout_by_hand():
    assert partition_sizes(40, 0.1, 0.15) == [4, 6]  # dfc_learning's int(D * pct), 40 * 0.15 = 6.000000000000001
    assert partition_sizes(100, 0.29, 0.0) == [28, 0]  # 100 * 0.29 = 28.999999999999996, rounded down as there
    allowed = allowed_latents([1, 2], 5)  # latent 0 base-only, 1-2 chat-only, 3-4 shared
    assert allowed.tolist() == [[True, False], [False, True], [False, True], [True, True], [True, True]]
    W_enc, W_dec = torch.ones(2, 3, 5), torch.ones(5, 2, 3)
    zero_forbidden(W_enc, W_dec, allowed)
    assert W_enc[0].sum(0).tolist() == [3, 0, 0, 3, 3] and W_enc[1].sum(0).tolist() == [0, 3, 3, 3, 3]
    assert W_dec[:, 0].sum(1).tolist() == [3, 0, 0, 3, 3] and W_dec[:, 1].sum(1).tolist() == [0, 3, 3, 3, 3]
    assert largest_forbidden(W_enc, W_dec, allowed) == 0.0


def test_dfc_crosscoder_starts_partitioned_with_exact_relative_norms():
    model = CrossCoder(CrossCoderConfig(d_in=4, d_sae=10, activation="batchtopk", k=2, dfc_partition=[2, 3]), seed=0)
    assert largest_forbidden(model.W_enc, model.W_dec, model.partition_allowed) == 0.0
    dnorm = model.relative_decoder_norm()
    assert dnorm[:2].tolist() == [0.0, 0.0] and dnorm[2:5].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(dnorm[5:], torch.full((5,), 0.5))
    # a chat-exclusive latent reads the chat activation only
    x = torch.zeros(1, 2, 4)
    x[0, 0] = torch.randn(4)
    assert torch.equal(model.pre_activations(x)[0, 2:5], model.b_enc[2:5])


@pytest.mark.parametrize("partition,why", [([30, 20], "does not fit the dictionary"), ([-1, 2], "non-negative")])
def test_partition_that_does_not_fit_is_one_line(partition, why):
    with pytest.raises(CrossdiffError) as excinfo:
        CrossCoderConfig(d_in=4, d_sae=40, activation="relu", dfc_partition=partition)
    assert why in one_line_error(excinfo)
    with pytest.raises(CrossdiffError) as excinfo:
        CrossCoderConfig(d_in=4, d_sae=40, n_models=3, activation="relu", dfc_partition=[1, 1])
    assert "two models" in one_line_error(excinfo)


# ---------------------------------------------------------------------- DFC: training
@pytest.mark.parametrize("sparse", [False, True])
def test_dfc_forbidden_blocks_stay_exactly_zero_in_training(tmp_path, one_thread, sparse):
    # dead_after_tokens = 16 (one batch): the aux-k loss is active from the second step on
    config = small_config(variant="dfc", dfc_fractions=[0.25, 0.25], sparse=sparse, dead_after_tokens=16, steps=12)
    trainer = Trainer(config, 8, tmp_path, quiet=True)
    model = trainer.fit(synthetic_batches())
    allowed = model.partition_allowed
    assert model.config.dfc_partition == [8, 8]
    W_enc0 = CrossCoder(model.config, seed=3).W_enc  # the init, to show the allowed blocks did train
    assert not torch.equal(model.W_enc[0][:, :8], W_enc0[0][:, :8])
    assert largest_forbidden(model.W_enc, model.W_dec, allowed) == 0.0
    state = trainer.optimizer.state_dict()["state"]
    params = [name for name, _ in model.named_parameters()]
    for moment in ("exp_avg", "exp_avg_sq"):
        enc, dec = state[params.index("W_enc")][moment], state[params.index("W_dec")][moment]
        assert largest_forbidden(enc, dec, allowed) == 0.0, moment
        assert enc.abs().max() > 0 and dec.abs().max() > 0  # Adam did move the allowed blocks
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(line["aux"] > 0 for line in lines)  # the aux-k loss ran, and was kept out of the forbidden blocks
    loaded = CrossCoder.from_pretrained(tmp_path / "crosscoder")
    assert loaded.config.dfc_partition == [8, 8]
    assert loaded.relative_decoder_norm()[8:16].tolist() == [1.0] * 8  # chat-exclusive: no base decoder at all
    assert loaded.relative_decoder_norm()[:8].tolist() == [0.0] * 8


def test_unmasked_gradients_would_reach_the_forbidden_blocks(one_thread):
    """Not vacuous: reconstruction and the aux-k loss both have gradients in the forbidden
    blocks, which mask_forbidden_gradients removes."""
    model = CrossCoder(CrossCoderConfig(d_in=8, d_sae=32, activation="batchtopk", k=2, code_normalization="none", dfc_partition=[8, 8]), seed=0)
    x = next(synthetic_batches())
    grads = {}
    for alpha in (0.0, 1.0):
        model.zero_grad()
        terms = crosscoder_losses(model, x, auxk_alpha=alpha, tokens_since_fired=torch.full((32,), 10**9), dead_after_tokens=1)
        terms.loss.backward()
        grads[alpha] = model.W_dec.grad.clone()
    assert terms.sparsity > 0
    forbidden = ~model.partition_allowed[:, :, None].expand_as(model.W_dec)
    assert grads[0.0][forbidden].abs().max() > 0  # reconstruction
    assert not torch.equal(grads[1.0][forbidden], grads[0.0][forbidden])  # aux-k
    model.mask_forbidden_gradients()
    assert largest_forbidden(model.W_enc.grad, model.W_dec.grad, model.partition_allowed) == 0.0


@pytest.mark.parametrize("variant,options", [("dfc", {}), ("matryoshka", {"matryoshka_prefixes": [0.25, 0.5, 1.0]}),
                                             ("delta", {"delta_weight": 0.5})])
def test_variant_resume_is_exact(tmp_path, one_thread, variant, options):
    config = small_config(variant=variant, **options)
    reference = Trainer(config, 8, tmp_path / "straight", quiet=True)
    reference.fit(synthetic_batches())
    stopped = small_config(variant=variant, **options, steps=4)  # `steps` may change on resume
    Trainer(stopped, 8, tmp_path / "resumed", quiet=True).fit(synthetic_batches())
    resumed = Trainer(config, 8, tmp_path / "resumed", quiet=True)
    resumed.fit(synthetic_batches())
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    if variant == "delta":
        assert "delta" in json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])


# ---------------------------------------------------------------------- DFC: import of dfc_learning
@pytest.mark.parametrize("name", ["dfc_batchtopk", "dfc_l1"])
def test_dfc_learning_checkpoint_imports_exactly(name):
    state = load_tensors(FIXTURES / f"{name}.pt")
    outputs = load_tensors(FIXTURES / f"{name}_outputs.pt")
    model = CrossCoder.from_pretrained(FIXTURES / f"{name}.pt")
    pct = state["_partition_config"]
    assert model.config.dfc_partition == [int(40 * pct["model_a_exclusive_pct"]), int(40 * pct["model_b_exclusive_pct"])]
    # the weights are the original bits (the decoder transposed to crossdiff's layout)
    assert torch.equal(model.W_enc, state["encoder.weight"]) and torch.equal(model.b_enc, state["encoder.bias"])
    assert torch.equal(model.W_dec, state["decoder.weight"].permute(1, 0, 2)) and torch.equal(model.b_dec, state["decoder.bias"])
    assert model.config.activation == ("batchtopk" if "k" in state else "relu")
    with torch.no_grad():
        f = model.encode(outputs["x"])
        # the same latents fire as in dfc_learning; values agree up to float32 summation order
        assert torch.equal(f != 0, outputs["f"] != 0)
        assert 0 < int((f != 0).sum()) < f.numel()
        torch.testing.assert_close(f, outputs["f"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.denormalize(model.decode(f)), outputs["x_hat"], rtol=1e-6, atol=1e-6)
        if "f_scaled" in outputs:
            torch.testing.assert_close(model.get_activations(outputs["x"]), outputs["f_scaled"], rtol=1e-6, atol=1e-6)
        # in float64 on both sides of the comparison, the difference is float32 rounding of theirs only
        model64 = CrossCoder.from_pretrained(FIXTURES / f"{name}.pt", dtype=torch.float64)
        torch.testing.assert_close(model64.encode(outputs["x"].double()).float(), outputs["f"], rtol=1e-6, atol=1e-6)


def test_dfc_import_round_trips_through_save_pretrained(tmp_path):
    model = CrossCoder.from_pretrained(FIXTURES / "dfc_batchtopk.pt")
    model.save_pretrained(tmp_path / "cc")
    again = CrossCoder.from_pretrained(tmp_path / "cc")
    assert again.config.dfc_partition == [4, 6]
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


@pytest.mark.parametrize("change,why", [
    (lambda s: s["_partition_config"].update(dict_size=50), "made for a dictionary of 50 latents, the weights have 40"),
    (lambda s: s["_partition_config"].update(model_a_exclusive_pct=0.7, model_b_exclusive_pct=0.6), "does not fit the dictionary"),
    (lambda s: s["decoder.weight"][0, 5].fill_(0.3), "forbidden encoder/decoder blocks hold values up to 0.3"),
    (lambda s: s.update(_partition_config={"dict_size": 40}), "_partition_config must hold"),
])
def test_dfc_checkpoint_whose_partition_does_not_fit_is_one_line(tmp_path, change, why):
    state = load_tensors(FIXTURES / "dfc_batchtopk.pt")
    change(state)
    torch.save(state, tmp_path / "dfc.pt")
    with pytest.raises(CrossdiffError) as excinfo:
        CrossCoder.from_pretrained(tmp_path / "dfc.pt")
    assert why in one_line_error(excinfo)


# ---------------------------------------------------------------------- Matryoshka and Delta by hand
def hand_model() -> CrossCoder:
    """n=2, d=1, D=3, no code normalisation: x = [[1, 2]] gives pre = [3, 2, 1]."""
    model = CrossCoder(CrossCoderConfig(d_in=1, d_sae=3, activation="batchtopk", k=2, code_normalization="none"))
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor([[[1.0, 0.0, 1.0]], [[1.0, 1.0, 0.0]]]))
        model.W_dec.copy_(torch.tensor([[[0.1], [0.2]], [[0.3], [0.1]], [[1.0], [1.0]]]))
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model


X = torch.tensor([[[1.0], [2.0]]])
# Batch top-2 of pre = [3, 2, 1] keeps f = [3, 2, 0]. Prefix reconstructions (base, chat):
#   m=1: 3*[0.1, 0.2] = [0.3, 0.6]      errors [0.7, 1.4]
#   m=2: + 2*[0.3, 0.1] -> [0.9, 0.8]   errors [0.1, 1.2]
#   m=3: f_2 = 0, as m=2
MATRYOSHKA_L2 = ((0.7 + 1.4) / 2 + (0.1 + 1.2) / 2 * 2) / 3  # 0.78333...
MATRYOSHKA_SQUARED = ((0.49 + 1.96) / 2 + (0.01 + 1.44) / 2 * 2) / 3  # 0.891666...
# Delta: (x_chat - x_base) - (x_hat_chat - x_hat_base) = 1 - (0.8 - 0.9) = 1.1
DELTA_L2, DELTA_SQUARED = 1.1, 1.21


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kind,expected", [("l2", MATRYOSHKA_L2), ("squared", MATRYOSHKA_SQUARED)])
def test_matryoshka_loss_equals_its_definition(sparse, kind, expected):
    terms = crosscoder_losses(hand_model(), X, reconstruction=kind, matryoshka_sizes=[1, 2, 3], sparse=sparse)
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6)  # no dead latent: the aux-k term is 0
    assert terms.recon.item() == pytest.approx(expected, rel=1e-6)
    # the sizes [3] are the plain BatchTopK objective
    plain = crosscoder_losses(hand_model(), X, reconstruction=kind, sparse=sparse)
    assert crosscoder_losses(hand_model(), X, reconstruction=kind, matryoshka_sizes=[3], sparse=sparse).loss == plain.loss
    assert matryoshka_reconstruction(X, [X, X + 1], "squared").item() == pytest.approx(0.5)  # (0 + 1) / 2


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kind,delta,recon", [("l2", DELTA_L2, (0.1 + 1.2) / 2), ("squared", DELTA_SQUARED, (0.01 + 1.44) / 2)])
def test_delta_loss_equals_its_definition(sparse, kind, delta, recon):
    terms = crosscoder_losses(hand_model(), X, reconstruction=kind, delta_weight=0.5, sparse=sparse)
    assert terms.delta.item() == pytest.approx(delta, rel=1e-6)
    assert terms.loss.item() == pytest.approx(recon + 0.5 * delta, rel=1e-6)
    assert delta_loss(X, torch.zeros_like(X)).item() == pytest.approx(1.0)  # ||2 - 1||


def test_matryoshka_sparse_and_dense_agree_with_gradients(one_thread):
    x = next(synthetic_batches())
    grads = []
    for sparse in (False, True):
        model = CrossCoder(CrossCoderConfig(d_in=8, d_sae=32, activation="batchtopk", k=3), seed=1)
        terms = crosscoder_losses(model, x, matryoshka_sizes=[4, 12, 32], delta_weight=0.3, sparse=sparse)
        terms.loss.backward()
        grads.append((terms.loss.detach(), model.W_dec.grad, model.W_enc.grad))
    for dense, sparse in zip(*grads):
        torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- config errors
@pytest.mark.parametrize("options,why", [
    ({"variant": "dfc", "matryoshka_prefixes": [0.5, 1.0]},
     "config key 'matryoshka_prefixes' is an option of variant 'matryoshka', but this run's variant is 'dfc'"),
    ({"delta_weight": 1.0}, "config key 'delta_weight' is an option of variant 'delta', but this run's variant is 'standard'"),
    ({"variant": "matryoshka", "dfc_fractions": [0.1, 0.1]}, "'dfc_fractions' is an option of variant 'dfc'"),
    ({"variant": "delta", "activation": "relu"}, "built on top-k sparsity"),
    ({"variant": "matryoshka", "matryoshka_prefixes": [0.5, 0.25, 1.0]}, "must be increasing shares"),
    ({"variant": "dfc", "dfc_fractions": [0.6, 0.5]}, "sum <= 1"),
])
def test_variant_option_errors_are_one_line(options, why):
    with pytest.raises(CrossdiffError) as excinfo:
        from_dict(TrainConfig, options)
    assert why in one_line_error(excinfo)


def test_cli_variant_option_of_another_variant_is_one_line(tmp_path, capsys):
    argv = ["train", "--synthetic", "--out", str(tmp_path), "--set", "variant=delta", "--set", "dfc_fractions=[0.1,0.1]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("crossdiff: error: config key 'dfc_fractions' is an option of variant 'dfc', "
                   "but this run's variant is 'delta'")


def test_matryoshka_prefix_without_latents_is_one_line(tmp_path):
    with pytest.raises(CrossdiffError) as excinfo:
        Trainer(small_config(variant="matryoshka", matryoshka_prefixes=[0.01, 1.0]), 8, tmp_path, quiet=True)
    assert "each must hold at least one latent" in one_line_error(excinfo)


# ---------------------------------------------------------------------- planted truth
@pytest.mark.parametrize("variant", ["dfc", "matryoshka", "delta"])
def test_every_variant_recovers_planted_chat_only_features(tmp_path, one_thread, variant):
    """As tests/test_train.py's BatchTopK run: same data, same budget."""
    pair = SyntheticPair(SyntheticConfig(d_in=48, n_shared=40, n_chat_only=10, n_base_only=10, n_different=0))
    config = from_dict(TrainConfig, dict(
        d_sae=256, k=4, batch_size=256, steps=2000, lr=3e-3, warmup_steps=50, threshold_start_step=100,
        dead_after_tokens=50_000, log_every=500, checkpoint_every=0, variant=variant,
    ))
    model = Trainer(config, 48, tmp_path, quiet=True).fit(pair.batches(256, seed=1))
    result = synthetic_recovery(model, pair)
    chat_only = pair.features_of("chat_only")
    recall = float((result["best_cosines"][chat_only] > 0.9).float().mean())
    print(f"{variant}: chat-only recall {recall:.2f}, all planted features {result['recovered']:.3f}")
    assert recall >= 0.9, (variant, recall)
    assert bool((result["match_dnorm"][chat_only] > 0.9).all())
    # All 60 planted features: BatchTopK and DFC and Delta find >= 90%; Matryoshka's small first
    # prefix (16 latents) trades a few shared features for its coarse early latents (measured 0.87).
    assert result["recovered"] >= (0.85 if variant == "matryoshka" else 0.9)


def test_recipe_names_a_lone_crosscoder_after_its_variant(tmp_path):
    from crossdiff.recipe import recipe_from_dict

    recipe = recipe_from_dict({"run": {"out": str(tmp_path)}, "collect": {"base": "a", "chat": "b", "layer": 1, "sources": [{"name": "t", "kind": "text", "path": "t.txt"}]},
                               "train": {"variant": "dfc"}})
    assert list(recipe.crosscoders) == ["dfc"] and recipe.crosscoders["dfc"].variant == "dfc"
    with pytest.raises(CrossdiffError) as excinfo:
        recipe_from_dict({"run": {"out": str(tmp_path)}, "collect": {"base": "a", "chat": "b", "layer": 1, "sources": [{"name": "t", "kind": "text", "path": "t.txt"}]},
                          "crosscoders": {"m": {"variant": "matryoshka", "delta_weight": 2}}})
    assert "'delta_weight' is an option of variant 'delta'" in one_line_error(excinfo)


def test_trainer_refuses_given_dfc_weights_with_non_zero_forbidden_blocks(tmp_path):
    config = small_config(variant="dfc", dfc_fractions=[0.25, 0.25])
    trainer = Trainer(config, 8, tmp_path, quiet=True)
    given = CrossCoder(trainer.model.config, seed=5)
    trainer.model = given  # an intact partition is accepted
    with torch.no_grad():
        given.W_dec[9, 0, 2] = 1.5  # chat-exclusive latent 9 gains a base decoder entry
    with pytest.raises(CrossdiffError) as excinfo:
        trainer.model = given
    assert "forbidden encoder/decoder blocks hold values up to 1.5" in one_line_error(excinfo)
