"""Which excerpts the explainer sees and which ones score its explanation.

From a latent's stored examples (``examples.sqlite``): max-activating examples of even
rank and quantile examples of even bin go to the explainer, odd ones are held out as the
activating half of the detection batch, so explaining and scoring never share an
excerpt and both span the latent's activation range. The non-activating half is:

- *similar*: spans of the latent's own context windows where it is verifiably zero on
  every token (the examples store its activation on the whole window): the same
  documents and neighbourhoods as its activations, the hardest negatives there are;
- *random*: windows of other, randomly drawn latents' examples from documents where no
  stored example of this latent lies. The store does not hold this latent's activation on
  them, so they are assumed inactive; for a latent of firing rate f a span of w tokens
  is active with probability about f * w (reported per latent as ``random_active_risk``).

Every excerpt is a span of ``before + 1 + after`` tokens around its focus token; in the
explainer's excerpts the tokens where the latent is active are marked ``<<token>>``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

from crossdiff.analysis.examples import Example, ExampleStore
from crossdiff.autointerp.config import SampleConfig
from crossdiff.analysis.stats import ACTIVE_THRESHOLD


@dataclass
class ScoreItem:
    text: str
    label: int
    """1 = the latent is active in the excerpt."""
    kind: str
    """"activating", "similar" or "random"."""
    ref: tuple[str, int, int]
    """(source, document, position) of the excerpt's focus token."""


@dataclass
class LatentSamples:
    latent: int
    explain: list[str]
    """Excerpts for the explainer, active tokens marked."""
    score: list[ScoreItem]
    """The detection batch, in the (seeded) order it is shown."""
    top_tokens: list[str]
    """The tokens the latent fires on most among the explainer's examples, most frequent first."""
    explain_refs: list[tuple[str, int, int]]
    """(source, document, position) of each explainer excerpt's focus token."""


def clean(token: str) -> str:
    return token.replace("\n", "\\n")


def span_bounds(example: Example, focus: int, config: SampleConfig) -> tuple[int, int]:
    start = max(0, focus - config.before)
    return start, min(len(example.token_ids), focus + config.after + 1)


def render(example: Example, start: int, end: int, *, mark: bool, mark_fraction: float = 0.5) -> str:
    """The tokens ``start:end`` of the window as text; with ``mark``, the tokens where the
    latent reaches ``mark_fraction`` of its largest activation in the span are ``<<marked>>``
    (a dense latent is active almost everywhere, weakly; marking all of it says nothing)."""
    activations = [a if a is not None else 0.0 for a in example.activations[start:end]]
    cutoff = max(ACTIVE_THRESHOLD, mark_fraction * max(activations, default=0.0))
    pieces = []
    for token, activation in zip(example.tokens[start:end], activations):
        text = clean(token)
        pieces.append(f"<<{text}>>" if mark and activation >= cutoff else text)
    return "".join(pieces).strip()


def _excerpt(example: Example, config: SampleConfig, *, mark: bool) -> str:
    start, end = span_bounds(example, example.token_index, config)
    return render(example, start, end, mark=mark, mark_fraction=config.mark_fraction)


def _zero_span(example: Example, config: SampleConfig) -> tuple[str, int] | None:
    """The first span of the window on which the latent is known to be zero throughout:
    (text, document position of the span's focus token)."""
    width = config.before + 1 + config.after
    acts = example.activations
    run = 0
    for i, activation in enumerate(acts):
        run = run + 1 if activation is not None and activation <= ACTIVE_THRESHOLD else 0
        if run == width:
            return render(example, i + 1 - width, i + 1, mark=False), example.window_start + i - config.after
    return None


def _split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(explainer's, held out): even and odd ranks of the top examples and of the quantile
    bins, interleaved so both halves cover strong and weak activations."""
    top = sorted((e for e in examples if e.kind == "top"), key=lambda e: e.rank)
    quantile = sorted((e for e in examples if e.kind == "quantile"), key=lambda e: (-e.rank, -e.activation))
    explain = top[0::2] + quantile[0::2]
    held_out = [e for pair in zip(top[1::2], quantile[1::2]) for e in pair]
    held_out += top[1::2][len(quantile[1::2]):] + quantile[1::2][len(top[1::2]):]
    return explain, held_out


def latent_samples(store: ExampleStore, latent: int, config: SampleConfig, seed: int) -> LatentSamples | None:
    """The latent's explainer excerpts and detection batch; None when it has too few examples
    (fewer than two for the explainer or none held out)."""
    rng = random.Random(f"{seed}:{latent}")
    examples = store.examples(latent)
    explain_examples, held_out = _split(examples)
    explain_examples = explain_examples[: config.n_explain]
    seen = {_ref(e) for e in explain_examples}  # a top token can also be drawn as a quantile sample
    held_out = [e for e in held_out if _ref(e) not in seen]
    if len(explain_examples) < 2 or not held_out:
        return None
    counts = Counter(clean(e.tokens[e.token_index].strip()) for e in explain_examples if e.tokens[e.token_index].strip())
    items: list[ScoreItem] = []
    for example in held_out:  # the same text can recur (fixed replies): show it once
        text = _excerpt(example, config, mark=False)
        if len(items) < config.n_score_activating and text not in {i.text for i in items}:
            items.append(ScoreItem(text, 1, "activating", _ref(example)))

    similar: list[ScoreItem] = []
    for example in held_out + explain_examples:  # held-out windows first: the explainer never saw them
        span = _zero_span(example, config)
        if span and span[0] not in {i.text for i in similar}:
            similar.append(ScoreItem(span[0], 0, "similar", (example.source, example.doc_id, span[1])))
        if len(similar) == config.n_score_similar:
            break
    items += similar

    documents = {(e.source, e.doc_id) for e in examples}
    n_random = config.n_score_random + config.n_score_similar - len(similar)  # fill up what similar lacks
    random_items: list[ScoreItem] = []
    n_rows = store.db.execute("SELECT MAX(rowid) FROM examples").fetchone()[0] or 0
    for _ in range(50 * n_random):
        if len(random_items) >= n_random or n_rows == 0:
            break
        other = _example_at(store, rng.randint(1, n_rows))
        if other is None or other.latent == latent or (other.source, other.doc_id) in documents:
            continue
        text = _excerpt(other, config, mark=False)
        if text and text not in {i.text for i in random_items}:
            random_items.append(ScoreItem(text, 0, "random", _ref(other)))
    items += random_items
    if not any(item.label == 0 for item in items):
        return None
    rng.shuffle(items)
    return LatentSamples(latent, [_excerpt(e, config, mark=True) for e in explain_examples], items,
                         [token for token, _ in counts.most_common(config.n_top_tokens)],
                         [_ref(e) for e in explain_examples])


def _ref(example: Example) -> tuple[str, int, int]:
    return example.source, example.doc_id, example.position


def _example_at(store: ExampleStore, rowid: int) -> Example | None:
    row = store.db.execute("SELECT * FROM examples WHERE rowid = ?", (rowid,)).fetchone()
    if row is None:
        return None
    ids = json.loads(row[9])
    return Example(*row[:9], ids, json.loads(row[10]), [store.vocab.get(t, "") for t in ids])


def top_tokens_explanation(tokens: list[str]) -> str:
    """The LLM-free baseline: the latent's most frequent active tokens."""
    return "the tokens " + ", ".join(repr(t) for t in tokens) if tokens else "no particular token"
