"""Per-latent analysis of a crosscoder (the `analyze` stage).

Modules, one idea each:

* ``norms``    decoder/encoder geometry: relative decoder norm (1 = chat-only), tags, cosines
* ``scaling``  Latent Scaling for all latents in one streaming pass (both directions, jackknife errors)
* ``verdicts`` one guarded verdict per latent, and the rank-sum
* ``roles``    who speaks at each token (BOS, template, user, assistant, system, text)
* ``findings`` the ranked summary (dnorm distribution, top latents, verdict counts)
* ``stats``    activation frequency / max / template and BOS shares; FVE and L0
* ``examples`` max-activating and quantile examples with their contexts (SQLite)
* ``twins``    base-only twins of chat-only latents (evidence of Latent Decoupling)
* ``lens``     logit lens: the tokens a decoder direction promotes/suppresses through a model's final norm and head
* ``table``    the latent table (Parquet) and its JSON summary
* ``read``     the one reader of an analysis folder and of what later stages write beside it
* ``screen``   the end screen of analyze, run and demo (``inspect --summary`` reprints it)
* ``pipeline`` :func:`analyze`, which runs all of the above over a cache
* ``cli``      ``crossdiff analyze``
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "Example": "crossdiff.analysis.examples",
    "ExampleStore": "crossdiff.analysis.examples",
    "TAGS": "crossdiff.analysis.norms",
    "TagThresholds": "crossdiff.analysis.norms",
    "decoder_geometry": "crossdiff.analysis.norms",
    "tag_latents": "crossdiff.analysis.norms",
    "AnalysisConfig": "crossdiff.analysis.pipeline",
    "AnalysisResult": "crossdiff.analysis.pipeline",
    "CacheBatch": "crossdiff.cache.batch",
    "TensorSource": "crossdiff.analysis.pipeline",
    "analyze": "crossdiff.analysis.pipeline",
    "LatentScaling": "crossdiff.analysis.scaling",
    "LatentScalingResult": "crossdiff.analysis.scaling",
    "ScalingThresholds": "crossdiff.analysis.scaling",
    "scaling_flags": "crossdiff.analysis.scaling",
    "COLUMNS": "crossdiff.analysis.table",
    "read_table": "crossdiff.analysis.table",
    "find_twins": "crossdiff.analysis.twins",
    "VERDICTS": "crossdiff.analysis.verdicts",
    "verdicts": "crossdiff.analysis.verdicts",
})
