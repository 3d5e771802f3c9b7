"""The `train` stage: a crosscoder from a cache, or streamed from the two models.

* ``trainer``     :class:`TrainConfig`, :class:`Trainer` (the loop, checkpoints, resume), ``crossdiff train``
* ``loader``      shuffled paired batches from a cache
* ``stream``      both models feed a shuffle buffer in a background thread (``train --stream``)
* ``losses``      reconstruction, sparsity, auxiliary-k and variant losses
* ``sparse_ops``  the sparse BatchTopK step
* ``variants``    DFC, Matryoshka and delta crosscoders
* ``distributed`` data-parallel collectives under torchrun
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "DataConfig": "crossdiff.train.trainer", "TrainConfig": "crossdiff.train.trainer",
    "Trainer": "crossdiff.train.trainer",
})
