"""The one exception type users see.

Anything raised as CrossdiffError is a problem with the user's input (a config typo, a
wrong layer, a corrupt shard). The CLI prints its message as a single line instead of a
traceback; library users can catch it.
"""


class CrossdiffError(ValueError):
    """A user-facing error whose message is one self-explanatory line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for
    wrapping a library's multi-line error into a CrossdiffError."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
