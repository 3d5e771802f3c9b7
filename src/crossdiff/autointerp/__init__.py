"""Autointerp: LLM explanations of crosscoder latents and detection scores for them.

``crossdiff explain ANALYSIS_DIR`` (or :func:`explain`) picks latents of an analysis,
asks a language model to explain each from its max-activating and quantile examples,
and scores every explanation (and two LLM-free baselines) by how well it lets a model
tell held-out activating excerpts from non-activating ones. Clients: any
OpenAI-compatible endpoint (:class:`HttpClient`) or a local transformers model
(:class:`LocalClient`); every request is cached on disk (:class:`ResponseCache`).
"""

from crossdiff.autointerp.clients import ChatRequest, Completion, HttpClient, LocalClient
from crossdiff.autointerp.pipeline import ExplainConfig, ExplainResult, compare_groups, explain, load_explained
from crossdiff.autointerp.response_cache import CachedClient, ResponseCache
from crossdiff.autointerp.samples import SampleConfig

__all__ = [
    "CachedClient", "ChatRequest", "Completion", "ExplainConfig", "ExplainResult", "HttpClient", "LocalClient",
    "ResponseCache", "SampleConfig", "compare_groups", "explain", "load_explained",
]
