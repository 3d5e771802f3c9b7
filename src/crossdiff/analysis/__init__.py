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
* ``pipeline`` :func:`analyze`, which runs all of the above over a cache
* ``cli``      ``crossdiff analyze``
"""

from crossdiff.analysis.examples import Example, ExampleStore
from crossdiff.analysis.norms import TAGS, TagThresholds, decoder_geometry, tag_latents
from crossdiff.analysis.pipeline import AnalysisConfig, AnalysisResult, Batch, TensorSource, analyze
from crossdiff.analysis.scaling import LatentScaling, LatentScalingResult, ScalingThresholds, scaling_flags
from crossdiff.analysis.table import COLUMNS, read_table
from crossdiff.analysis.twins import find_twins
from crossdiff.analysis.verdicts import VERDICTS, verdicts

__all__ = [
    "COLUMNS",
    "TAGS",
    "AnalysisConfig",
    "AnalysisResult",
    "Batch",
    "Example",
    "ExampleStore",
    "LatentScaling",
    "LatentScalingResult",
    "ScalingThresholds",
    "TagThresholds",
    "TensorSource",
    "VERDICTS",
    "analyze",
    "decoder_geometry",
    "find_twins",
    "read_table",
    "scaling_flags",
    "tag_latents",
    "verdicts",
]
