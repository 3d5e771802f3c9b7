"""The explainer and detection prompts, and the parsers of their answers.

The explainer sees only text: excerpts with the latent's active tokens marked
``<<like this>>``. It never sees decoder norms, Latent Scaling verdicts or tags, so its
explanation cannot echo what the analysis already concluded. It may answer
:data:`ABSTAIN`, recorded as an abstention. The detection scorer sees an explanation and a
numbered batch of unmarked excerpts and answers a list of 0/1, one per excerpt.

:data:`PROMPT_VERSION` is stored with every result; change it whenever a prompt changes.
"""

from __future__ import annotations

import math
import re

PROMPT_VERSION = "crossdiff-autointerp-2"
ABSTAIN = "NO CONSISTENT PATTERN"


def explainer_messages(excerpts: list[str]) -> tuple[tuple[str, str], ...]:
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(excerpts, 1))
    return (("user",
             f"Here are text excerpts. Some tokens are marked <<like this>>.\n{numbered}\n"
             "What do the marked tokens have in common? Answer in one short sentence. "
             f"Only if they have nothing in common, answer: {ABSTAIN}."),)


def detection_messages(explanation: str, excerpts: list[str]) -> tuple[tuple[str, str], ...]:
    if len(excerpts) == 1:
        return (("user",
                 f"A hidden feature of a language model is active on: {explanation}\n"
                 f"Is it active in this excerpt?\n{excerpts[0]}\n"
                 "Answer Yes or No."),)
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(excerpts, 1))
    return (("user",
             f"A hidden feature of a language model is active on: {explanation}\n"
             f"Which excerpts contain text where it is active?\n{numbered}\n"
             f"Answer only with a list of {len(excerpts)} values, 1 if active and 0 if not, like [0, 1, 0]."),)


def parse_explanation(text: str, excerpts: list[str] = ()) -> tuple[str | None, bool]:
    """(explanation, abstained); explanation None when nothing usable came back: an empty
    answer, or one that only repeats an excerpt (small models often do)."""
    if re.search(r"no\s+consistent\s+pattern", text, flags=re.IGNORECASE):
        return None, True
    for line in text.splitlines():
        line = re.sub(r"^\s*(explanation\s*:)?\s*", "", line, flags=re.IGNORECASE).strip().strip('"').strip()
        if line:
            echo = re.sub(r"^\d+\.\s*", "", line).replace("<<", "").replace(">>", "")[:20]
            if echo and any(echo in excerpt.replace("<<", "").replace(">>", "") for excerpt in excerpts):
                return None, False
            return line[:300], False
    return None, False


def parse_detection(text: str, n: int) -> list[int] | None:
    """The answer as 0/1 per excerpt, or None if it cannot be read: for one excerpt a
    leading Yes or No, for a batch a list of exactly ``n`` 0s and 1s."""
    if n == 1:
        word = re.match(r"\W*(yes|no)\b", text, flags=re.IGNORECASE)
        return None if word is None else [int(word.group(1).lower() == "yes")]
    found = re.search(r"\[([^\[\]]*)\]", text)
    if found is None:
        return None
    items = [item.strip() for item in found.group(1).split(",")]
    if len(items) != n or any(item not in ("0", "1") for item in items):
        return None
    return [int(item) for item in items]


def detection_probabilities(logprobs: list[dict[str, float]] | None, n: int) -> list[float] | None:
    """P(active) per excerpt from the answer's top log-probabilities, or None.

    One excerpt: P(Yes) / (P(Yes) + P(No)) at the first generated position, whatever the
    model went on to write (a constrained reading of its preference; None if neither word is
    among the top tokens). A batch: at each position where the answer wrote a 0 or 1,
    P(1) / (P(1) + P(0)); None unless there are exactly ``n`` such positions. A word or digit
    absent from the top list counts as probability 0.
    """
    if not logprobs:
        return None
    if n == 1:
        first = logprobs[0]
        yes = max((lp for tok, lp in first.items() if tok.strip().lower() == "yes"), default=-math.inf)
        no = max((lp for tok, lp in first.items() if tok.strip().lower() == "no"), default=-math.inf)
        return None if yes == no == -math.inf else [_share(yes, no)]
    probabilities = []
    for top in logprobs:
        chosen = max(top, key=top.get)
        digit = re.fullmatch(r"([\s\[,]*)([01])\s*", chosen)
        if digit is None:
            continue
        prefix = digit.group(1).strip()
        one = max((lp for tok, lp in top.items() if tok.strip() == prefix + "1"), default=-math.inf)
        zero = max((lp for tok, lp in top.items() if tok.strip() == prefix + "0"), default=-math.inf)
        probabilities.append(_share(one, zero))
    return probabilities if len(probabilities) == n else None


def _share(a: float, b: float) -> float:
    """exp(a) / (exp(a) + exp(b)), stable."""
    top = max(a, b)
    return math.exp(a - top) / (math.exp(a - top) + math.exp(b - top))
