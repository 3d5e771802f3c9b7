"""crossdiff: model diffing with crosscoders (Minder et al. 2025).

The pipeline is collect -> train -> analyze -> causal -> report; each stage writes files a
person can open. The core object is :class:`crossdiff.crosscoder.CrossCoder`.
"""

__version__ = "0.1.0"

from crossdiff.errors import CrossdiffError  # noqa: E402

__all__ = ["CrossdiffError", "__version__"]


def __getattr__(name):  # lazy, so `import crossdiff` stays cheap for the CLI
    if name == "CrossCoder":
        from crossdiff.crosscoder import CrossCoder  # deferred: imports torch

        return CrossCoder
    raise AttributeError(name)
