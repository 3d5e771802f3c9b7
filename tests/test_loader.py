"""The training loader: coverage per epoch, windows, source mixing, filters, normalisation, resume, memory."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch

from crossdiff.cache.store import CacheWriter, PairedCache, ReadFilters
from crossdiff.errors import CrossdiffError
from crossdiff.train.loader import ShuffledPairLoader

D = 4


def make_cache(path, tokens_per_source: dict[str, int], *, shard_tokens=10, doc_len=5, seed=0) -> PairedCache:
    """A float32 cache whose activation [0, 0] encodes the token's (source, doc, position), so batches can be checked."""
    sources = list(tokens_per_source)
    writer = CacheWriter(path, models=("b", "c"), layer=0, d_model=D, sources=sources, dtype="float32",
                         shard_tokens=shard_tokens, bos_token_id=1)
    gen = torch.Generator().manual_seed(seed)
    doc_id = 0
    for source_id, source in enumerate(sources):
        left = tokens_per_source[source]
        while left:
            n = min(doc_len, left)
            if writer.room < n:
                writer.seal()
            acts = torch.randn(n, 2, D, generator=gen) * torch.tensor([1.0, 4.0]).view(1, 2, 1)
            acts[:, 0, 0] = torch.tensor([key(source_id, doc_id, p) for p in range(n)], dtype=torch.float32)
            writer.append(acts, [1] + [7] * (n - 1), [doc_id] * n, range(n), source_id, [False] * n)
            doc_id, left = doc_id + 1, left - n
        writer.seal()
    writer.finish()
    return PairedCache(path)


def key(source_id: int, doc_id: int, position: int) -> int:
    return source_id * 100_000 + doc_id * 100 + position


def keys(batch) -> list[int]:
    return [key(int(s), int(d), int(p)) for s, d, p in zip(batch.source_ids, batch.doc_ids, batch.positions)]


def test_each_token_exactly_once_per_epoch_in_a_new_order(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 93})
    loader = ShuffledPairLoader(cache, 8, window_shards=3, seed=3, epochs=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 2 * 12
    every = [keys(b) for b in batches]
    epoch1, epoch2 = sum(every[:12], []), sum(every[12:], [])
    all_keys = sorted(key(0, d, p) for d in range(19) for p in range(5) if d * 5 + p < 93)
    assert sorted(epoch1) == sorted(epoch2) == all_keys
    assert epoch1 != epoch2 and epoch1 != all_keys
    assert [len(b.acts) for b in batches[:12]] == [8] * 11 + [5]
    # the activations travel with their token
    for b in batches:
        assert keys(b) == [int(v) for v in b.acts[:, 0, 0]]


def test_a_batch_only_mixes_shards_of_one_window(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 200}, shard_tokens=10)
    shard_of = {}
    for i in range(len(cache.shards)):
        for d, p in zip(cache.tokens(i)["doc_id"], cache.tokens(i)["position"]):
            shard_of[(int(d), int(p))] = i
    for batch in ShuffledPairLoader(cache, 10, window_shards=2, seed=0):
        assert len({shard_of[(int(d), int(p))] for d, p in zip(batch.doc_ids, batch.positions)}) <= 4  # straddles <= 2 windows


def test_drop_last_gives_full_batches_only(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 93})
    loader = ShuffledPairLoader(cache, 8, seed=1, epochs=2, drop_last=True)
    sizes = [len(b.acts) for b in loader]
    assert sizes == [8] * 22 and len(loader) == 22


def test_source_ratio_fixes_each_batch_composition(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 120, "chat": 40})
    loader = ShuffledPairLoader(cache, 10, source_ratio={"web": 0.5, "chat": 0.5}, window_shards=2, seed=5, epochs=2)
    assert loader.steps_per_epoch == 40 // 5
    seen = Counter()
    for batch in loader:
        assert Counter(batch.source_ids.tolist()) == {0: 5, 1: 5}
        seen.update(keys(batch))
    chat = [k for k in seen if k >= 100_000]
    web = [k for k in seen if k < 100_000]
    assert len(chat) == 40 and all(seen[k] == 2 for k in chat)  # the scarce source: two full passes
    assert len(web) == 80 and all(seen[k] == 1 for k in web)  # the large one: no repeat before its pass ends
    uneven = ShuffledPairLoader(cache, 7, source_ratio={"web": 2, "chat": 1}, seed=0)
    assert all(Counter(b.source_ids.tolist()) == {0: 5, 1: 2} for b in uneven)


