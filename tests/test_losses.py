"""Loss terms against hand-computed values, the composed objective against a brute-force
float64 version, and the sparse step against the dense one."""

import math

import pytest
import torch

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.train.losses import (
    auxk_loss,
    crosscoder_losses,
    fraction_of_variance_explained,
    geometric_median,
    l1_penalty,
    reconstruction_loss,
    update_threshold,
)
from crossdiff.train.sparse_ops import gather_pre_activations, select_batch_topk, sparse_decode


# ---------------------------------------------------------------------- single terms
def test_reconstruction_loss_by_hand():
    x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])  # [B=2, n=2, d=2]
    x_hat = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.0, 0.0]]])
    # per (token, model) error norms: 5, 0, 2, 0
    assert reconstruction_loss(x, x_hat).item() == pytest.approx((5 + 0 + 2 + 0) / 4)
    assert reconstruction_loss(x, x_hat, "squared").item() == pytest.approx((25 + 0 + 4 + 0) / 4)


def test_l1_penalty_by_hand_dense_and_listed():
    scaled = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.5]])
    assert l1_penalty(scaled, 2).item() == pytest.approx(6.5 / 2)
    assert l1_penalty(scaled[scaled > 0], 2).item() == pytest.approx(6.5 / 2)


def test_auxk_loss_by_hand():
    residual = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    aux = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # error: (1 + 0, 4 + 1) -> mean 3; variance: mean of ||r - (2, 0)||^2 = (1 + 1) / 2 = 1
    assert auxk_loss(residual, aux).item() == pytest.approx(3.0)
    constant = torch.ones(4, 2)
    assert auxk_loss(constant, torch.zeros(4, 2)).item() == 0.0  # no variance: 0, not NaN


def test_fve_by_hand():
    x = torch.tensor([[[1.0], [2.0]], [[3.0], [6.0]]])  # base 1, 3 (var sum 2); chat 2, 6 (var sum 8)
    x_hat = torch.tensor([[[1.0], [3.0]], [[2.0], [6.0]]])  # base error 1, chat error 1
    fve = fraction_of_variance_explained(x, x_hat)
    assert fve.tolist() == pytest.approx([1 - 1 / 2, 1 - 1 / 8, 1 - 2 / 10])


def test_threshold_ema_rule():
    theta = torch.tensor(-1.0)
    theta = update_threshold(theta, torch.tensor(0.5))
    assert theta.item() == pytest.approx(0.5)  # first value taken as is
    theta = update_threshold(theta, torch.tensor(1.5), beta=0.999)
    assert theta.item() == pytest.approx(0.999 * 0.5 + 0.001 * 1.5)


def test_geometric_median_majority_point_and_optimality():
    points = torch.tensor([[[1.0, 2.0]]] * 3 + [[[50.0, -40.0]], [[-30.0, 90.0]]])  # [5, 1, 2]
    assert geometric_median(points)[0].tolist() == pytest.approx([1.0, 2.0], abs=1e-4)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(200, 2, 5, generator=g, dtype=torch.float64) ** 3  # heavy tails
    median = geometric_median(points, max_iter=1000, tol=1e-12)
    # Optimality: the unit vectors towards the points sum to zero at the geometric median.
    units = (points - median) / (points - median).norm(dim=-1, keepdim=True)
    assert units.sum(dim=0).norm(dim=-1).max().item() < 1e-4 * len(points)
    assert not torch.allclose(median, points.mean(dim=0), atol=1e-2)  # robust, not the mean


# ---------------------------------------------------------------------- composed objective
def _tiny_model(activation, d_in=3, d_sae=5, k=2, dtype=torch.float64, seed=0):
    model = CrossCoder(CrossCoderConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k if activation != "relu" else None), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # break the encoder/decoder tie and the per-model symmetry of the init
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        model.b_enc.add_(0.3)
    return model.to(dtype)


