"""Defaults of the read filters (crossdiff.cache.filters), without numpy: configs that name
them (train's DataConfig) load in a blink for `--help`."""

DEFAULT_MAX_NORM_RATIO = 10.0
"""Default norm limit of :class:`ReadFilters`, as a multiple of the median norm. Real language
models put a "massive activation" (an attention sink) on some tokens, above all the first
position of every document: ~140x the median norm on SmolLM2-135M at its middle layer."""

FIRST_POSITION = ("auto", "drop", "keep")