def test_bad_source_ratio_is_one_line(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 20, "chat": 20})
    with pytest.raises(CrossdiffError, match="unknown source 'lmsys'"):
        ShuffledPairLoader(cache, 4, source_ratio={"web": 1, "lmsys": 1})
    with pytest.raises(CrossdiffError, match="too few tokens"):
        ShuffledPairLoader(cache, 64, source_ratio={"web": 1, "chat": 1})


def test_filters_select_the_same_tokens_as_brute_force(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 60, "chat": 35})
    filters = ReadFilters(drop_bos=True, max_norm_ratio=1.3)
    expected = [k for b in cache.iter_batches(1000, filters=filters) for k in keys(b)]
    all_rows = torch.cat([b.acts for b in cache.iter_batches(1000)])
    norms = all_rows.norm(dim=-1).numpy()
    median = np.median(norms, axis=0)
    assert len(expected) == sum(
        1 for b in cache.iter_batches(1000) for i in range(len(b.acts))
        if int(b.positions[i]) != 0 and (b.acts[i].norm(dim=-1).numpy() <= 1.3 * median).all()
    )
    got = [k for b in ShuffledPairLoader(cache, 6, filters=filters, seed=2) for k in keys(b)]
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)


def test_normalization_scales_to_d_model_and_is_reported(tmp_path):
    cache = make_cache(tmp_path / "c", {"web": 80})
    raw = torch.cat([b.acts for b in cache.iter_batches(80)]).double()
    loader = ShuffledPairLoader(cache, 16, normalize=True, seed=0)
    expected = [(D / raw[:, m].pow(2).sum(-1).mean()).sqrt().item() for m in range(2)]
    assert loader.normalization == pytest.approx(expected, rel=1e-9)
    scaled = torch.cat([b.acts for b in loader]).double()
    assert scaled.pow(2).sum(-1).mean(0).tolist() == pytest.approx([D, D], rel=1e-5)
    assert ShuffledPairLoader(cache, 16).normalization == [1.0, 1.0]


@pytest.mark.parametrize("ratio", [None, {"web": 0.5, "chat": 0.5}])
def test_resume_from_state_dict_sees_the_same_batches(tmp_path, ratio):
    cache = make_cache(tmp_path / "c", {"web": 70, "chat": 50})
    settings = dict(source_ratio=ratio, window_shards=2, seed=11, epochs=3)
    reference = [keys(b) for b in ShuffledPairLoader(cache, 6, **settings)]
    first = ShuffledPairLoader(cache, 6, **settings)
    it = iter(first)
    head = [keys(next(it)) for _ in range(13)]
    state = first.state_dict()
    resumed = ShuffledPairLoader(cache, 6, **settings)
    resumed.load_state_dict(state)
    assert head + [keys(b) for b in resumed] == reference
    with pytest.raises(CrossdiffError, match="seed was 11, now 12"):
        ShuffledPairLoader(cache, 6, **{**settings, "seed": 12}).load_state_dict(state)


def _loader_peak_bytes(cache: PairedCache, window_shards: int = 2, max_batches: int | None = None) -> int:
    cache = PairedCache(cache.path)  # freshly opened: each measurement hashes its shards once, alike
    tracemalloc.start()
    tracemalloc.reset_peak()
    loader = ShuffledPairLoader(cache, 256, window_shards=window_shards, seed=0, filters=ReadFilters(drop_bos=True))
    for i, _ in enumerate(loader):
        if i == max_batches:
            break
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_cache_size(tmp_path):
    small = make_cache(tmp_path / "small", {"web": 8_000}, shard_tokens=2_000, doc_len=250)
    large = make_cache(tmp_path / "large", {"web": 80_000}, shard_tokens=2_000, doc_len=250)
    _loader_peak_bytes(small)  # warm-up: lazy imports and caches
    growth = _loader_peak_bytes(large) - _loader_peak_bytes(small)
    # Anything proportional to the cache, even one int64 index per token, would grow by
    # 8 bytes x 72,000 extra tokens; only per-shard bookkeeping (a few KB) may grow.
    per_token_index = 8 * (large.n_tokens - small.n_tokens)
    assert growth < per_token_index / 4, growth
    # the measurement sees such growth: a window spanning the whole cache is cache-sized
    whole = [_loader_peak_bytes(c, window_shards=40, max_batches=3) for c in (large, small)]
    assert whole[0] - whole[1] > per_token_index
