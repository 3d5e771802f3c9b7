"""The paired cache on its own: round trip, statistics, checksums, resume, full disks, ranks."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from crossdiff.cache import store as cache_mod
from crossdiff.cache.store import CacheWriter, PairedCache, ReadFilters, merge_ranks, rank_folder
from crossdiff.errors import CrossdiffError

D = 8
BOS = 1
SPECIAL = (1, 2)


def write_cache(path, docs, *, dtype="bfloat16", shard_tokens=16, finish=True, seed=0):
    """Write ``docs`` = [(source_id, length), ...] with random activations; returns the expected rows.

    Activations get a per-model offset and scale so the statistics are not trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    writer = CacheWriter(
        path, models=("base-m", "chat-m"), layer=2, d_model=D, sources=["web", "chat"], dtype=dtype,
        shard_tokens=shard_tokens, bos_token_id=BOS, special_token_ids=SPECIAL, config={"seed": seed},
    )
    rows = []
    current = None
    for doc_id, (source, length) in enumerate(docs):
        if current is not None and (source != current or writer.room < length):
            writer.seal({"next_doc": doc_id})
        current = source
        acts = torch.randn(length, 2, D, generator=gen) * torch.tensor([1.0, 3.0]).view(1, 2, 1) + 0.5
        token_ids = torch.randint(0, 50, (length,), generator=gen)
        token_ids[0] = BOS
        template = torch.rand(length, generator=gen) < 0.3
        writer.append(acts, token_ids, [doc_id] * length, range(length), source, template)
        stored = acts.to(cache_mod.STORAGE_DTYPES[dtype][1]).double()
        for p in range(length):
            rows.append((stored[p], int(token_ids[p]), doc_id, p, source, bool(template[p])))
    writer.seal({"next_doc": len(docs)})
    if finish:
        writer.finish()
    return rows


