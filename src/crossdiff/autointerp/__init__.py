"""Autointerp: LLM explanations of crosscoder latents and detection scores for them.

``crossdiff explain ANALYSIS_DIR`` (or :func:`explain`) picks latents of an analysis,
asks a language model to explain each from its max-activating and quantile examples,
and scores every explanation (and two LLM-free baselines) by how well it lets a model
tell held-out activating excerpts from non-activating ones. Clients: any
OpenAI-compatible endpoint (:class:`HttpClient`) or a local transformers model
(:class:`LocalClient`); every request is cached on disk (:class:`ResponseCache`).
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "ChatRequest": "crossdiff.autointerp.clients",
    "Completion": "crossdiff.autointerp.clients",
    "HttpClient": "crossdiff.autointerp.clients",
    "LocalClient": "crossdiff.autointerp.clients",
    "ExplainConfig": "crossdiff.autointerp.pipeline",
    "ExplainResult": "crossdiff.autointerp.pipeline",
    "compare_groups": "crossdiff.autointerp.pipeline",
    "explain": "crossdiff.autointerp.pipeline",
    "load_explained": "crossdiff.autointerp.pipeline",
    "CachedClient": "crossdiff.autointerp.response_cache",
    "ResponseCache": "crossdiff.autointerp.response_cache",
    "SampleConfig": "crossdiff.autointerp.samples",
})
