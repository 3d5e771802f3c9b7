"""The `collect` stage: run base and chat on the same tokens and write the paired cache.

* ``collector``  :func:`collect` and :class:`CollectConfig`, and ``crossdiff collect``
* ``answers``    prompts the chat model answers first, for ``kind = "answers"`` sources
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "CollectConfig": "crossdiff.collect.collector", "collect": "crossdiff.collect.collector",
})
