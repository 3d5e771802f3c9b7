"""Max-activating and quantile examples: right tokens, right windows, right activations."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from crossdiff.analysis import AnalysisConfig, ExampleStore, TensorSource, analyze
from crossdiff.analysis.examples import best_per_group
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

N_TOP, BINS, PER_BIN, BEFORE, AFTER = 4, 5, 2, 6, 3


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_tokenizer):
    g = torch.Generator().manual_seed(0)
    n, d_in = 2400, 8
    cc = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=12, activation="batchtopk", k=3, norm_init_scale=1.0), seed=1)
    cc.threshold.fill_(0.8)
    # Documents of varying length, two sources, token ids from the tiny tokenizer's vocabulary.
    lengths = torch.randint(5, 60, (200,), generator=g)
    doc_ids = torch.repeat_interleave(torch.arange(200), lengths)[:n]
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(n) - starts[doc_ids]
    source = TensorSource(
        torch.randn(n, 2, d_in, generator=g),
        token_ids=torch.randint(10, 500, (n,), generator=g),
        doc_ids=doc_ids,
        positions=positions,
        source_ids=(doc_ids % 2).long(),
        sources=["fineweb", "lmsys"],
    )
    config = AnalysisConfig(batch_size=300, n_top=N_TOP, quantile_bins=BINS, per_bin=PER_BIN,
                            window_before=BEFORE, window_after=AFTER)
    out = tmp_path_factory.mktemp("examples")
    result = analyze(cc, source, out, config, tokenizer=tiny_tokenizer, progress=False)
    with torch.no_grad():
        f_scaled = cc.get_activations(cc.normalize(source.batch.acts))
    return cc, source, f_scaled, result


def test_top_examples_are_the_largest_activations(analysed):
    _, source, f_scaled, result = analysed
    b = source.batch
    with ExampleStore(result.files["examples"]) as store:
        for latent in range(12):
            top = store.examples(latent, "top")
            active = torch.nonzero(f_scaled[:, latent] > 1e-3).flatten()
            expected = active[f_scaled[active, latent].argsort(descending=True)][:N_TOP]
            assert [e.rank for e in top] == list(range(len(expected)))
            np.testing.assert_allclose([e.activation for e in top], f_scaled[expected, latent].numpy(), rtol=1e-6)
            assert [(e.doc_id, e.position) for e in top] == [(int(b.doc_ids[i]), int(b.positions[i])) for i in expected]
            assert [e.source for e in top] == [["fineweb", "lmsys"][int(b.source_ids[i])] for i in expected]
            if latent == 0:
                assert len(top) == N_TOP
            if len(expected):
                assert result.table.loc[latent, "max_act"] == pytest.approx(top[0].activation, rel=1e-6)


def test_windows_hold_the_document_tokens_and_activations(analysed):
    _, source, f_scaled, result = analysed
    b = source.batch
    index = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(b.doc_ids, b.positions))}
    n_checked = 0
    with ExampleStore(result.files["examples"]) as store:
        for latent in range(12):
            for ex in store.examples(latent):
                rows = [index[(ex.doc_id, p)] for p in range(ex.window_start, ex.window_start + len(ex.token_ids))]
                assert ex.window_start == max(0, ex.position - BEFORE)
                assert ex.token_index == ex.position - ex.window_start
                doc_len = int((b.doc_ids == ex.doc_id).sum())
                assert ex.window_start + len(ex.token_ids) == min(doc_len, ex.position + AFTER + 1)
                assert ex.token_ids == [int(b.token_ids[r]) for r in rows]
                np.testing.assert_allclose(ex.activations, f_scaled[rows, latent].numpy(), atol=1e-6)
                assert ex.activations[ex.token_index] == pytest.approx(ex.activation, abs=1e-6)
                assert ex.tokens == [store.vocab[t] for t in ex.token_ids] and all(isinstance(t, str) for t in ex.tokens)
                n_checked += 1
    assert n_checked > 12 * N_TOP


def test_quantile_samples_fall_in_their_bins(analysed):
    _, _, f_scaled, result = analysed
    with ExampleStore(result.files["examples"]) as store:
        for latent in range(12):
            values = f_scaled[:, latent]
            values = values[values > 1e-3]
            if not len(values):
                assert store.examples(latent) == []
                continue
            bins = (values / values.max() * BINS).long().clamp(max=BINS - 1)
            samples = store.examples(latent, "quantile")
            for b in range(BINS):
                in_bin = [e for e in samples if e.rank == b]
                assert len(in_bin) == min(PER_BIN, int((bins == b).sum()))
                for e in in_bin:
                    assert b / BINS - 1e-6 <= e.activation / float(values.max()) <= (b + 1) / BINS + 1e-6


def test_histograms_count_every_active_token_per_source_and_bin(analysed):
    """Brute force: bin every active token of each latent by its fraction of the latent's max, per source."""
    _, source, f_scaled, result = analysed
    sources = source.batch.source_ids.numpy()
    with ExampleStore(result.files["examples"]) as store:
        assert store.meta["histogram_bins"] == BINS
        for latent in range(12):
            values = f_scaled[:, latent].double().numpy()
            active = values > 1e-3
            expected = np.zeros((2, BINS), dtype=np.int64)
            if active.any():
                bins = np.clip((values[active] / values.max() * BINS).astype(int), 0, BINS - 1)
                np.add.at(expected, (sources[active], bins), 1)
            np.testing.assert_array_equal(store.histogram(latent), expected)
            assert store.histogram(latent).sum() == active.sum()


def test_token_texts_come_from_the_tokenizer(analysed, tiny_tokenizer):
    *_, result = analysed
    with sqlite3.connect(result.files["examples"]) as db:
        vocab = dict(db.execute("SELECT id, text FROM tokens"))
    assert vocab and all(text == tiny_tokenizer.decode([i]) for i, text in vocab.items())


def test_best_per_group_keeps_the_k_best_of_each_group():
    group = torch.tensor([3, 1, 3, 3, 1, 2, 3])
    score = torch.tensor([0.5, 0.1, 0.9, 0.7, 0.2, 0.3, 0.1])
    kept = best_per_group(group, score, 2)
    assert sorted(kept.tolist()) == [1, 2, 3, 4, 5]
