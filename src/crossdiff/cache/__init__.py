"""The paired activation cache: what `collect` writes and `train` and `analyze` read.

* ``batch``        CacheBatch, the one batch record every stage passes tokens in
* ``store``        sharded memory-mapped cache: writer, reader, read filters, rank merge
* ``from_arrays``  a cache written from activations you already have (docs/own-activations.md)
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "CacheBatch": "crossdiff.cache.batch", "CacheWriter": "crossdiff.cache.store", "PairedCache": "crossdiff.cache.store",
    "ReadFilters": "crossdiff.cache.store", "MANIFEST": "crossdiff.cache.store",
    "write_cache": "crossdiff.cache.from_arrays",
})
