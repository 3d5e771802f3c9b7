"""The training objective of docs/method.md 3, as small functions, and the step that composes them.

Conventions (all follow the reference code, science-of-finetuning/crosscoder_learning):

* ``x`` is a batch [B, n_models, d_in] in crosscoder space; ``x_hat`` its reconstruction.
* Raw activations ``f`` decode; scaled ones ``f~ = f * code_norm`` are penalised, ranked
  for BatchTopK and thresholded.
* Reconstruction is the unsquared L2 error mean_{b,m} ||x_m - x_hat_m||_2 (the published
  checkpoints); ``squared`` gives mean_{b,m} ||x_m - x_hat_m||^2 (the paper text).

:func:`crosscoder_losses` runs one forward pass for any of the three activations, either
densely (plain autograd: the reference maths, and the right choice while most latents
fire) or sparsely (:mod:`crossdiff.train.sparse_ops`: only the selected latents are decoded and
back-propagated). Both give the same losses and gradients up to float rounding.

Two variants change the objective (crossdiff.train.variants, docs/method.md 8): Matryoshka
replaces the reconstruction term by the mean over nested prefixes of each prefix's own
reconstruction term; Delta adds a weighted term on the chat-minus-base difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from crossdiff.crosscoder import CrossCoder
from crossdiff.train.config import Reconstruction
from crossdiff.train.sparse_ops import (
    Selection,
    gather_pre_activations,
    select_batch_topk,
    select_positive,
    select_topk_per_token,
    sparse_decode,
)

if TYPE_CHECKING:
    from crossdiff.train.distributed import DataParallel



# ---------------------------------------------------------------------- loss terms
def reconstruction_loss(x: Tensor, x_hat: Tensor, kind: Reconstruction = "l2") -> Tensor:
    """Mean over tokens and models of the per-model error norm (``l2``) or squared norm."""
    squared = (x - x_hat).square().sum(dim=-1)  # [B, n_models]
    return squared.mean() if kind == "squared" else squared.sqrt().mean()


def matryoshka_reconstruction(x: Tensor, prefix_reconstructions: Sequence[Tensor], kind: Reconstruction = "l2") -> Tensor:
    """Matryoshka reconstruction term: the mean over the nested prefixes m_1 < ... < m_P = D
    of the reconstruction term of each prefix on its own, where prefix i's reconstruction is
    b_dec + sum_{j < m_i} f_j W_dec[j] with the activations f selected once on the whole
    dictionary (Bussmann et al. 2025)."""
    return torch.stack([reconstruction_loss(x, x_hat, kind) for x_hat in prefix_reconstructions]).mean()


def delta_loss(x: Tensor, x_hat: Tensor, kind: Reconstruction = "l2", base: int = 0, chat: int = 1) -> Tensor:
    """Delta-Crosscoder's difference term (our reading of arXiv 2603.04426, docs/method.md 8):
    mean over tokens of ||(x_chat - x_base) - (x_hat_chat - x_hat_base)|| (squared for
    ``squared``), the error in reconstructing what changed between the models."""
    error = (x[:, chat] - x[:, base]) - (x_hat[:, chat] - x_hat[:, base])
    squared = error.square().sum(dim=-1)  # [B]
    return squared.mean() if kind == "squared" else squared.sqrt().mean()


def l1_penalty(scaled: Tensor, batch_size: int) -> Tensor:
    """mean_b sum_j f~_bj, from scaled activations given densely [B, D] or as a list [nnz]."""
    return scaled.sum() / batch_size


def auxk_loss(
    residual: Tensor, aux_reconstruction: Tensor, data_parallel: DataParallel | None = None, global_batch_size: int = 0
) -> Tensor:
    """Dead-latent loss: squared error of fitting the (detached) residual [B, n*d] with the
    dead latents' bias-free reconstruction, over the residual's variance (OpenAI's
    normalisation, as in the reference); 0 when the residual has no variance (where the
    reference's nan_to_num would give 0 for 0/0 but the largest float for x/0).

    With ``data_parallel`` the variance is the global batch's and the result is this
    rank's share (the shares of all ranks sum to the global loss)."""
    if data_parallel is not None:
        return _auxk_loss_share(residual, aux_reconstruction, data_parallel, global_batch_size)
    error = (residual - aux_reconstruction).square().sum(dim=-1).mean()
    variance = (residual - residual.mean(dim=0)).square().sum(dim=-1).mean()
    return torch.where(variance > 0, error / variance.clamp_min(torch.finfo(variance.dtype).tiny), 0.0)


def _auxk_loss_share(residual: Tensor, aux_reconstruction: Tensor, dp: DataParallel, global_batch_size: int) -> Tensor:
    mean = dp.sum_(residual.sum(dim=0)) / global_batch_size  # the residual is detached: no autograd across ranks
    variance = dp.sum_((residual - mean).square().sum()) / global_batch_size
    error_share = (residual - aux_reconstruction).square().sum() / global_batch_size
    return torch.where(variance > 0, error_share / variance.clamp_min(torch.finfo(variance.dtype).tiny), 0.0)


def fraction_of_variance_explained(x: Tensor, x_hat: Tensor, data_parallel: DataParallel | None = None) -> Tensor:
    """[n_models + 1]: FVE of each model, then of all models jointly;
    FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the (global) batch."""
    if data_parallel is None:
        error = (x - x_hat).square().sum(dim=(0, 2))
        total = (x - x.mean(dim=0)).square().sum(dim=(0, 2))
    else:
        x = x.float()
        sums = data_parallel.sum_(torch.cat([x.sum(dim=0).reshape(-1), x.new_tensor([x.shape[0]])]))
        mean = sums[:-1].reshape(x.shape[1:]) / sums[-1]
        error, total = data_parallel.sum_(torch.stack([(x - x_hat).square().sum(dim=(0, 2)), (x - mean).square().sum(dim=(0, 2))]))
    per_model = 1 - error / total
    return torch.cat([per_model, (1 - error.sum() / total.sum()).reshape(1)])


def update_threshold(theta: Tensor, batch_min: Tensor, beta: float = 0.999) -> Tensor:
    """BatchTopK inference threshold: the first value as is, then an EMA with weight ``beta``
    on the old value. ``theta`` < 0 means not yet set."""
    if theta < 0:
        return batch_min.to(theta.dtype).clone()
    return beta * theta + (1 - beta) * batch_min.to(theta.dtype)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Per-model geometric median [n_models, d_in] of ``points`` [N, n_models, d_in]
    (Weiszfeld iterations from the mean, in float64; the reference's b_dec init)."""
    p = points.double()
    guess = p.mean(dim=0)
    for _ in range(max_iter):
        previous = guess
        weights = 1 / (p - guess).norm(dim=-1).clamp_min(1e-12)  # [N, n]
        weights = weights / weights.sum(dim=0, keepdim=True)
        guess = (weights.unsqueeze(-1) * p).sum(dim=0)
        if bool(((guess - previous).norm(dim=-1) < tol).all()):
            break
    return guess.to(points.dtype)


# ---------------------------------------------------------------------- one forward pass
class LossTerms(NamedTuple):
    """Under data parallelism ``loss``, ``recon`` and ``sparsity`` are this rank's shares (they
    sum over ranks to the global batch's values); ``fired``, ``min_selected`` and ``l0`` are
    the global batch's."""

    loss: Tensor
    """The total loss to back-propagate."""
    recon: Tensor
    """Reconstruction term."""
    sparsity: Tensor
    """Unweighted L1 penalty (relu) or auxiliary dead-latent loss (top-k activations)."""
    x_hat: Tensor
    """Detached reconstruction [B, n_models, d_in]."""
    fired: Tensor
    """[d_sae] bool: latents with a positive activation in this batch."""
    min_selected: Tensor
    """Smallest positive scaled activation kept by the top-k rule (0 if none, and always 0
    for relu): the quantity the BatchTopK threshold averages."""
    l0: Tensor
    """Mean number of active latents per token."""
    delta: Tensor | None = None
    """Delta-Crosscoder's unweighted difference term (None for the other variants)."""


def crosscoder_losses(
    model: CrossCoder,
    x: Tensor,
    *,
    reconstruction: Reconstruction = "l2",
    l1_coefficient: float = 0.041,
    auxk_alpha: float = 1 / 32,
    k_aux: int | None = None,
    tokens_since_fired: Tensor | None = None,
    dead_after_tokens: int = 10_000_000,
    sparse: bool = False,
    pre_out: Tensor | None = None,
    data_parallel: DataParallel | None = None,
    global_batch_size: int | None = None,
    matryoshka_sizes: Sequence[int] | None = None,
    delta_weight: float | None = None,
) -> LossTerms:
    """Losses of one training batch [B, n_models, d_in] (training mode: batch top-k, never
    the threshold).

    ``tokens_since_fired`` [d_sae] counts tokens since each latent last fired, before this
    batch; as in the reference, a latent is dead for the auxiliary loss when it did not fire
    in this batch either and the count reaches ``dead_after_tokens``. ``k_aux`` defaults to
    d_in // 2. ``sparse`` picks the sparse implementation; ``pre_out`` is an optional
    reusable [B, d_sae] buffer for its encoder output.

    ``data_parallel``: ``x`` is this rank's part of a global batch of ``global_batch_size``
    tokens (None: summed over the ranks), and every batch-wide quantity is the global
    batch's (crossdiff.train.distributed).

    ``matryoshka_sizes``: nested prefix sizes ending at d_sae (Matryoshka: the reconstruction
    term is :func:`matryoshka_reconstruction`); ``delta_weight``: adds that multiple of
    :func:`delta_loss` (Delta-Crosscoder).
    Under bf16 autocast the encoder and decoder products run in bf16 with float32 results.
    """
    config = model.config
    B, dp = x.shape[0], data_parallel
    # Tokens of the whole (global) batch; asking the ranks is one more all-reduce.
    B_all = B if dp is None else int(global_batch_size or dp.global_batch_size(B))
    code_norm = model.code_norm()
    encoded = (_forward_sparse(model, x, code_norm, pre_out, dp, B_all) if sparse
               else _forward_dense(model, x, code_norm, dp, B_all))
    l0, min_selected = _selection_stats(encoded, x, config.activation, dp, B_all)
    recon = _reconstruction_term(x, encoded.x_hat, reconstruction, matryoshka_sizes, encoded.decode_prefix)
    if dp is not None:
        recon = recon * (B / B_all)  # this rank's share
    if config.activation == "relu":
        sparsity = l1_penalty(encoded.scaled, B_all)
        loss = recon + l1_coefficient * sparsity
    else:
        dead = _dead(encoded.fired, tokens_since_fired, B_all, dead_after_tokens)
        sparsity = _auxk_term(model, x, encoded.x_hat, encoded.pre, code_norm.detach(), dead, k_aux or config.d_in // 2,
                              sparse, dp, B_all)
        loss = recon + auxk_alpha * sparsity
    delta = None
    if delta_weight is not None:
        delta = delta_loss(x, encoded.x_hat, reconstruction) * (B / B_all)  # this rank's share of the mean
        loss = loss + delta_weight * delta
    return LossTerms(loss, recon.detach(), sparsity.detach(), encoded.x_hat.detach(), encoded.fired, min_selected, l0,
                     None if delta is None else delta.detach())


def _dead(fired: Tensor, tokens_since_fired: Tensor | None, B_all: int, dead_after_tokens: int) -> Tensor:
    """[D] bool: latents silent in this batch whose count of silent tokens reaches the limit
    (none without counts)."""
    dead = ~fired
    if tokens_since_fired is not None:
        dead &= tokens_since_fired + B_all >= dead_after_tokens
    else:
        dead[:] = False
    return dead


class _Encoded(NamedTuple):
    """One forward pass of a training batch, dense or sparse."""

    pre: Tensor | None  # encoder pre-activations [B, D] (for the auxiliary loss)
    x_hat: Tensor  # reconstruction [B, n_models, d_in]
    scaled: Tensor  # scaled activations f * code_norm, dense [B, D] or of the selected latents
    fired: Tensor  # [D] bool: latents with a positive activation in this (rank's) batch
    decode_prefix: Callable[[int], Tensor]  # reconstruction from the first m latents (Matryoshka)


def _forward_sparse(model: CrossCoder, x: Tensor, code_norm: Tensor, pre_out: Tensor | None, dp: DataParallel | None,
                    B_all: int) -> _Encoded:
    D = model.config.d_sae
    pre, selection, values = _encode_sparse(model, x, code_norm.detach(), pre_out, dp, B_all)
    x_hat = sparse_decode(values, selection, model.W_dec.reshape(D, -1)).reshape(x.shape) + model.b_dec
    scaled = values * code_norm[selection.cols]  # differentiable through code_norm: the L1 term needs it
    fired = torch.zeros(D, dtype=torch.bool, device=x.device)
    fired[selection.cols[values.detach() > 0]] = True

    def decode_prefix(m: int) -> Tensor:
        kept = values * (selection.cols < m)
        return sparse_decode(kept, selection, model.W_dec.reshape(D, -1)).reshape(x.shape) + model.b_dec

    return _Encoded(pre, x_hat, scaled, fired, decode_prefix)


def _forward_dense(model: CrossCoder, x: Tensor, code_norm: Tensor, dp: DataParallel | None, B_all: int) -> _Encoded:
    config = model.config
    pre = model.pre_activations(x)
    f = _encode_dense(torch.relu(pre), code_norm.detach(), config.activation, config.k, dp, B_all)

    def decode_prefix(m: int) -> Tensor:
        return (f[:, :m] @ model.W_dec[:m].reshape(m, -1)).reshape(x.shape) + model.b_dec

    return _Encoded(pre, model.decode(f), f * code_norm, (f.detach() > 0).any(dim=0), decode_prefix)


def _selection_stats(encoded: _Encoded, x: Tensor, activation: str, dp: DataParallel | None, B_all: int) -> tuple[Tensor, Tensor]:
    """(L0, smallest selected scaled activation) of the (global) batch; under data parallelism
    ``encoded.fired`` becomes the global batch's too."""
    scaled = encoded.scaled
    active = scaled.detach() > 0
    if dp is None:
        l0 = active.sum() / x.shape[0]
        min_selected = torch.zeros((), dtype=x.dtype, device=x.device)
        if activation != "relu" and bool(active.any()):  # only the top-k threshold needs it
            min_selected = torch.where(active, scaled.detach(), torch.inf).min()
        return l0, min_selected
    dp.any_(encoded.fired)
    l0 = dp.sum_(active.sum().reshape(1))[0] / B_all
    min_selected = torch.zeros((), dtype=scaled.dtype, device=x.device)
    if activation != "relu":
        smallest = torch.where(active, scaled.detach(), torch.inf).amin() if active.numel() else torch.tensor(torch.inf)
        smallest = dp.min_(smallest.reshape(1).to(scaled.dtype))[0]
        min_selected = torch.where(torch.isinf(smallest), 0.0, smallest).to(min_selected)
    return l0, min_selected


def _reconstruction_term(x: Tensor, x_hat: Tensor, kind: Reconstruction, sizes: Sequence[int] | None, decode_prefix) -> Tensor:
    """The reconstruction term: of the whole dictionary, or Matryoshka's mean over prefixes."""
    if not sizes:
        return reconstruction_loss(x, x_hat, kind)
    return matryoshka_reconstruction(x, [decode_prefix(m) for m in sizes[:-1]] + [x_hat], kind)


def _encode_dense(
    f: Tensor, code_norm: Tensor, activation: str, k: int | None, dp: DataParallel | None = None, global_batch: int = 0
) -> Tensor:
    """The reference's training-mode sparsity on dense post-ReLU activations f [B, D]:
    rank by scaled value, keep raw values."""
    if activation == "relu":
        return f
    scores = f.detach() * code_norm
    if activation == "topk":
        idx = scores.topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))
    if dp is not None:
        selection = dp.batch_topk(f.detach(), code_norm, k * global_batch, global_batch)
        idx = selection.rows * f.shape[1] + selection.cols
    else:
        idx = scores.reshape(-1).topk(k * f.shape[0], sorted=False).indices
    return torch.zeros_like(f).reshape(-1).scatter(0, idx, f.reshape(-1)[idx]).reshape(f.shape)


