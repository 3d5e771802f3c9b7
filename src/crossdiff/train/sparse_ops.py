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

A :class:`Selection` holds the (token, latent) pairs as two index tensors grouped by
token (non-decreasing rows), which is what ``embedding_bag`` and the CSR pattern of the
decoder's backward need.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Candidates for the batch top-k are found through the maxima of groups of GROUP consecutive
# tokens in each latent's column: one cheap reduction shrinks the tensor that the threshold
# comparison and the index extraction scan by GROUP times, and a group shares its latent,
# hence its code norm, so the test on the group maximum is as sharp as on single entries.
GROUP = 16
# The candidate threshold is estimated on every `SAMPLE_EVERY`-th group row and set so that
# about `OVERSHOOT` times the needed number of entries pass it; exactness never depends on
# either (a miss lowers the threshold, then falls back to a full top-k), only speed does.
SAMPLE_EVERY = 32
OVERSHOOT = 1.25
_RETRIES = 3
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
    with _one_cpu_thread():
        flat = flat.sort().values
    return Selection(torch.div(flat, d_sae, rounding_mode="floor"), flat % d_sae, batch_size)


@torch.no_grad()
def select_batch_topk(pre: Tensor, code_norm: Tensor, n_keep: int) -> Selection:
    """The ``n_keep`` entries of ``relu(pre) * code_norm`` that a full flattened top-k keeps.

    Exact: for a threshold t, the candidates are all entries whose scaled value can reach t
    (found through group maxima, :data:`GROUP`); if at least ``n_keep`` of them reach t,
    the ``n_keep``-th largest value is >= t, so the top-k of the candidates is the top-k
    of all entries. Otherwise t is lowered, and in the end the full top-k is used.
    ``code_norm`` must be positive.
    """
    B, D = pre.shape
    if n_keep >= B * D:
        return selection_from_flat(torch.arange(B * D, device=pre.device), B, D)
    group = math.gcd(B, GROUP)
    group_max = pre.view(B // group, group, D).amax(dim=1)
    with _one_cpu_thread():
        threshold = _estimate_threshold(group_max, code_norm, n_keep * group / B)
        for _ in range(_RETRIES if threshold is not None else 0):
            flat, scaled = _entries_reaching(pre, group_max, code_norm, threshold)
            if int((scaled >= threshold).sum()) >= n_keep:
                return selection_from_flat(flat[scaled.topk(n_keep, sorted=False).indices], B, D)
            threshold = threshold / 4
    scaled = torch.relu(pre) * code_norm
    return selection_from_flat(scaled.view(-1).topk(n_keep, sorted=False).indices, B, D)


def _estimate_threshold(group_max: Tensor, code_norm: Tensor, groups_needed: float) -> Tensor | None:
    """A scaled value that about OVERSHOOT * the needed entries reach, from a sample of group
    rows (a group row reaching t holds at least one entry reaching t)."""
    sample = group_max[::SAMPLE_EVERY]
    wanted = math.ceil(OVERSHOOT * groups_needed * sample.shape[0])
    if sample.shape[0] == group_max.shape[0] or wanted >= sample.numel():  # too small a batch for sampling to pay off
        return None
    threshold = (torch.relu(sample) * code_norm).view(-1).topk(wanted, sorted=False).values.min()
    return threshold if threshold > 0 else None


def _entries_reaching(pre: Tensor, group_max: Tensor, code_norm: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices and exact scaled values of a superset of the entries with
    ``relu(pre) * code_norm >= threshold`` (threshold > 0); ``group_max`` [B / group, D]
    holds the maxima of groups of consecutive tokens."""
    (B, D), group = pre.shape, pre.shape[0] // group_max.shape[0]
    # In raw units, lowered by a margin: comparing pre >= t / c may round differently from pre * c >= t.
    raw_threshold = threshold * (1 - _MARGIN) / code_norm
    hits = (group_max >= raw_threshold).view(-1).nonzero().squeeze(1)  # flat (group row, latent) indices
    group_rows, cols = hits.div(D, rounding_mode="floor"), hits % D
    raw = pre.view(-1, group, D).transpose(1, 2)[group_rows, cols]  # [hits, group]: the tokens of each hit group
    hit, member = (raw >= raw_threshold[cols].unsqueeze(1)).nonzero().unbind(1)
    cols = cols[hit]
    flat = (group_rows[hit] * group + member) * D + cols
    return flat, raw[hit, member] * code_norm[cols]


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
        D = ctx.d_sae
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            # d loss / d W = x^T @ G with G [B, D] non-zero only at (rows, cols): row j of G^T @ x
            # is the grad-weighted sum of the x rows that selected latent j, an embedding bag
            # (nnz * n*d multiply-adds instead of B * D * n*d).
            order, offsets = _grouped_by_latent(cols, D)
            with _one_cpu_thread():
                rows_by_latent, grad_by_latent = rows[order], grad[order]
            # x may be a bf16 batch (mixed precision): the weight gradient is summed in grad's dtype.
            per_latent = F.embedding_bag(rows_by_latent, x.to(grad.dtype), offsets, mode="sum", per_sample_weights=grad_by_latent)
            grad_weight = per_latent.t().contiguous()
        if ctx.needs_input_grad[3]:
            with _one_cpu_thread():
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
        with _one_cpu_thread():
            offsets = torch.searchsorted(rows, torch.arange(batch_size, device=rows.device))
        return F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, weight, rows, cols = ctx.saved_tensors
        B, D = ctx.batch_size, weight.shape[0]
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            # <grad[b], weight[j]> only at the selected (b, j): a sampled matmul.
            with _one_cpu_thread():
                crow = torch.searchsorted(rows, torch.arange(B + 1, device=rows.device))
            with warnings.catch_warnings():  # "sparse CSR support is in beta": not actionable for users
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(values), (B, D), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            # Row j: sum over the tokens that selected latent j of f[b, j] * grad[b] (F^T @ grad).
            order, offsets = _grouped_by_latent(cols, D)
            with _one_cpu_thread():
                rows_by_latent, values_by_latent = rows[order], values[order]
            grad_weight = F.embedding_bag(rows_by_latent, grad, offsets, mode="sum", per_sample_weights=values_by_latent)
        return grad_values, grad_weight, None, None, None


def sparse_decode(values: Tensor, selection: Selection, weight: Tensor) -> Tensor:
    """sum_j f[b, j] * weight[j] for the selected entries: [B, n*d] from ``values`` [nnz]
    and ``weight`` [D, n*d]; no bias. Differentiable in ``values`` and ``weight``; the
    backward touches only selected decoder rows (never a dense [B, D] tensor)."""
    return _SparseDecode.apply(values, weight, selection.rows, selection.cols, selection.batch_size)


def _grouped_by_latent(cols: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """A permutation of the entries that groups them by latent (stable: deterministic sums)
    and the offset of each latent's group, as ``embedding_bag`` takes them."""
    with _one_cpu_thread():
        order = torch.argsort(cols, stable=True)
        counts = torch.bincount(cols, minlength=d_sae)
        return order, torch.cumsum(counts, 0) - counts


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Run small bookkeeping ops (sorts, index permutations of ~1e5 entries) on one CPU thread.

    torch's parallel CPU sort of 1e5 int64 keys is ~100x slower than the serial one (3 ms),
    and every parallel op on a machine whose other cores are busy waits for a time slice
    (~10 ms) to join its threads, which dwarfs the work of an op this small."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
