"""The latent table: documented columns, tags, statistics against brute force, twins."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from crossdiff.analysis import COLUMNS, AnalysisConfig, TensorSource, analyze, find_twins, read_table, tag_latents
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig


def crosscoder_with_dnorms(dnorms: list[float], d_in: int = 16, seed: int = 0) -> CrossCoder:
    """Random directions; per-latent base/chat decoder norms chosen to give the requested dnorm."""
    cc = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=len(dnorms), activation="relu", norm_init_scale=1.0), seed=seed)
    with torch.no_grad():
        for j, r in enumerate(dnorms):
            # dnorm = 0.5 * ((c - b) / max(b, c) + 1): with max norm 1, c - b = 2r - 1.
            chat, base = (1.0, 2 - 2 * r) if r >= 0.5 else (2 * r, 1.0)
            cc.W_dec[j, 0] *= base
            cc.W_dec[j, 1] *= chat
    return cc


def test_tags_use_the_paper_thresholds():
    dnorm = np.array([0.95, 0.9, 0.85, 0.6, 0.5, 0.4, 0.3, 0.1, 0.05, np.nan])
    assert list(tag_latents(dnorm)) == ["chat-only", "other", "other", "shared", "shared", "shared", "other", "other",
                                        "base-only", "other"]


def make_source(n: int = 3000, d_in: int = 16, seed: int = 0) -> TensorSource:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, 2, d_in, generator=g)
    acts[:, 1] += 0.5 * acts[:, 0]
    doc_length = 50
    positions = torch.arange(n) % doc_length
    template = (torch.rand(n, generator=g) < 0.2) | (positions == 0)  # the cache may flag BOS too
    source_ids = ((torch.arange(n) // 500) % 2).long()
    return TensorSource(acts, token_ids=torch.randint(0, 100, (n,), generator=g), positions=positions,
                        doc_ids=torch.arange(n) // doc_length, template=template, source_ids=source_ids,
                        sources=["fineweb", "lmsys"])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    cc = crosscoder_with_dnorms([0.97, 0.5, 0.03, 0.75, 0.92, 0.45, 0.55, 0.08])
    with torch.no_grad():
        cc.b_enc.fill_(-0.5)
        cc.b_enc[7] = -1e6  # dead
    source = make_source()
    out = tmp_path_factory.mktemp("analysis")
    result = analyze(cc, source, out, AnalysisConfig(batch_size=256, examples=False, twin_cosine=0.0), progress=False)
    return cc, source, out, result


def test_table_has_the_documented_columns(analysed):
    _, _, out, result = analysed
    table = read_table(out)
    documented = [c for c in COLUMNS if "<source>" not in c]
    per_source = [f"{stat}__{src}" for stat in ("freq", "max_act") for src in ("fineweb", "lmsys")]
    assert set(table.columns) == set(documented) | set(per_source)
    assert list(table["latent"]) == list(range(8))
    assert list(table["tag"]) == ["chat-only", "shared", "base-only", "other", "chat-only", "shared", "shared",
                                  "base-only"]
    np.testing.assert_allclose(table["dnorm"], [0.97, 0.5, 0.03, 0.75, 0.92, 0.45, 0.55, 0.08], atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tags"] == {"chat-only": 2, "base-only": 2, "shared": 3, "other": 1}
    assert summary["dead"] == 1 and summary["n_tokens"] == 3000
    assert summary["columns"] == COLUMNS
    assert summary["files"] == {"table": "latents.parquet", "summary": "summary.json", "twins": "twins.parquet"}
    assert result.summary == summary


def test_statistics_equal_brute_force(analysed):
    cc, source, _, result = analysed
    t = result.table
    b = source.batch
    with torch.no_grad():
        fs = cc.get_activations(cc.normalize(b.acts)).double()
        x = cc.normalize(b.acts).double()
        x_hat = cc.decode(cc.encode(cc.normalize(b.acts))).double()
    active = fs > 1e-3
    np.testing.assert_array_equal(t["n_active"], active.sum(0).numpy())
    np.testing.assert_allclose(t["freq"], active.double().mean(0).numpy())
    np.testing.assert_allclose(t["max_act"], fs.max(0).values.numpy(), rtol=1e-6)
    for s, name in enumerate(["fineweb", "lmsys"]):
        rows = b.source_ids == s
        np.testing.assert_allclose(t[f"freq__{name}"], active[rows].double().mean(0).numpy())
        np.testing.assert_allclose(t[f"max_act__{name}"], fs[rows].max(0).values.numpy(), rtol=1e-6)
    bos = b.positions == 0
    template = b.template & ~bos
    live = ~t["dead"].to_numpy()
    expected_template = (active & template[:, None]).sum(0) / (active & ~bos[:, None]).sum(0)
    expected_bos = (active & bos[:, None]).sum(0) / active.sum(0)
    np.testing.assert_allclose(t["template_share"][live], expected_template.numpy()[live])
    np.testing.assert_allclose(t["bos_share"][live], expected_bos.numpy()[live])
    assert list(t["dead"]) == [False] * 7 + [True]
    assert np.isnan(t["template_share"][7]) and np.isnan(t["bos_share"][7]) and np.isnan(t["beta_error_chat"][7])

    quality = result.summary["quality"]
    for m, name in enumerate(["base", "chat"]):
        err = (x[:, m] - x_hat[:, m]).square().sum()
        var = (x[:, m] - x[:, m].mean(0)).square().sum()
        assert quality[f"fve_{name}"] == pytest.approx(float(1 - err / var), rel=1e-6)
    assert quality["l0"] == pytest.approx(float((fs > 0).sum(1).double().mean()))


def test_twins_are_base_only_latents_pointing_the_same_way():
    cc = crosscoder_with_dnorms([1.0, 1.0, 0.0, 0.0, 0.5], d_in=8)
    with torch.no_grad():
        direction = torch.randn(8)
        cc.W_dec[0, 1] = direction  # chat-only latent 0 ...
        cc.W_dec[2, 0] = 3 * direction + 0.3 * torch.randn(8)  # ... has a base-only twin 2 (norm is irrelevant)
        cc.W_dec[3, 0] = -direction  # anti-parallel: no twin
        cc.W_dec[4, 0] = direction  # parallel but shared, not base-only: no twin
        cc.W_dec[4, 1] = direction
    tags = tag_latents(cc.relative_decoder_norm().detach().numpy())
    twins = find_twins(cc, tags == "chat-only", tags == "base-only", min_cosine=0.8)
    assert list(twins.columns) == ["chat_latent", "base_latent", "cosine"]
    assert twins[["chat_latent", "base_latent"]].values.tolist() == [[0, 2]]
    expected = torch.nn.functional.cosine_similarity(cc.W_dec[0, 1], cc.W_dec[2, 0], dim=0).detach()
    assert twins["cosine"][0] == pytest.approx(float(expected))
    just_above = float(expected) + 1e-4
    assert find_twins(cc, tags == "chat-only", tags == "base-only", min_cosine=just_above).empty


def test_twins_file_is_written(analysed):
    _, _, out, result = analysed
    twins = pd.read_parquet(out / "twins.parquet")
    # twin_cosine=0: every chat-only/base-only pair with a positive cosine is listed.
    assert not twins.empty and (twins["cosine"] > 0).all()
    assert set(twins["chat_latent"]) <= {0, 4} and set(twins["base_latent"]) <= {2, 7}
    table = result.table
    for chat_latent, group in twins.groupby("chat_latent"):
        assert table.loc[chat_latent, "twin"] == group.iloc[0]["base_latent"]
        assert group["cosine"].is_monotonic_decreasing
