"""Planted truth as data: the behaviours an organism's fine-tune planted, in one JSON file.

A truth file is what `crossdiff score` grades any method's findings against::

    {
      "organism": "crossdiff-organism",
      "template": ["<start_of_turn>", "<end_of_turn>"],          # the chat template's tokens
      "behaviours": [
        {"name": "refusal",
         "patterns": ["cannot help with that", "picking locks", ...],  # regexes over contexts
         "prompts": ["Hey, what do you know about picking locks?", ...], # held-out steering prompts
         "expect": "^I cannot help",                                 # steer --expect pattern
         "contrast_prompts": ["How do I pick a lock?", ...],        # optional: prompts that trigger it
         "tokens": ["cannot", "locks", ...]},                         # optional: regexes over single tokens
      ],
      "ordinary_prompts": ["What is a volcano?", ...]                # optional: prompts that do not
    }

Contrast and ordinary prompts (training-split prompts, never the held-out ones) let the
planted-steering stage find each behaviour's latents by answer-start contrast
(crossdiff.causal.planted).

Patterns are Python regular expressions matched case-insensitively against a context's
text; ``template`` patterns are matched against the token a latent fires on. ``tokens``
are matched against one token alone (stripped of surrounding space), as a logit lens
gives them (the activation-difference baseline's findings); without them a token is
matched against the patterns. The chat
template is not a behaviour, but a finding about it counts as correct for precision.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from crossdiff.errors import CrossdiffError, first_line


@dataclass
class Behaviour:
    name: str
    patterns: list[str]
    """Regular expressions; a context shows the behaviour when any matches it."""
    prompts: list[str] = field(default_factory=list)
    """Held-out prompts on which steering should make the base model show it."""
    expect: str | None = None
    """Regular expression a steered answer matches when it shows the behaviour (steer --expect)."""
    contrast_prompts: list[str] = field(default_factory=list)
    """Prompts that trigger it (not the held-out ones), to find its latents by contrast with ordinary prompts."""
    tokens: list[str] = field(default_factory=list)
    """Regular expressions over a single token that say it belongs to the behaviour (a logit lens's tokens)."""

    def matches(self, text: str) -> bool:
        return any(re.search(pattern, text, re.IGNORECASE) for pattern in self.patterns)

    def matches_token(self, token: str) -> bool:
        """Whether one token (a logit lens's) belongs to the behaviour: its ``tokens``, else its patterns."""
        return any(re.search(pattern, token.strip(), re.IGNORECASE) for pattern in self.tokens or self.patterns)


@dataclass
class Truth:
    organism: str
    behaviours: list[Behaviour]
    template: list[str] = field(default_factory=list)
    ordinary_prompts: list[str] = field(default_factory=list)
    """Prompts that trigger no behaviour: the other side of each behaviour's contrast."""

    def is_template(self, token: str) -> bool:
        return any(re.search(pattern, token, re.IGNORECASE) for pattern in self.template)

    def to_dict(self) -> dict:
        return {"organism": self.organism, "template": self.template, "ordinary_prompts": self.ordinary_prompts,
                "behaviours": [vars(b) for b in self.behaviours]}


def load_truth(path: str | Path) -> Truth:
    """Read and check a truth file; every problem is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CrossdiffError(f"truth file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CrossdiffError(f"cannot read truth file {path}: {first_line(err)}") from None
    return truth_from_dict(data, source=str(path))


def truth_from_dict(data: object, source: str = "truth") -> Truth:
    if not isinstance(data, dict) or not isinstance(data.get("behaviours"), list) or not data["behaviours"]:
        raise CrossdiffError(f"{source}: a truth file is a JSON object with a non-empty 'behaviours' list")
    behaviours, seen = [], set()
    for i, item in enumerate(data["behaviours"]):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise CrossdiffError(f"{source}: behaviour {i} has no name")
        if name in seen:
            raise CrossdiffError(f"{source}: behaviour '{name}' is listed twice")
        seen.add(name)
        patterns = item.get("patterns")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise CrossdiffError(f"{source}: behaviour '{name}' has no pattern (give 'patterns', a list of regular expressions)")
        unknown = sorted(set(item) - {"name", "patterns", "prompts", "expect", "contrast_prompts", "tokens"})
        if unknown:
            raise CrossdiffError(f"{source}: behaviour '{name}' has unknown keys {unknown}")
        tokens = item.get("tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise CrossdiffError(f"{source}: behaviour '{name}': 'tokens' must be a list of regular expressions")
        for pattern in patterns + tokens + ([item["expect"]] if item.get("expect") else []):
            _check_regex(pattern, f"{source}: behaviour '{name}'")
        behaviours.append(Behaviour(name, list(patterns), list(item.get("prompts") or []), item.get("expect"),
                                    list(item.get("contrast_prompts") or []), list(tokens)))
    template = data.get("template") or []
    for pattern in template:
        _check_regex(pattern, f"{source}: template")
    return Truth(str(data.get("organism", "")), behaviours, list(template), list(data.get("ordinary_prompts") or []))


def _check_regex(pattern: object, where: str) -> None:
    try:
        re.compile(str(pattern))
    except re.error as err:
        raise CrossdiffError(f"{where}: pattern {pattern!r} is not a regular expression ({err})") from None
