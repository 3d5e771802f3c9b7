"""Every Python snippet in README.md and docs/*.md runs as written.

Snippets run per document, in order, in one namespace (a later snippet may use what an
earlier one defined), inside a scratch folder that holds a small real run on the bundled
organism under the paths the docs use (``runs/cache``, ``runs/cc/crosscoder``,
``runs/analysis``, ``caches/gemma2-l13``, and ``runs/demo`` in the demo's layout), with the
repository's ``recipes/``. A snippet that cannot run offline on a CPU is
marked in the document with ``<!-- not run: reason -->`` on the line before its fence.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"(?P<mark><!-- not run:[^\n]*-->\n)?```python\n(?P<code>.*?)```", re.S)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def snippets(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m["code"]) for m in FENCE.finditer(text) if not m["mark"]]


@pytest.fixture(scope="session")
def docs_run(tmp_path_factory) -> Path:
    """A scratch folder with a small run: cache (sources fineweb, lmsys), BatchTopK crosscoder, analysis."""
    import json

    from crossdiff import organism
    from crossdiff.analysis import AnalysisConfig, analyze
    from crossdiff.cache.store import PairedCache
    from crossdiff.collect.collector import CollectConfig, collect
    from crossdiff.train.loader import ShuffledPairLoader
    from crossdiff.texts import TextSourceConfig
    from crossdiff.train.trainer import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("docs")
    pair = organism.paths()
    texts, chats = root / "fineweb.jsonl", root / "lmsys.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in organism.pretraining_texts("heldout")[:200]))
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in organism.chat_conversations("heldout")[:100]))
    collect(CollectConfig(base=str(pair.base), chat=str(pair.chat), layer=2, out=str(root / "runs" / "cache"),
                          sources=[TextSourceConfig(name="fineweb", kind="text", path=str(texts)),
                                   TextSourceConfig(name="lmsys", kind="chat", path=str(chats), column="messages")],
                          max_len=128, batch_size=16, max_tokens=3000, dtype="float32", model_dtype="float32",
                          device="cpu", shard_tokens=4096), quiet=True)
    cache = PairedCache(root / "runs" / "cache")
    loader = ShuffledPairLoader(cache, 256, normalize=True, epochs=None, drop_last=True)
    config = TrainConfig(activation="batchtopk", expansion_factor=4, k=8, steps=60, warmup_steps=10,
                         threshold_start_step=20, log_every=20, checkpoint_every=0, device="cpu")
    crosscoder = Trainer(config, cache.d_model, root / "runs" / "cc", model_names=list(cache.model_names),
                         layer=cache.layer, input_scale=loader.normalization, quiet=True).fit(loader)
    analyze(crosscoder, cache, root / "runs" / "analysis", AnalysisConfig(n_top=5, per_bin=1), progress=False)
    (root / "caches").mkdir()
    (root / "caches" / "gemma2-l13").symlink_to(root / "runs" / "cache")
    # The same run in the layout of `crossdiff demo` / `crossdiff run` (RUN/cache, RUN/<name>/...).
    demo = root / "runs" / "demo"
    (demo / "batchtopk").mkdir(parents=True)
    (demo / "cache").symlink_to(root / "runs" / "cache")
    for name, target in (("crosscoder", "cc/crosscoder"), ("analysis", "analysis"), ("metrics.jsonl", "cc/metrics.jsonl")):
        (demo / "batchtopk" / name).symlink_to(root / "runs" / target)
    return root


@pytest.mark.parametrize("doc", [d for d in DOCS if snippets(d)], ids=lambda d: d.name)
def test_python_snippets_run(doc: Path, docs_run: Path, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("runs", "caches"):  # each document starts from the same run; what it writes stays local
        os.symlink(docs_run / name, work / name) if name == "caches" else _copy(docs_run / name, work / name)
    if (ROOT / "recipes").is_dir():
        os.symlink(ROOT / "recipes", work / "recipes")
    namespace: dict = {"__name__": "__docs__"}
    before = Path.cwd()
    os.chdir(work)
    try:
        for line, code in snippets(doc):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)
            except Exception as err:
                pytest.fail(f"{doc.name}, snippet at line {line}: {type(err).__name__}: {err}")
    finally:
        os.chdir(before)


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
