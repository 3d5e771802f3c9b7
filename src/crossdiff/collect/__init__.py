"""The `collect` stage: run base and chat on the same tokens and write the paired cache.

* ``paired``     documents -> paired records and the resume rule (shared with ``train --stream``)
* ``collector``  :func:`collect`: those records into sealed shards
* ``answers``    prompts the chat model answers first, for ``kind = "answers"`` sources
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "CollectConfig": "crossdiff.collect.collector", "collect": "crossdiff.collect.collector",
})