def _encode_sparse(
    model: CrossCoder, x: Tensor, code_norm: Tensor, pre_out: Tensor | None,
    dp: DataParallel | None = None, global_batch: int = 0,
) -> tuple[Tensor, Selection, Tensor]:
    """Dense encoder matmul without autograd, exact selection, and the selected raw
    activations with a sparse backward into W_enc and b_enc."""
    config = model.config
    B, D = x.shape[0], config.d_sae
    x_flat = x.reshape(B, -1)
    w_enc = model.W_enc.reshape(-1, D)
    if pre_out is not None and (pre_out.shape != (B, D) or pre_out.dtype != model.b_enc.dtype):
        pre_out = None
    with torch.no_grad():
        if torch.is_autocast_enabled(x.device.type):
            # Autocast skips out= variants: the product in the autocast dtype (float32
            # accumulation), the bias added in float32, as autocast treats the dense path.
            low = torch.get_autocast_dtype(x.device.type)
            product = torch.mm(x_flat.to(low), w_enc.to(low))
            pre = torch.add(product, model.b_enc, out=pre_out) if pre_out is not None else product + model.b_enc
            del product
        elif pre_out is not None:
            pre = torch.addmm(model.b_enc, x_flat, w_enc, out=pre_out)
        else:
            pre = torch.addmm(model.b_enc, x_flat, w_enc)
    if config.activation == "batchtopk" and dp is not None:
        selection = dp.batch_topk(pre, code_norm, config.k * global_batch, global_batch)
    elif config.activation == "batchtopk":
        selection = select_batch_topk(pre, code_norm, config.k * B)
    elif config.activation == "topk":
        selection = select_topk_per_token(pre, code_norm, config.k)
    else:
        selection = select_positive(pre)
    values = torch.relu(gather_pre_activations(pre, x_flat, w_enc, model.b_enc, selection))
    return pre, selection, values