DOCS = [(0, 5), (0, 7), (0, 3), (0, 9), (1, 4), (1, 6), (1, 8), (1, 2), (0, 6)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_is_exact_in_storage_precision(tmp_path, dtype):
    expected = write_cache(tmp_path / "c", DOCS, dtype=dtype)
    cache = PairedCache(tmp_path / "c", verify=True)
    assert cache.n_tokens == len(expected) == sum(n for _, n in DOCS)
    assert (cache.d_model, cache.layer, cache.model_names, cache.dtype) == (D, 2, ("base-m", "chat-m"), dtype)
    batches = list(cache.iter_batches(10))
    assert all(len(b.acts) == 10 for b in batches[:-1])
    got = [tuple(f[i] for f in b) for b in batches for i in range(len(b.acts))]
    assert len(got) == len(expected)
    for (acts, tok, doc, pos, src, tmpl), (e_acts, e_tok, e_doc, e_pos, e_src, e_tmpl) in zip(got, expected):
        assert torch.equal(acts.double(), e_acts)
        assert (int(tok), int(doc), int(pos), int(src), bool(tmpl)) == (e_tok, e_doc, e_pos, e_src, e_tmpl)


def test_shards_hold_one_source_and_at_most_shard_tokens(tmp_path):
    write_cache(tmp_path / "c", DOCS, shard_tokens=16)
    cache = PairedCache(tmp_path / "c")
    for i, shard in enumerate(cache.shards):
        assert shard["n_tokens"] <= 16
        sources = set(cache.tokens(i)["source_id"].tolist())
        assert sources == {cache.sources.index(shard["source"])}
        # the .npy files are plain numpy arrays
        assert np.load(tmp_path / "c" / shard["name"] / "acts.npy").shape == (shard["n_tokens"], 2, D)
    assert cache.manifest["tokens_per_source"] == {"web": 5 + 7 + 3 + 9 + 6, "chat": 4 + 6 + 8 + 2}


def test_statistics_match_float64_brute_force(tmp_path):
    expected = write_cache(tmp_path / "c", DOCS)
    stored = torch.stack([row[0] for row in expected])  # [n, 2, d] float64 of the stored bf16 values
    stats = PairedCache(tmp_path / "c").stats()
    for m, model in enumerate(["base", "chat"]):
        x = stored[:, m]
        norms = x.norm(dim=-1)
        assert stats[model]["count"] == len(x)
        np.testing.assert_allclose(stats[model]["mean"], x.mean(0).numpy(), rtol=1e-12, atol=1e-12)
        assert stats[model]["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-12)
        assert stats[model]["mean_sq_norm"] == pytest.approx((norms**2).mean().item(), rel=1e-12)
    # the planted scales show up: chat activations are 3x larger
    assert stats["chat"]["mean_norm"] > 2 * stats["base"]["mean_norm"]


def test_median_norms_and_read_filters_match_brute_force(tmp_path):
    expected = write_cache(tmp_path / "c", DOCS)
    cache = PairedCache(tmp_path / "c")
    norms = torch.stack([row[0].norm(dim=-1) for row in expected]).numpy()
    np.testing.assert_allclose(cache.median_norms(), np.median(norms.astype(np.float32).astype(np.float64), axis=0))

    filters = ReadFilters(drop_bos=True, drop_special=True, max_norm_ratio=1.2)
    limit = 1.2 * np.median(norms.astype(np.float32), axis=0)
    keep = [
        (doc, pos)
        for (acts, tok, doc, pos, src, tmpl), norm in zip(expected, norms.astype(np.float32))
        if not (pos == 0 and tok == BOS) and tok not in SPECIAL and (norm <= limit).all()
    ]
    got = [
        (int(d), int(p)) for b in cache.iter_batches(7, filters=filters) for d, p in zip(b.doc_ids, b.positions)
    ]
    assert 0 < len(got) < len(expected)
    assert got == keep


def test_flipped_byte_is_reported_with_the_shard_name(tmp_path):
    write_cache(tmp_path / "c", DOCS)
    target = tmp_path / "c" / "shard-00002" / "acts.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x10
    target.write_bytes(bytes(data))
    PairedCache(tmp_path / "c")  # opening without verify is cheap and does not hash
    with pytest.raises(CrossdiffError, match=r"^shard-00002/acts\.npy does not match the sha256 recorded in manifest\.json: the file or manifest\.json is damaged$"):
        PairedCache(tmp_path / "c", verify=True)


@pytest.mark.parametrize("damage", ["header", "truncate", "tokens", "missing"])
def test_other_damage_is_reported_with_the_file_name(tmp_path, damage):
    write_cache(tmp_path / "c", DOCS)
    shard = tmp_path / "c" / "shard-00001"
    if damage == "header":
        data = bytearray((shard / "acts.npy").read_bytes())
        data[60] = ord("7") if data[60] != ord("7") else ord("8")
        (shard / "acts.npy").write_bytes(bytes(data))
        expected = r"shard-00001/acts\.npy is corrupt"
    elif damage == "truncate":
        data = (shard / "acts.npy").read_bytes()
        (shard / "acts.npy").write_bytes(data[:-2])
        expected = r"shard-00001/acts\.npy is corrupt \(size"
    elif damage == "tokens":
        data = bytearray((shard / "tokens.npy").read_bytes())
        data[200] ^= 1
        (shard / "tokens.npy").write_bytes(bytes(data))
        expected = r"shard-00001/tokens\.npy does not match the sha256 recorded in manifest\.json"
    else:
        (shard / "tokens.npy").unlink()
        expected = r"shard-00001/tokens\.npy is missing"
    with pytest.raises(CrossdiffError, match=expected):
        PairedCache(tmp_path / "c", verify=True)


def test_reopening_discards_the_unsealed_shard_and_resumes(tmp_path):
    write_cache(tmp_path / "c", DOCS[:3], finish=False)
    (tmp_path / "c" / "shard-00001").mkdir()  # an interrupted shard
    (tmp_path / "c" / "shard-00001" / "acts.npy").write_bytes(b"partial")
    writer = CacheWriter(
        tmp_path / "c", models=("base-m", "chat-m"), layer=2, d_model=D, sources=["web", "chat"],
        shard_tokens=16, bos_token_id=BOS, special_token_ids=SPECIAL, config={"seed": 0},
    )
    assert not (tmp_path / "c" / "shard-00001").exists()
    assert writer.resume == {"next_doc": 3} and writer.n_tokens == 15 and writer.shard_names == ["shard-00000"]
    with pytest.raises(CrossdiffError, match="incomplete"):
        PairedCache(tmp_path / "c")
    assert PairedCache(tmp_path / "c", allow_incomplete=True).n_tokens == 15


def test_reopening_with_other_settings_is_refused(tmp_path):
    write_cache(tmp_path / "c", DOCS[:3], finish=False)
    with pytest.raises(CrossdiffError, match=r"other settings \(layer is 2 there, 5 now\)"):
        CacheWriter(tmp_path / "c", models=("base-m", "chat-m"), layer=5, d_model=D, sources=["web", "chat"],
                    shard_tokens=16, bos_token_id=BOS, special_token_ids=SPECIAL, config={"seed": 0})
    with pytest.raises(CrossdiffError, match=r"config differs in seed"):
        CacheWriter(tmp_path / "c", models=("base-m", "chat-m"), layer=2, d_model=D, sources=["web", "chat"],
                    shard_tokens=16, bos_token_id=BOS, special_token_ids=SPECIAL, config={"seed": 1})


@pytest.mark.parametrize("where", ["data", "fsync"])
def test_full_disk_is_one_line_and_keeps_the_last_good_manifest(tmp_path, monkeypatch, where):
    path = tmp_path / "c"
    gen = torch.Generator().manual_seed(0)
    writer = CacheWriter(path, models=("b", "c"), layer=0, d_model=D, sources=["web"], shard_tokens=8)
    writer.append(torch.randn(8, 2, D, generator=gen), range(8), [0] * 8, range(8), 0, [False] * 8)
    writer.seal({"next_doc": 1})
    good = (path / "manifest.json").read_text()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "data":
        monkeypatch.setattr(cache_mod._AppendOnlyArray, "append", no_space)
    else:
        monkeypatch.setattr(cache_mod.os, "fsync", no_space)
    with pytest.raises(CrossdiffError) as err:
        writer.append(torch.randn(8, 2, D, generator=gen), range(8), [1] * 8, range(8), 0, [False] * 8)
        writer.seal({"next_doc": 2})
    message = str(err.value)
    assert "\n" not in message and message.startswith("disk full while writing") and "shard-00001" in message
    assert (path / "manifest.json").read_text() == good
    assert json.loads(good)["shards"][0]["name"] == "shard-00000" and len(json.loads(good)["shards"]) == 1
    assert not list(path.glob("*.tmp"))
    monkeypatch.undo()
    PairedCache(path, verify=True, allow_incomplete=True)


def test_full_disk_while_replacing_the_manifest(tmp_path, monkeypatch):
    path = tmp_path / "c"
    writer = CacheWriter(path, models=("b", "c"), layer=0, d_model=D, sources=["web"], shard_tokens=8)
    good = (path / "manifest.json").read_text()
    real_open = open

    def open_failing_tmp(file, mode="r", *args, **kwargs):
        if str(file).endswith("manifest.json.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_failing_tmp)
    writer.append(torch.ones(3, 2, D), range(3), [0] * 3, range(3), 0, [False] * 3)
    with pytest.raises(CrossdiffError, match=r"^disk full while writing .*manifest\.json"):
        writer.seal()
    monkeypatch.undo()
    assert (path / "manifest.json").read_text() == good


def test_ranks_merge_into_one_cache(tmp_path):
    out = tmp_path / "c"
    docs = {0: DOCS[0::2], 1: DOCS[1::2]}
    expected = write_cache(rank_folder(out, 0, 2), docs[0], seed=0)
    assert not merge_ranks(out, 2)
    with pytest.raises(CrossdiffError, match="some rank has not finished"):
        PairedCache(out)
    expected += write_cache(rank_folder(out, 1, 2), docs[1], seed=1, finish=False)
    assert not merge_ranks(out, 2)  # rank 1 has not called finish()
    CacheWriter(rank_folder(out, 1, 2), models=("base-m", "chat-m"), layer=2, d_model=D, sources=["web", "chat"],
                shard_tokens=16, bos_token_id=BOS, special_token_ids=SPECIAL, config={"seed": 1}).finish()
    assert merge_ranks(out, 2)
    cache = PairedCache(out, verify=True)
    assert cache.n_tokens == len(expected)
    assert all(s["name"].startswith(("rank-0/", "rank-1/")) for s in cache.shards)
    stored = torch.stack([row[0] for row in expected])
    np.testing.assert_allclose(cache.stats()["chat"]["mean"], stored[:, 1].mean(0).numpy(), rtol=1e-12)
    got = torch.cat([b.acts for b in cache.iter_batches(64)])
    assert torch.equal(got.double(), stored)


def test_missing_cache_is_one_line(tmp_path):
    with pytest.raises(CrossdiffError, match=r"no paired-activation cache at .*manifest\.json missing"):
        PairedCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CrossdiffError, match="cannot read"):
        PairedCache(tmp_path)
