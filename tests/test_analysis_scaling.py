"""Latent Scaling: the one-pass betas against a brute-force least-squares fit, and the
planted artifacts (Complete Shrinkage, Latent Decoupling, genuine chat-only latents)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from crossdiff.analysis import AnalysisConfig, LatentScaling, TensorSource, analyze
from crossdiff.analysis import scaling as scaling_module
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.synthetic import SyntheticConfig, SyntheticPair

TARGETS = ["error_base", "error_chat", "recon_base", "recon_chat", "act_base", "act_chat"]


def random_crosscoder(activation: str, *, d_in: int = 12, d_sae: int = 40, seed: int = 0) -> CrossCoder:
    """A float64 crosscoder with independent random base/chat weights, biases, an input scale,
    one latent whose chat decoder is zero and one that can never fire."""
    g = torch.Generator().manual_seed(seed)
    k = 3 if activation != "relu" else None
    cc = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, input_scale=[0.5, 2.0]))
    cc = cc.double()
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=g, dtype=torch.float64) / math.sqrt(d_in))
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=g, dtype=torch.float64) / math.sqrt(d_in))
        cc.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64) - 0.2)
        cc.b_dec.copy_(torch.randn(cc.b_dec.shape, generator=g, dtype=torch.float64))
        cc.W_dec[0, 1] = 0.0  # chat decoder zero: no direction to scale along -> NaN
        cc.W_enc[:, :, 1] = 0.0
        cc.b_enc[1] = -1.0  # never fires -> NaN
        if activation == "batchtopk":
            cc.threshold.fill_(1.0)
    return cc


def brute_force_betas(cc: CrossCoder, acts: torch.Tensor) -> dict[str, np.ndarray]:
    """Per latent, build every target for every token and solve the 1-D least squares with lstsq."""
    x = cc.normalize(acts)
    f = cc.encode(x)
    x_hat = cc.decode(f)
    out = {name: np.full(cc.config.d_sae, np.nan) for name in TARGETS}
    for j in range(cc.config.d_sae):
        d = cc.W_dec[j, 1]
        if not (f[:, j] > 0).any() or d.norm() == 0:
            continue
        design = (f[:, j, None] * d).reshape(-1, 1)  # b * f_j(x) d_j, all tokens stacked
        for m, model in enumerate(["base", "chat"]):
            targets = {
                f"error_{model}": x[:, m] - x_hat[:, m] + f[:, j, None] * cc.W_dec[j, m],
                f"recon_{model}": x_hat[:, m],
                f"act_{model}": x[:, m],
            }
            for name, y in targets.items():
                out[name][j] = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.item()
    return out


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_betas_equal_brute_force_least_squares(activation, path, monkeypatch, tmp_path):
    # Force one accumulation path: 0 -> always dense products, 2 -> always sampled (sparse) ones.
    monkeypatch.setattr(scaling_module, "_SPARSE_DENSITY", 0.0 if path == "dense" else 2.0)
    cc = random_crosscoder(activation)
    acts = torch.randn(700, 2, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    expected = brute_force_betas(cc, acts)
    f = cc.encode(cc.normalize(acts))
    assert (f[:, 2:] > 0).any(0).all(), "every other latent fires at least once"

    result = analyze(cc, TensorSource(acts), tmp_path, AnalysisConfig(batch_size=128, dtype="float64", examples=False),
                     progress=False)
    table = result.table
    for name in TARGETS:
        got = table[f"beta_{name}"].to_numpy()
        assert np.isnan(got[:2]).all(), f"{name}: latents 0 (no chat decoder) and 1 (never fires) give NaN"
        np.testing.assert_allclose(got[2:], expected[name][2:], rtol=1e-8, atol=0, err_msg=name)
    np.testing.assert_allclose(table["nu_error"][2:], expected["error_base"][2:] / expected["error_chat"][2:], rtol=1e-8)
    np.testing.assert_allclose(table["nu_recon"][2:], expected["recon_base"][2:] / expected["recon_chat"][2:], rtol=1e-8)
    assert (table["scaling_tokens"].to_numpy() == (f > 0).sum(0).numpy()).all()


def test_accumulation_does_not_depend_on_batching():
    cc = random_crosscoder("relu")
    acts = torch.randn(300, 2, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    for batch_size in (300, 7):
        scaler = LatentScaling(cc.W_dec)
        for chunk in acts.split(batch_size):
            x = cc.normalize(chunk)
            f = cc.encode(x)
            scaler.update(f, x, cc.decode(f))
        results.append(scaler.result())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10)


# ---------------------------------------------------------------- planted artifacts
BASE_STRENGTH = 0.6


@pytest.fixture(scope="module")
def planted():
    """Synthetic pair: features 0-3 shared, 4 chat-only, 5 in both but at strength 0.6 in the
    base. Hand-set crosscoder (latent: meaning):

    0-2  shared features 1-3 (true decoders)
    3    feature 0, chat decoder only   \\  Latent Decoupling: the shared feature 0 is split
    4    feature 0, base decoder only   /  into a chat-only latent and its base-only twin
    5    chat-only feature 4            genuinely chat-only
    6    feature 5, base decoder zeroed Complete Shrinkage (the base still has it at 0.6)
    """
    pair = SyntheticPair(SyntheticConfig(d_in=64, n_shared=4, n_chat_only=1, n_base_only=0, n_different=1,
                                         base_strength=BASE_STRENGTH, p_active=0.03, noise=0.01, seed=3))
    truth = pair.decoder_truth  # [6, 2, 64]
    encoder = torch.linalg.pinv(truth[:, 1])  # reads each feature's code off the chat activation
    feature_of_latent = [1, 2, 3, 0, 0, 4, 5]
    cc = CrossCoder(CrossCoderConfig(d_in=64, d_sae=7, activation="relu"))
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[1] = encoder[:, feature_of_latent]
        cc.b_enc.fill_(-0.05)  # silences the noise-level activations
        cc.W_dec.copy_(truth[feature_of_latent])
        cc.W_dec[3, 0] = 0.0  # decoupled: chat part only ...
        cc.W_dec[4, 1] = 0.0  # ... and its base-only twin
        cc.W_dec[6, 0] = 0.0  # shrunk base decoder
        cc.b_dec.zero_()
    acts = pair.sample(20_000, torch.Generator().manual_seed(4)).acts
    return cc, acts


def test_planted_artifacts_are_recognised(planted, tmp_path):
    cc, acts = planted
    result = analyze(cc, TensorSource(acts), tmp_path, AnalysisConfig(batch_size=4096, examples=False), progress=False)
    t = result.table.set_index("latent")
    assert list(t["tag"].iloc[3:]) == ["chat-only", "base-only", "chat-only", "chat-only"]
    assert (t["tag"].iloc[:3] == "shared").all()
    # The chat error target keeps the latent's own contribution: beta about 1 for every faithful latent.
    np.testing.assert_allclose(t.loc[[3, 5, 6], "beta_error_chat"], 1.0, atol=0.05)

    shrunk, decoupled, genuine = t.loc[6], t.loc[3], t.loc[5]
    assert shrunk["nu_error"] == pytest.approx(BASE_STRENGTH, abs=0.03)
    assert abs(shrunk["nu_recon"]) < 0.05
    assert decoupled["nu_recon"] == pytest.approx(1.0, abs=0.03)
    assert abs(decoupled["nu_error"]) < 0.05
    assert abs(genuine["nu_error"]) < 0.05 and abs(genuine["nu_recon"]) < 0.05

    assert list(t.loc[[3, 5, 6], "chat_specific"]) == [False, True, False]
    assert list(t.loc[[3, 5, 6], "complete_shrinkage"]) == [False, False, True]
    assert list(t.loc[[3, 5, 6], "latent_decoupling"]) == [True, False, False]
    # The twin search finds the decoupled latent's base-only partner.
    assert t.loc[3, "twin"] == 4 and t.loc[3, "twin_cos"] == pytest.approx(1.0)
    assert t.loc[5, "twin"] == -1 and t.loc[6, "twin"] == -1

    co = result.summary["chat_only"]
    assert (co["total"], co["chat_specific"], co["complete_shrinkage"], co["latent_decoupling"], co["with_twin"]) == (
        3, 1, 1, 1, 1)


def test_summary_ranks_and_finds_chat_specific_latents_below_the_tag_threshold(planted, tmp_path):
    cc, acts = planted
    cc = copy.deepcopy(cc)
    with torch.no_grad():
        cc.W_dec[5, 0] = 0.4 * cc.W_dec[5, 1]  # the genuine chat-only latent now has dnorm 0.8
    result = analyze(cc, TensorSource(acts), tmp_path, AnalysisConfig(batch_size=4096, examples=False), progress=False)
    t = result.table.set_index("latent")
    assert t.loc[5, "dnorm"] == pytest.approx(0.8) and t.loc[5, "tag"] == "other"
    assert t.loc[5, "verdict"] == "chat-specific" and t.loc[5, "nu_recon"] == pytest.approx(0.4, abs=0.03)
    assert list(t.loc[[3, 6], "verdict"]) == ["latent decoupling", "complete shrinkage"]
    findings = result.summary["findings"]
    assert findings["chat_specific"]["total"] == 1 and findings["chat_specific"]["latents"][0]["latent"] == 5
    assert findings["chat_specific"]["by_tag"]["other"] == 1
    for group, counts in findings["verdicts"].items():  # disjoint: the counts add up
        size = {"all": 7, "chat_only": 2, "chat_leaning": int((t["dnorm"] > 0.5).sum())}[group]
        assert sum(counts.values()) == size, group
    by_dnorm = [row["latent"] for row in findings["top_by_dnorm"]]
    assert by_dnorm[:2] in ([3, 6], [6, 3]) and 5 in by_dnorm
    assert findings["top_by_rank_sum"][0]["latent"] == 5
    assert sum(findings["dnorm"]["histogram"]["counts"][15:17]) == 1  # dnorm 0.8, at the edge of two bins
    assert sum(findings["dnorm"]["histogram"]["counts"]) == findings["dnorm"]["n"] == 7
    from crossdiff.analysis.table import format_summary

    text = format_summary(result.summary)
    assert "chat-specific latents at any dnorm: 1" in text and "verdicts, all latents: 7 =" in text


def test_base_direction_betas_equal_brute_force(tmp_path, monkeypatch):
    """The mirrored Latent Scaling (base decoder as the direction) against lstsq."""
    cc = random_crosscoder("relu")
    acts = torch.randn(500, 2, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = cc.normalize(acts)
    f = cc.encode(x)
    x_hat = cc.decode(f)
    result = analyze(cc, TensorSource(acts), tmp_path, AnalysisConfig(batch_size=97, dtype="float64", examples=False),
                     progress=False)
    table = result.table
    checked = 0
    for j in range(2, cc.config.d_sae):
        d = cc.W_dec[j, 0]
        if not (f[:, j] > 0).any():
            continue
        design = (f[:, j, None] * d).reshape(-1, 1)
        for m, model in enumerate(["base", "chat"]):
            targets = {f"error_{model}": x[:, m] - x_hat[:, m] + f[:, j, None] * cc.W_dec[j, m],
                       f"recon_{model}": x_hat[:, m], f"act_{model}": x[:, m]}
            for name, y in targets.items():
                expected = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.item()
                assert table.loc[j, f"base_dir_beta_{name}"] == pytest.approx(expected, rel=1e-8, abs=1e-12), (j, name)
                checked += 1
        assert table.loc[j, "base_dir_nu_error"] == pytest.approx(
            table.loc[j, "base_dir_beta_error_chat"] / table.loc[j, "base_dir_beta_error_base"], rel=1e-12)
    assert checked > 100
