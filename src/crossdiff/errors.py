"""The one exception type users see.

Anything raised as CrossdiffError is a problem with the user's input (a config typo, a
wrong layer, a corrupt shard). The CLI prints its message as a single line instead of a
traceback; library users can catch it.
"""


class CrossdiffError(ValueError):
    """A user-facing error whose message is one self-explanatory line."""