def _auxk_term(
    model: CrossCoder, x: Tensor, x_hat: Tensor, pre: Tensor, code_norm: Tensor, dead: Tensor, k_aux: int, sparse: bool,
    dp: DataParallel | None = None, global_batch: int = 0,
) -> Tensor:
    """Auxiliary loss: each token's k_aux dead latents with the largest scaled activation
    (top-k taken before the batch top-k) decode, without bias, the detached residual."""
    dead_latents = dead.nonzero().squeeze(1)
    if dead_latents.numel() == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    B, D = x.shape[0], model.config.d_sae
    k = min(k_aux, dead_latents.numel())
    with torch.no_grad():
        scores = torch.relu(pre.detach()[:, dead_latents]) * code_norm[dead_latents]
        cols = dead_latents[scores.topk(k, dim=-1, sorted=False).indices]  # [B, k]
        rows = torch.arange(B, device=x.device)[:, None].expand_as(cols)
    residual = (x - x_hat).detach().reshape(B, -1)
    if sparse:
        selection = Selection(rows.reshape(-1), cols.reshape(-1), B)
        values = torch.relu(gather_pre_activations(pre, x.reshape(B, -1), model.W_enc.reshape(-1, D), model.b_enc, selection))
        aux = sparse_decode(values, selection, model.W_dec.reshape(D, -1))
    else:
        f = torch.relu(pre)
        f_aux = torch.zeros_like(f).scatter(-1, cols, f.gather(-1, cols))
        aux = model.decode(f_aux, add_bias=False).reshape(B, -1)
    return auxk_loss(residual, aux, dp, global_batch)
