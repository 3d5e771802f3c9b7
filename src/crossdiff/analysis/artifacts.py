"""The paper's central finding on planted truth: L1 crosscoders make sparsity artifacts.

Train an L1 and a BatchTopK crosscoder on the same synthetic pair, analyse both, and ask
how many latents look chat-only by their decoder norms but are rejected by Latent
Scaling. The synthetic pair (crossdiff.synthetic) plants:

* genuinely chat-only features (absent from the base activations),
* ``different`` features present in both models but weaker in the base
  (``base_strength``): an L1 penalty on the decoder norms makes it cheap to shrink their
  base decoder to zero (Complete Shrinkage), or to split them into a chat-only latent and a
  base-only twin (Latent Decoupling). BatchTopK charges per active latent, not per decoder
  norm, so it keeps one latent with both decoder vectors;
* shared and base-only features as the background.

Because the truth is known, each chat-only latent can also be matched to the planted
feature it encodes, which says whether Latent Scaling's verdict was right.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdiff.analysis.pipeline import AnalysisConfig, TensorSource, analyze
from crossdiff.synthetic import SyntheticConfig, SyntheticPair
from crossdiff.train.trainer import TrainConfig, Trainer


@dataclass
class ArtifactExperiment:
    synthetic: SyntheticConfig = field(default_factory=lambda: SyntheticConfig(
        d_in=32, n_shared=24, n_chat_only=4, n_base_only=4, n_different=8, base_strength=0.3, p_active=0.03))
    d_sae: int = 128
    steps: int = 2000
    batch_size: int = 512
    lr: float = 3e-3
    l1_coefficient: float = 0.1
    """mu of the L1 crosscoder; chosen so both crosscoders reach a similar FVE on this data."""
    k: int = 2
    """BatchTopK k; the planted data has about 1.3 active features per token."""
    eval_tokens: int = 20_000
    seed: int = 0


def compare_sparsity(experiment: ArtifactExperiment | None = None, *, work_dir: str | Path | None = None,
                     quiet: bool = True) -> pd.DataFrame:
    """One row per crosscoder (``relu`` = L1, ``batchtopk``) with the chat-only verdicts."""
    e = experiment or ArtifactExperiment()
    pair = SyntheticPair(e.synthetic)
    eval_acts = pair.sample(e.eval_tokens, torch.Generator().manual_seed(e.seed + 12345)).acts
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work_dir or tmp)
        for activation in ("relu", "batchtopk"):
            config = TrainConfig(
                activation=activation, d_sae=e.d_sae, k=e.k, l1_coefficient=e.l1_coefficient, lr=e.lr,
                warmup_steps=100, steps=e.steps, batch_size=e.batch_size, threshold_start_step=100,
                dead_after_tokens=50_000, log_every=max(e.steps // 10, 1), checkpoint_every=0, device="cpu",
                seed=e.seed,
            )
            trainer = Trainer(config, e.synthetic.d_in, root / activation, quiet=quiet)
            crosscoder = trainer.fit(pair.batches(e.batch_size, seed=e.seed + 1))
            result = analyze(crosscoder, TensorSource(eval_acts), root / activation / "analysis",
                             AnalysisConfig(examples=False), progress=not quiet)
            rows.append({"crosscoder": activation, **_verdicts(result.table, result.summary, crosscoder, pair)})
    return pd.DataFrame(rows).set_index("crosscoder")


def _verdicts(table: pd.DataFrame, summary: dict[str, Any], crosscoder, pair: SyntheticPair) -> dict[str, Any]:
    chat_only = table["tag"].to_numpy() == "chat-only"
    rejected = chat_only & ~table["chat_specific"].to_numpy()
    planted_kind = _planted_kind(crosscoder, pair)
    genuine = planted_kind == "chat_only"
    return {
        "fve": summary["quality"]["fve"],
        "l0": summary["quality"]["l0"],
        "chat_only": int(chat_only.sum()),
        "confirmed": int((chat_only & table["chat_specific"].to_numpy()).sum()),
        "rejected": int(rejected.sum()),
        "shrinkage": int(table["complete_shrinkage"].sum()),
        "decoupling": int(table["latent_decoupling"].sum()),
        # Planted truth: what the chat-only latents really encode.
        "chat_only_on_genuine": int((chat_only & genuine).sum()),
        "chat_only_on_shared_concept": int((chat_only & ~genuine).sum()),
        "verdict_correct": int((chat_only & (table["chat_specific"].to_numpy() == genuine)).sum()),
    }


@torch.no_grad()
def _planted_kind(crosscoder, pair: SyntheticPair) -> np.ndarray:
    """Kind of the planted feature whose chat direction best matches each latent's chat decoder."""
    planted = torch.nn.functional.normalize(pair.directions[:, 1], dim=-1)
    learned = torch.nn.functional.normalize(crosscoder.W_dec[:, 1].float().cpu(), dim=-1)
    cos = learned @ planted.T
    cos[:, pair.strength[:, 1] == 0] = -torch.inf  # a chat decoder cannot encode a base-only feature
    match = cos.argmax(dim=1)
    return np.array(pair.kinds, dtype=object)[match.numpy()]
