"""Sparse building blocks for the training step: exact batch top-k and sparse gradients.

With BatchTopK only k*B of the B*D latent activations of a batch are non-zero (k=100 of
D=73,728 in the paper: 0.14%). A dense step spends five B x (n*d) x D matmuls on them:
encoder forward, decoder forward, the decoder's two gradients and the encoder's weight
gradient. Only the first is really dense. This module lets everything else touch just
the selected (token, latent) pairs:

* :func:`select_batch_topk` finds the k*B largest scaled activations exactly, without a
  full top-k over B*D elements (which costs as much as the encoder matmul on a CPU);
* :func:`gather_pre_activations` returns the selected pre-activations of an encoder
  forward computed without autograd, with a backward that builds the encoder's weight
  gradient as x^T @ (sparse gradient);
* :func:`sparse_decode` decodes (token, latent, value) triples by gathering decoder rows
  (``embedding_bag``), whose backward only touches the selected rows.

A selection is a sorted 1-D tensor of flat indices ``token * D + latent``; sorted means
grouped by token, which is what ``embedding_bag`` needs.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# The candidate threshold is estimated on every `SAMPLE_EVERY`-th token and set so that
# about `OVERSHOOT` times the needed number of entries pass it; exactness never depends on
# either (a miss falls back to a full top-k), only speed does.
SAMPLE_EVERY = 32
OVERSHOOT = 1.25
# A relative margin larger than any float rounding in comparing pre >= t / c versus pre * c >= t.
_MARGIN = 1e-5


class Selection(NamedTuple):
    """Active (token, latent) pairs of a batch, grouped by token."""

    rows: Tensor
    """[nnz] token index of each entry (non-decreasing)."""
    cols: Tensor
    """[nnz] latent index of each entry."""
    batch_size: int
    """Number of tokens B (rows may skip tokens with no active latent)."""


def selection_from_flat(flat: Tensor, batch_size: int, d_sae: int) -> Selection:
    flat = flat.sort().values
    return Selection(torch.div(flat, d_sae, rounding_mode="floor"), flat % d_sae, batch_size)


@torch.no_grad()
def select_batch_topk(pre: Tensor, code_norm: Tensor, n_keep: int) -> Selection:
    """The ``n_keep`` entries of ``relu(pre) * code_norm`` that a full flattened top-k keeps.

    Exact: candidates are the entries above a threshold estimated from a sample of tokens;
    if fewer than ``n_keep`` pass it, or the kept set comes within rounding distance of it,
    the full top-k is used instead. ``code_norm`` must be positive.
    """
    B, D = pre.shape
    if n_keep >= B * D:
        return selection_from_flat(torch.arange(B * D, device=pre.device), B, D)
    threshold = _estimate_threshold(pre, code_norm, n_keep)
    if threshold is not None:
        # pre >= t / c avoids materialising the scaled [B, D] tensor; t > 0 also drops relu's zeros.
        candidates = (pre >= threshold / code_norm).view(-1).nonzero().squeeze(1)
        if candidates.numel() >= n_keep:
            scaled = pre.view(-1)[candidates] * code_norm[candidates % D]
            top = scaled.topk(n_keep, sorted=False)
            if top.values.min() > threshold * (1 + _MARGIN):
                return selection_from_flat(candidates[top.indices], B, D)
    scaled = torch.relu(pre) * code_norm
    return selection_from_flat(scaled.view(-1).topk(n_keep, sorted=False).indices, B, D)


def _estimate_threshold(pre: Tensor, code_norm: Tensor, n_keep: int) -> Tensor | None:
    B, D = pre.shape
    sample = pre[::SAMPLE_EVERY]
    wanted = math.ceil(OVERSHOOT * n_keep * sample.shape[0] / B)
    if sample.shape[0] == B or wanted >= sample.numel():  # too small a batch for sampling to pay off
        return None
    threshold = (torch.relu(sample) * code_norm).view(-1).topk(wanted, sorted=False).values.min()
    return threshold if threshold > 0 else None


@torch.no_grad()
def select_topk_per_token(pre: Tensor, code_norm: Tensor, k: int) -> Selection:
    """The k largest ``relu(pre) * code_norm`` of every token (per-token TopK)."""
    B, D = pre.shape
    idx = (torch.relu(pre) * code_norm).topk(min(k, D), dim=-1, sorted=False).indices
    rows = torch.arange(B, device=pre.device)[:, None].expand_as(idx)
    return selection_from_flat((rows * D + idx).reshape(-1), B, D)


@torch.no_grad()
def select_positive(pre: Tensor) -> Selection:
    """All entries with a positive pre-activation (the active set of a ReLU crosscoder)."""
    B, D = pre.shape
    return selection_from_flat(pre.view(-1).gt(0).nonzero().squeeze(1), B, D)


class _GatherPreActivations(torch.autograd.Function):
    """pre[rows, cols] for pre = x @ W + b computed elsewhere without autograd."""

    @staticmethod
    def forward(ctx, pre: Tensor, x: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x, rows, cols)
        ctx.d_sae = weight.shape[1]
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rows, cols = ctx.saved_tensors
        D, B = ctx.d_sae, x.shape[0]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            # d loss / d W = x^T @ G with G [B, D] non-zero only at (rows, cols): computed as
            # (G^T @ x)^T with a sparse G^T, i.e. nnz * n*d multiply-adds instead of B * D * n*d.
            g_t = _sparse_coo(torch.stack([cols, rows]), grad, (D, B))
            grad_weight = torch.sparse.mm(g_t, x).t()
        if ctx.needs_input_grad[3]:
            grad_bias = torch.zeros(D, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return None, None, grad_weight, grad_bias, None, None


def gather_pre_activations(pre: Tensor, x: Tensor, weight: Tensor, bias: Tensor, selection: Selection) -> Tensor:
    """Selected pre-activations [nnz], differentiable with respect to ``weight`` [n*d, D] and
    ``bias`` [D] as if ``pre`` [B, D] were ``x @ weight + bias`` (``x`` gets no gradient)."""
    return _GatherPreActivations.apply(pre.detach(), x.detach(), weight, bias, selection.rows, selection.cols)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, weight: Tensor, rows: Tensor, cols: Tensor, batch_size: int) -> Tensor:
        ctx.save_for_backward(values, weight, rows, cols)
        ctx.batch_size = batch_size
        offsets = torch.searchsorted(rows, torch.arange(batch_size, device=rows.device))
        return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, weight, rows, cols = ctx.saved_tensors
        B, D = ctx.batch_size, weight.shape[0]
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            # <grad[b], weight[j]> only at the selected (b, j): a sampled matmul.
            crow = torch.searchsorted(rows, torch.arange(B + 1, device=rows.device))
            with warnings.catch_warnings():  # "sparse CSR support is in beta": not actionable for users
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(values), (B, D), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            # sum over the tokens that selected latent j of f[b, j] * grad[b]: F^T @ grad, sparse F.
            f_t = _sparse_coo(torch.stack([cols, rows]), values, (D, B))
            grad_weight = torch.sparse.mm(f_t, grad)
        return grad_values, grad_weight, None, None, None


def sparse_decode(values: Tensor, selection: Selection, weight: Tensor) -> Tensor:
    """sum_j f[b, j] * weight[j] for the selected entries: [B, n*d] from ``values`` [nnz]
    and ``weight`` [D, n*d]; no bias. Differentiable in ``values`` and ``weight``; the
    backward touches only selected decoder rows (never a dense [B, D] tensor)."""
    return _SparseDecode.apply(values, weight, selection.rows, selection.cols, selection.batch_size)


def _sparse_coo(indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, size, is_coalesced=False, check_invariants=False)