def _brute_force(model, x, *, mu, alpha, k_aux, dead):
    """docs/method.md 3 written with Python loops over tokens and latents (float64)."""
    B, n, d = x.shape
    W_enc, b_enc, W_dec, b_dec = model.W_enc, model.b_enc, model.W_dec, model.b_dec
    D, k = model.config.d_sae, model.config.k
    c = [sum(W_dec[j, m].norm() for m in range(n)) for j in range(D)]
    f = [[torch.relu(sum(x[b, m] @ W_enc[m, :, j] for m in range(n)) + b_enc[j]) for j in range(D)] for b in range(B)]
    if model.config.activation == "batchtopk":
        order = sorted(((f[b][j] * c[j]).item(), b, j) for b in range(B) for j in range(D))
        keep = {(b, j) for _, b, j in order[-k * B:]}
        kept = [[f[b][j] if (b, j) in keep else f[b][j] * 0 for j in range(D)] for b in range(B)]
    else:
        kept = f
    recon, l1 = 0, 0
    residual = []
    for b in range(B):
        for m in range(n):
            x_hat = sum(kept[b][j] * W_dec[j, m] for j in range(D)) + b_dec[m]
            recon = recon + (x[b, m] - x_hat).norm() / (B * n)
        residual.append(torch.cat([x[b, m] - sum(kept[b][j] * W_dec[j, m] for j in range(D)) - b_dec[m] for m in range(n)]))
        l1 = l1 + sum(kept[b][j] * c[j] for j in range(D)) / B
    if model.config.activation == "relu":
        return recon + mu * l1
    residual = torch.stack(residual).detach()
    dead_ids = [j for j in range(D) if dead[j]]
    aux_rows = []
    for b in range(B):
        top = sorted(dead_ids, key=lambda j: (f[b][j] * c[j]).item())[-min(k_aux, len(dead_ids)):]
        aux_rows.append(torch.cat([sum(f[b][j] * W_dec[j, m] for j in top) for m in range(n)]))
    aux = torch.stack(aux_rows)
    err = ((residual - aux) ** 2).sum(-1).mean()
    var = ((residual - residual.mean(0)) ** 2).sum(-1).mean()
    return recon + alpha * err / var


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("sparse", [False, True])
def test_losses_and_gradients_match_brute_force(activation, sparse):
    model = _tiny_model(activation)
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Latents 1 and 3 count as dead (and did not fire in this batch, which the rule also requires).
    since = torch.tensor([0, 10**9, 0, 10**9, 0])
    terms = crosscoder_losses(model, x, l1_coefficient=0.3, auxk_alpha=0.25, k_aux=1, tokens_since_fired=since,
                              dead_after_tokens=100, sparse=sparse)
    fired = terms.fired
    dead = [bool(since[j] + 4 >= 100 and not fired[j]) for j in range(5)]
    if activation == "batchtopk":
        assert any(dead), "the test must exercise the auxiliary loss"
    grads = torch.autograd.grad(terms.loss, list(model.parameters()))
    expected = _brute_force(model, x, mu=0.3, alpha=0.25, k_aux=1, dead=dead)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_check_central_differences(activation, sparse):
    """Autograd (including the sparse backward) agrees with finite differences. No dead
    latents here: the auxiliary loss fits a *detached* residual, so finite differences would
    see a dependence its gradient deliberately ignores (the brute-force test covers it)."""
    model = _tiny_model(activation, d_in=2, d_sae=6, k=1)
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    since = torch.zeros(6, dtype=torch.long)

    def loss() -> torch.Tensor:
        return crosscoder_losses(model, x, k_aux=2, tokens_since_fired=since, dead_after_tokens=10, sparse=sparse).loss

    params = list(model.parameters())
    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    for name_param, grad in zip(model.named_parameters(), grads):
        name, p = name_param
        flat = p.data.view(-1)
        for idx in range(0, flat.numel(), max(1, flat.numel() // 6)):
            with torch.no_grad():
                flat[idx] += eps
                up = loss().item()
                flat[idx] -= 2 * eps
                down = loss().item()
                flat[idx] += eps
            numeric = (up - down) / (2 * eps)
            assert numeric == pytest.approx(grad.reshape(-1)[idx].item(), abs=1e-6), (name, idx)


def test_batchtopk_keeps_exactly_k_times_batch_in_training_and_threshold_at_inference():
    torch.manual_seed(0)
    model = CrossCoder(CrossCoderConfig(d_in=16, d_sae=512, activation="batchtopk", k=7), seed=0)
    x = torch.randn(64, 2, 16)
    for sparse in (False, True):
        terms = crosscoder_losses(model, x, sparse=sparse)
        assert terms.l0.item() * 64 == 7 * 64  # exactly k*B non-zeros
    with torch.no_grad():
        model.threshold.fill_(0.8)
        f = model.encode(x)  # inference: the threshold, not top-k
        scaled = torch.relu(model.pre_activations(x)) * model.code_norm()
    assert torch.equal(f != 0, scaled > 0.8)
    assert (f != 0).sum().item() != 7 * 64


def test_min_selected_is_smallest_kept_scaled_activation():
    model = _tiny_model("batchtopk", d_in=4, d_sae=16, k=3, dtype=torch.float32)
    x = torch.randn(8, 2, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kept = model.encode(x, use_threshold=False)
        expected = model.scale(kept)[kept > 0].min()
    for sparse in (False, True):
        assert crosscoder_losses(model, x, sparse=sparse).min_selected.item() == pytest.approx(expected.item())


# ---------------------------------------------------------------------- sparse ops
@pytest.mark.parametrize("case", ["typical", "few_positive", "small_batch", "misleading_sample"])
def test_select_batch_topk_is_exact(case):
    g = torch.Generator().manual_seed(0)
    B, D, k = (256, 1024, 8) if case != "small_batch" else (5, 64, 3)
    pre = torch.randn(B, D, generator=g)
    if case == "few_positive":  # fewer positive entries than k*B: zeros are selected too
        pre = pre - 3.5
    if case == "misleading_sample":  # the sampled token groups are 50x larger: the estimated
        # threshold is far too high, so selection must lower it (and may fall back to a full top-k)
        from crossdiff.train.sparse_ops import GROUP, SAMPLE_EVERY

        sampled = (torch.arange(B) // GROUP) % SAMPLE_EVERY == 0
        pre[sampled] *= 50
    code_norm = torch.rand(D, generator=g) + 0.5
    selection = select_batch_topk(pre, code_norm, k * B)
    scaled = (torch.relu(pre) * code_norm).reshape(-1)
    chosen = selection.rows * D + selection.cols
    assert chosen.numel() == k * B and chosen.unique().numel() == k * B
    assert bool((selection.rows[1:] >= selection.rows[:-1]).all())  # grouped by token
    kth = scaled.topk(k * B).values.min()
    assert bool((scaled[chosen] >= kth).all())
    assert scaled[chosen].sum().item() == pytest.approx(scaled.topk(k * B).values.sum().item(), rel=1e-6)


def test_sparse_ops_gradients_equal_dense_float64():
    g = torch.Generator().manual_seed(2)
    B, nd, D = 9, 6, 40
    x = torch.randn(B, nd, generator=g, dtype=torch.float64)
    w_enc = torch.randn(nd, D, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True)
    w_dec = torch.randn(D, nd, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, nd, generator=g, dtype=torch.float64)
    code_norm = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    pre = (x @ w_enc + b_enc).detach()
    selection = select_batch_topk(pre, code_norm, 3 * B)

    values = torch.relu(gather_pre_activations(pre, x, w_enc, b_enc, selection))
    sparse_loss = (sparse_decode(values, selection, w_dec) - target).square().sum()
    sparse_grads = torch.autograd.grad(sparse_loss, (w_enc, b_enc, w_dec))

    mask = torch.zeros(B, D, dtype=torch.bool)
    mask[selection.rows, selection.cols] = True
    dense_loss = ((torch.relu(x @ w_enc + b_enc) * mask) @ w_dec - target).square().sum()
    dense_grads = torch.autograd.grad(dense_loss, (w_enc, b_enc, w_dec))
    assert sparse_loss.item() == pytest.approx(dense_loss.item(), rel=1e-12)
    for s, d in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(s, d, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda v, w: sparse_decode(v, selection, w), (values.detach().clone().requires_grad_(), w_dec.detach().clone().requires_grad_())
    )
    assert math.isfinite(sparse_loss.item())
