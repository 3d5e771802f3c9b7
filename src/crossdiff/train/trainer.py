"""Training a crosscoder on paired activations: the loop, its state, and `crossdiff train`.

The loop reads top to bottom: take a batch, check it, (first batch only) start b_dec at
the geometric median, set the learning rate, compute the losses of docs/method.md 3
(:func:`crossdiff.train.losses.crosscoder_losses`), step Adam with optional clipping, then
update the dead-latent counters and the BatchTopK threshold. Every ``log_every`` steps a
line goes to ``metrics.jsonl``; every ``checkpoint_every`` steps a checkpoint folder is
written atomically, and a run resumes from the newest one with bit-identical results.

Output folder::

    out/train_config.json                  the TrainConfig of the run
    out/metrics.jsonl                      one JSON object per logged step
    out/checkpoints/step-000123/           crosscoder (config.json, model.safetensors)
                               training_state.pt   optimizer, step, RNG, counters, data position
    out/crosscoder/                        the final crosscoder

Batches are tensors [B, 2, d_in] (or objects with ``.acts``) already in crosscoder space
(the loader normalises; pass its factors as ``input_scale`` so they are stored).

Under torchrun every rank runs this loop on its own part of each global batch and the
batch-wide quantities are global (crossdiff.train.distributed, docs/scaling.md); rank 0 alone
writes the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from crossdiff.cache.store import ReadFilters
from crossdiff.config import from_dict, load_section, save_json, to_dict
from crossdiff.crosscoder import CONFIG_NAME, WEIGHTS_NAME, CrossCoder, CrossCoderConfig
from crossdiff.train.distributed import DataParallel, split_batches
from crossdiff.devices import resolve_device
from crossdiff.errors import CrossdiffError
from crossdiff.files import (checksum_problem, load_tensors, remove_stray_temporaries, rename, write_checksums, write_error,
                             write_text_atomic)
from crossdiff.locks import output_lock
from crossdiff.train.losses import (
    crosscoder_losses,
    fraction_of_variance_explained,
    geometric_median,
    update_threshold,
)
from crossdiff.partition import partition_sizes
from crossdiff.train.config import RESUMABLE_CHANGES, DataConfig, TrainConfig  # noqa: F401 (DataConfig re-exported)
from crossdiff.train.variants import matryoshka_sizes, option

STATE_NAME = "training_state.pt"
SPARSE_MIN_D_SAE = 4096


def _warn_short_run(config: TrainConfig) -> None:
    """A run that ends before these steps gives an unusable or half-warmed crosscoder: say so now."""
    if config.steps is None:
        return
    if config.activation == "batchtopk" and config.steps <= config.threshold_start_step + 1:  # updates need step > start
        warnings.warn(
            f"steps ({config.steps}) <= threshold_start_step ({config.threshold_start_step}): the BatchTopK crosscoder "
            "will have no inference threshold and analysis will refuse it; set threshold_start_step to about "
            f"steps // 5 (e.g. {max(config.steps // 5, 1)})", UserWarning, stacklevel=3)
    if config.steps <= config.warmup_steps:
        warnings.warn(
            f"steps ({config.steps}) <= warmup_steps ({config.warmup_steps}): the learning rate never reaches lr; "
            f"set warmup_steps to about steps // 10 (e.g. {max(config.steps // 10, 1)})", UserWarning, stacklevel=3)


class Trainer:
    """Trains one crosscoder; ``fit`` consumes batches and writes everything to ``out_dir``."""

    def __init__(
        self,
        config: TrainConfig,
        d_in: int,
        out_dir: str | Path,
        *,
        model_names: list[str] | None = None,
        layer: int | None = None,
        input_scale: list[float] | None = None,
        token_filter: ReadFilters | None = None,
        quiet: bool = False,
    ):
        self.config = config
        self.out = Path(out_dir)
        self.device = resolve_device(config.device)
        self.data_parallel = DataParallel.from_environment(self.device)
        self.is_main = self.data_parallel is None or self.data_parallel.is_main
        self.quiet = quiet or not self.is_main
        d_sae = config.d_sae or config.expansion_factor * d_in
        dfc_fractions = option(config, "dfc_fractions")
        prefixes = option(config, "matryoshka_prefixes")
        self.matryoshka_sizes = matryoshka_sizes(prefixes, d_sae) if prefixes is not None else None
        self.delta_weight = option(config, "delta_weight")
        cc_config = CrossCoderConfig(
            d_in=d_in,
            d_sae=d_sae,
            activation=config.activation,
            k=config.k if config.uses_topk else None,
            norm_init_scale=config.norm_init_scale,
            code_normalization=config.code_normalization,
            input_scale=[float(s) for s in input_scale] if input_scale is not None else None,
            model_names=list(model_names) if model_names else None,
            layer=layer,
            dfc_partition=partition_sizes(d_sae, *dfc_fractions) if dfc_fractions is not None else None,
            metadata={"training": to_dict(config)},
        )
        if token_filter is not None:
            # The tokens the batches left out, resolved on the training data: analysis and the
            # causal experiment leave out the same ones (crossdiff.cache.store.ReadFilters).
            cc_config.metadata["token_filter"] = to_dict(token_filter)
        self.step = 0
        self.model = CrossCoder(cc_config, seed=config.seed)  # the setter moves it and makes the optimizer
        self.tokens = 0
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        # The sparse step pays off once the dictionary is large (it saves four of the five
        # [B, n*d, D] matmuls); on toy sizes its extra small kernels cost more than they save.
        auto_sparse = config.uses_topk and d_sae >= SPARSE_MIN_D_SAE
        self.sparse = auto_sparse if config.sparse is None else config.sparse
        self.max_grad_norm = (1.0 if config.uses_topk else 0.0) if config.max_grad_norm is None else config.max_grad_norm
        init = config.decoder_bias_init
        self.median_init = init == "geometric_median" or (init == "auto" and config.uses_topk)
        self._pre_buffer: Tensor | None = None
        self._wandb = None
        _warn_short_run(config)

    @property
    def model(self) -> CrossCoder:
        return self._model

    @model.setter
    def model(self, crosscoder: CrossCoder) -> None:
        """Start from given weights (``trainer.model = cc`` before :meth:`fit`): the optimizer
        is rebuilt for them and the decoder bias keeps its given value."""
        if hasattr(self, "_model"):
            if self.step:
                raise CrossdiffError("cannot replace the crosscoder after training started; make a new Trainer")
            want, got = self._model.config, crosscoder.config
            for key in ("n_models", "d_in", "d_sae", "activation", "dfc_partition"):
                if getattr(want, key) != getattr(got, key):
                    raise CrossdiffError(f"the given crosscoder has {key} {getattr(got, key)!r}, this Trainer's "
                                         f"config makes {getattr(want, key)!r}")
            if want.k != got.k and self.config.uses_topk:
                raise CrossdiffError(f"the given crosscoder has k {got.k!r}, this Trainer's config makes {want.k!r}")
            crosscoder.check_partition_intact(source="the given crosscoder")  # masked gradients keep whatever is there
            self.median_init = False  # the given decoder bias is part of the given weights
        self._model = crosscoder.to(self.device)
        self._sync_model()
        self.optimizer = _adam(list(self._model.parameters()), self.config.lr, tuple(self.config.adam_betas))

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Iterable[Any], *, resume: bool | Literal["auto"] = "auto") -> CrossCoder:
        """Train on ``batches`` until ``config.steps`` or the data ends; return the crosscoder.

        ``resume``: "auto" continues from the newest checkpoint in ``out_dir`` if there is
        one, True requires one, False refuses to mix with an existing run. The data position
        is restored through ``batches.load_state_dict`` when the iterable has it; otherwise
        the batches already trained on are skipped (the iterable must be deterministic).
        """
        # One run per output folder: two would append every metrics line twice.
        with output_lock(self.out, "train", take=self.is_main):
            return self._fit(batches, resume=resume)

    def _fit(self, batches: Iterable[Any], *, resume: bool | Literal["auto"]) -> CrossCoder:
        checkpoint = self._latest_checkpoint()
        iterator = self._open_data(batches, checkpoint, resume)
        progress = _progress_bar(self.config.steps, self.step, self.quiet)
        last_saved = self.step if checkpoint is not None else -1
        last_logged, last = self.step, None
        start = (time.perf_counter(), self.tokens)
        while self.config.steps is None or self.step < self.config.steps:
            batch, global_batch_size = self._next_batch(iterator)
            if batch is None:
                break
            x = self._prepare(batch)
            terms = self._train_step(x) if global_batch_size is None else self._train_step(x, global_batch_size)
            progress.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                record = self._log(x, terms, self._speed(start))
                last_logged = self.step
                progress.set_postfix(loss=f"{record['loss']:.4g}", fve=f"{record['fve_joint']:.3f}", l0=f"{record['l0']:.1f}")
            last = (x, terms)
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save_checkpoint(batches)
                last_saved = self.step
        progress.close()
        if self.step == 0:
            raise CrossdiffError("no training batch: the data is empty")
        if last is not None and last_logged != self.step:  # the data ran out between two log steps
            self._log(*last, self._speed(start))
        if last_saved != self.step:
            self.save_checkpoint(batches)
        return self._save_final()

    def _open_data(self, batches: Iterable[Any], checkpoint: Path | None, resume: bool | Literal["auto"]) -> Iterator[Any]:
        """The batches from where ``checkpoint`` (if any) left off; the run's files started."""
        if resume is True and checkpoint is None:
            raise CrossdiffError(f"nothing to resume: {self.out / 'checkpoints'} has no checkpoint")
        if resume is False and checkpoint is not None:
            raise CrossdiffError(f"{self.out} already holds a run (checkpoints/); resume it or choose another output folder")
        data_state = self._load_checkpoint(checkpoint) if checkpoint is not None else None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(self.config, self.out / "train_config.json")
            remove_stray_temporaries(self.out, "metrics.jsonl")  # a kill during an earlier resume's trim
            self._trim_metrics()
        skip = 0
        if data_state is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(data_state)
        elif checkpoint is not None:
            skip = self.step  # data without a state: replay it up to the checkpoint
        iterator = iter(batches)
        for _ in range(skip):
            if next(iterator, None) is None:
                raise CrossdiffError(f"cannot resume: the data ends before the {skip} batches already trained on")
        return iterator

    def _next_batch(self, iterator: Iterator[Any]) -> tuple[Any, int | None]:
        """The next batch (None: the data ended) and, under data parallelism, the global batch's size."""
        batch = next(iterator, None)
        if self.data_parallel is None:
            return batch, None
        # All ranks stop together when any runs out.
        global_batch_size = self.data_parallel.global_batch_size(None if batch is None else _batch_rows(batch))
        return (None, None) if global_batch_size is None else (batch, global_batch_size)

    def _speed(self, start: tuple[float, int]) -> float:
        """Tokens per second since ``start`` = (time, tokens)."""
        return (self.tokens - start[1]) / max(time.perf_counter() - start[0], 1e-9)

    def _save_final(self) -> CrossCoder:
        self._stamp_metadata()
        if self.is_main:
            self.model.save_pretrained(self.out / "crosscoder")
        if self._wandb is not None:
            self._wandb.finish()
        if self.data_parallel is not None:  # the crosscoder is on disk when fit returns on any rank
            self.data_parallel.barrier()
        return self.model

    def _prepare(self, batch: Any) -> Tensor:
        """A checked float batch on the training device."""
        x = batch.acts if hasattr(batch, "acts") else batch
        if not isinstance(x, Tensor):
            raise CrossdiffError(f"batches must be tensors [batch, 2, d_in] or have .acts; got {type(batch).__name__}")
        n, d = self.model.config.n_models, self.model.config.d_in
        if x.dim() != 3 or tuple(x.shape[1:]) != (n, d) or x.shape[0] == 0:
            raise CrossdiffError(f"batch at step {self.step + 1} has shape {list(x.shape)}, expected [batch, {n}, {d}]")
        # A bf16 batch stays bf16 for a bf16 run: the encoder product reads it as it is, and
        # float32 copies are made only of what needs them (the rest promotes element-wise).
        keep_bf16 = self.config.precision == "bf16" and x.dtype == torch.bfloat16
        x = x.to(self.device, torch.bfloat16 if keep_bf16 else torch.float32, non_blocking=True)
        if not bool(torch.isfinite(x).all()):
            raise CrossdiffError(f"batch at step {self.step + 1} contains NaN or inf activations")
        return x

    def _train_step(self, x: Tensor, global_batch_size: int | None = None):
        """One optimisation step on ``x``, this rank's part of a batch of ``global_batch_size``
        tokens (None: ``x`` is the whole batch)."""
        config, model, dp = self.config, self.model, self.data_parallel
        batch_size = global_batch_size or x.shape[0]
        if self.step == 0 and self.median_init:
            with torch.no_grad():  # once per run: the global batch's median needs all its tokens
                points = x if dp is None else torch.cat(dp.gather_rows(x))
                model.b_dec.copy_(geometric_median(points.float()))
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_at(self.step)
        if self.sparse and (self._pre_buffer is None or self._pre_buffer.shape[0] != x.shape[0]):
            # One reusable encoder output: allocating [B, d_sae] afresh every step costs page faults.
            self._pre_buffer = torch.empty(x.shape[0], model.config.d_sae, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            terms = crosscoder_losses(
                model,
                x,
                reconstruction=config.reconstruction,
                l1_coefficient=config.l1_coefficient,
                auxk_alpha=config.auxk_alpha,
                k_aux=config.k_aux,
                tokens_since_fired=self.tokens_since_fired,
                dead_after_tokens=config.dead_after_tokens,
                sparse=self.sparse,
                pre_out=self._pre_buffer,
                data_parallel=dp,
                global_batch_size=global_batch_size,
                matryoshka_sizes=self.matryoshka_sizes,
                delta_weight=self.delta_weight,
            )
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if dp is not None:
            dp.sum_gradients(model.parameters())
        model.mask_forbidden_gradients()  # DFC: before clipping and Adam, so the forbidden blocks stay exactly zero
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        self.optimizer.step()

        self.tokens_since_fired += batch_size
        self.tokens_since_fired[terms.fired] = 0
        if config.activation == "batchtopk" and self.step > config.threshold_start_step:
            with torch.no_grad():
                model.threshold.copy_(update_threshold(model.threshold, terms.min_selected, config.threshold_beta))
        self.step += 1
        self.tokens += batch_size
        return terms

    # ------------------------------------------------------------------ logging
    def _log(self, x: Tensor, terms, tokens_per_s: float) -> dict[str, float]:
        fve = fraction_of_variance_explained(x, terms.x_hat, self.data_parallel).tolist()
        loss, recon, sparsity = torch.stack([t.detach().float() for t in (terms.loss, terms.recon, terms.sparsity)])
        if self.data_parallel is not None:  # the ranks' shares add up to the global batch's values
            loss, recon, sparsity = self.data_parallel.sum_(torch.stack([loss, recon, sparsity]))
        delta = None
        if terms.delta is not None:
            delta = terms.delta.float() if self.data_parallel is None else self.data_parallel.sum_(terms.delta.float().reshape(1))[0]
        record = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": float(loss),
            "recon": float(recon),
            ("aux" if self.config.uses_topk else "l1"): float(sparsity),
            "fve_base": fve[0],
            "fve_chat": fve[1],
            "fve_joint": fve[-1],
            "l0": float(terms.l0),
            "dead_fraction": float((self.tokens_since_fired >= self.config.dead_after_tokens).float().mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "threshold": float(self.model.threshold),
            "tokens_per_s": tokens_per_s,
        }
        if delta is not None:
            record["delta"] = float(delta)
        if not math.isfinite(record["loss"]):
            raise CrossdiffError(f"the loss became {record['loss']} at step {self.step}; lower the learning rate")
        if not self.is_main:
            return record
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.config.wandb_project:
            self._wandb_log(record)
        return record

    def _wandb_log(self, record: dict[str, float]) -> None:
        if self._wandb is None:
            try:
                import wandb  # deferred: optional dependency (wandb, in crossdiff[wandb])
            except ImportError:
                raise CrossdiffError("wandb_project is set but wandb is not installed (pip install crossdiff[wandb])") from None
            wandb.init(project=self.config.wandb_project, name=self.config.wandb_run_name, config=to_dict(self.config))
            self._wandb = wandb
        self._wandb.log(record, step=self.step)

    def _trim_metrics(self) -> None:
        """Drop lines a crashed run logged after the checkpoint we resume from."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
            # Atomically: a kill while rewriting in place would lose the finished steps' lines.
            write_text_atomic(path, "".join(line + "\n" for line in lines))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, batches: Any = None) -> Path:
        """Write out/checkpoints/step-XXXXXX atomically (a temporary folder renamed at the end);
        rank 0 alone writes (all ranks hold the same state)."""
        root = self.out / "checkpoints"
        folder = root / f"step-{self.step:06d}"
        if not self.is_main:
            return folder
        tmp = root / f".tmp-step-{self.step:06d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._stamp_metadata()
        self.model.save_pretrained(tmp)
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "d_in": self.model.config.d_in,
            "config": to_dict(self.config),
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
        }
        try:
            torch.save(state, tmp / STATE_NAME)
        except (OSError, RuntimeError) as err:  # torch wraps a full disk in a RuntimeError
            raise write_error(tmp / STATE_NAME, err) from None
        write_checksums(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        rename(tmp, folder)
        for old in sorted(root.glob("step-*"))[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return folder

    def _latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint; damaged newer ones are set aside with a warning."""
        folder, damaged = newest_checkpoint(self.out)
        if folder is not None:
            # Rank 0 alone sets damaged checkpoints aside (the other ranks skip them too).
            for bad, why in damaged if self.is_main else []:
                kept = bad.with_name(f"damaged-{bad.name}")
                shutil.rmtree(kept, ignore_errors=True)
                rename(bad, kept)
                print(f"crossdiff: warning: checkpoint {bad} is damaged ({why}); resuming from {folder} "
                      f"instead (the damaged one is kept as {kept.name})", file=sys.stderr)
            return folder
        if damaged:
            reasons = "; ".join(f"checkpoint {bad} {why}" for bad, why in damaged)
            raise CrossdiffError(f"cannot resume: {reasons}; delete {self.out / 'checkpoints'} to start over")
        return None

    def _load_checkpoint(self, folder: Path) -> Any:
        """Restore everything from ``folder``; returns the saved data position (or None)."""
        state = load_tensors(folder / STATE_NAME)
        if state["d_in"] != self.model.config.d_in:
            raise CrossdiffError(f"cannot resume: the checkpoint has d_in={state['d_in']}, the data has {self.model.config.d_in}")
        # Keys added since the checkpoint was written take their defaults (they did not exist then).
        saved, now = {**to_dict(TrainConfig()), **state["config"]}, to_dict(self.config)
        for key in sorted(set(saved) | set(now)):
            if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
                raise CrossdiffError(f"cannot resume: config key '{key}' was {saved.get(key)!r} in {folder}, now {now.get(key)!r}")
        loaded = CrossCoder.from_pretrained(folder)
        self.model.load_checked_state_dict(loaded.state_dict(), source=str(folder / WEIGHTS_NAME))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["data"]

    def _sync_model(self) -> None:
        """Rank 0's weights and buffers on every rank (they are equal by construction, from
        the seed or a checkpoint; this makes it a fact, as DistributedDataParallel does)."""
        if self.data_parallel is not None:
            with torch.no_grad():
                for tensor in self.model.state_dict().values():
                    self.data_parallel.broadcast_(tensor)

    def _stamp_metadata(self) -> None:
        self.model.config.metadata.update({"training": to_dict(self.config), "steps": self.step, "tokens": self.tokens})


def newest_checkpoint(out: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of training folder ``out`` (None if there is none), and the
    damaged newer ones with what is wrong with each: the one rule for what a run resumes from."""
    damaged: list[tuple[Path, str]] = []
    for folder in sorted((Path(out) / "checkpoints").glob("step-*"), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def checkpoint_problem(folder: Path) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (a file missing or changed), or None."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME):
        if not (folder / name).is_file():
            return f"is missing {name}"
    return checksum_problem(folder)


def _batch_rows(batch: Any) -> int:
    x = batch.acts if hasattr(batch, "acts") else batch
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 0


def _logged_step(line: str) -> float:
    """Step of a metrics.jsonl line; infinite (dropped) for a blank line or one a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _adam(params: list[Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam, fused where this torch build supports it: one pass over each parameter instead
    of about ten (on a CPU the unfused update costs as much as a sparse training step's
    backward). Same update rule either way."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _progress_bar(total: int | None, initial: int, quiet: bool):
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=quiet, dynamic_ncols=True)


@torch.no_grad()
def synthetic_recovery(model: CrossCoder, pair) -> dict[str, float]:
    """How well ``model`` found the planted features of a SyntheticPair: the fraction with a
    latent of decoder cosine > 0.9, and the median Dnorm of the best-matching latents per kind."""
    learned = model.W_dec.detach().cpu().reshape(model.config.d_sae, -1)
    truth = pair.decoder_truth.reshape(pair.config.n_features, -1)
    cos = F.normalize(truth, dim=-1) @ F.normalize(learned, dim=-1).T
    best, match = cos.max(dim=1)
    dnorm = model.relative_decoder_norm().cpu()[match]
    result = {"recovered": float((best > 0.9).float().mean())}
    for kind in ("chat_only", "shared", "base_only"):
        idx = pair.features_of(kind)
        if idx.numel():
            result[f"dnorm_{kind}"] = float(dnorm[idx].median())
    result["best_cosines"] = best
    result["match_dnorm"] = dnorm
    return result
