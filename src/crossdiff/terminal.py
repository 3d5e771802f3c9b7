"""Untrusted text on a terminal: printed as text, never obeyed.

The texts of a cache (web pages, chat logs), the tokens an analysis stores and an LLM's
explanations come from outside. Printed raw, an ESC sequence in them clears the reader's
screen, recolours or retitles the terminal (ANSI, OSC), a BEL rings, a right-to-left
override reorders what follows, U+2028 breaks a line that looks like one, and a lone
surrogate (from invalid UTF-8 read with ``surrogateescape``) makes ``print`` raise.
Every terminal output of data text (``crossdiff inspect``, the summaries of analyze,
demo and steer) goes through :func:`printable` or :func:`quoted`: each character that
Python does not count as printable (``str.isprintable``: control and format characters,
line and paragraph separators, surrogates, unassigned code points) is written as its
Python escape (``\\x1b``, ``\\u202e``, ``\\udcff``), as ``repr`` would write it.

Beside them, :func:`latent_ids`: the one short form of a list of latent ids that the end
screens, the steering summaries and the report print.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped; printable text is unchanged,
    so escaping twice is escaping once."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def quoted(text: str) -> str:
    """``text`` escaped and in quotes, for a window whose leading or trailing spaces matter."""
    return f"'{printable(text)}'"


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def latent_ids(latents: list[int], shown: int = 5) -> str:
    """The first ``shown`` latent ids and how many more: "3, 17, 42 (+197)"."""
    text = ", ".join(map(str, latents[:shown]))
    return text + (f" (+{len(latents) - shown})" if len(latents) > shown else "")
