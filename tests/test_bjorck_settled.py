"""The settled Björck training weight (lipnet.layers.bjorck.bjorck_settled,
BjorckOrthonormal.settle_iterations): its value, its gradient against deel-torchlip's Björck loop, its place
in the batched call, its bounds."""

from __future__ import annotations

import sys

import pytest
import torch
from deel.torchlip.normalizers import bjorck_normalization
from torch import nn

from certify.bounds import lipschitz_bound
from lipnet.layers.batching import batch_weights
from lipnet.layers.bjorck import BjorckLinear, bjorck_orthonormalize, bjorck_settled, gram_norm_bound


def _drifted(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """An orthonormal-rows (or -columns) matrix plus noise: what a raw weight looks like after some
    training (its condition number is well above 1, so the Björck loop needs more than four steps)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=gen, dtype=torch.float64))[0]
    q = q.T if rows < cols else q
    return q + 0.06 * torch.randn(rows, cols, generator=gen, dtype=torch.float64)


def _steps_to_tol(w: torch.Tensor, tol: float, most: int) -> int:
    """Order-1 Björck steps from the pre-scaled ``w`` up to and including the first that moves it by
    less than ``tol`` in Frobenius norm (a plain loop on the matrix itself)."""
    x = w / gram_norm_bound(w @ w.T).sqrt()
    for n in range(1, most + 1):
        nxt = 1.5 * x - 0.5 * x @ x.T @ x
        if torch.linalg.norm(nxt - x) < tol:
            return n
        x = nxt
    return most


@pytest.mark.parametrize("shape", [(24, 96), (96, 24)])
def test_the_value_is_the_iterate_after_every_step(shape: tuple[int, int]) -> None:
    w = _drifted(*shape)
    settled = bjorck_settled(w, 4, 11, order=1)
    assert torch.allclose(settled, bjorck_orthonormalize(w, 15, order=1), atol=1e-10)
    sv = torch.linalg.svdvals(settled)
    assert sv.max() <= 1 + 1e-12 and sv.min() > 1 - 1e-6  # converged, and a contraction


def test_the_gradient_is_deel_torchlips_detached_loop_on_the_same_pre_scaled_matrix() -> None:
    # deel-torchlip's bjorck_normalization (15 steps at most, beta 1/2, the cubic term detached after the
    # fourth step, stop at a Frobenius change below 1e-3) on lipnet's pre-scaled matrix is an independent
    # implementation of the same gradient when the loop runs more than four steps
    w = _drifted(24, 96).requires_grad_(True)
    assert _steps_to_tol(w.detach(), 1e-3, 15) > 4
    cotangent = torch.randn(24, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((bjorck_settled(w, 4, 11, order=1, tol=1e-3) * cotangent).sum(), w)
    scaled = w / gram_norm_bound(w @ w.T).sqrt()
    (reference,) = torch.autograd.grad((bjorck_normalization(scaled, 1e-3, 0.5, 15) * cotangent).sum(), w)
    assert torch.allclose(grad, reference, rtol=1e-9, atol=1e-12)


def test_the_gain_is_three_halves_per_step_after_the_differentiated_ones() -> None:
    w = _drifted(24, 96).requires_grad_(True)
    n = _steps_to_tol(w.detach(), 1e-3, 15)
    cotangent = torch.randn(24, 96, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (settled,) = torch.autograd.grad((bjorck_settled(w, 4, 11, order=1) * cotangent).sum(), w)
    (plain,) = torch.autograd.grad((bjorck_orthonormalize(w, 4, order=1) * cotangent).sum(), w)
    assert n > 4
    assert torch.allclose(settled, 1.5 ** (n - 4) * plain, rtol=1e-10, atol=1e-12)
    # a tolerance the first steps already meet: no gain
    near = torch.linalg.qr(torch.randn(96, 24, dtype=torch.float64))[0].T.requires_grad_(True)
    (settled,) = torch.autograd.grad((bjorck_settled(near, 4, 11, order=1) * cotangent).sum(), near)
    (plain,) = torch.autograd.grad((bjorck_orthonormalize(near, 4, order=1) * cotangent).sum(), near)
    assert torch.allclose(settled, plain, rtol=1e-10, atol=1e-12)


def test_a_rank_deficient_matrix_stays_finite() -> None:
    w = torch.ones(8, 32, requires_grad=True)  # rank 1: the Gram-space recursion's unstable case
    out = bjorck_settled(w, 4, 11, order=1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()  # type: ignore[arg-type]
    # float32 rounding, amplified at most 3/2 per step on the null space over 15 steps, times the side:
    # 1.5^15 * 2^-23 * 8 = 4.2e-4 (the exact iterate's norm is 1; training weights are not certified)
    assert torch.linalg.svdvals(out.detach()).max() <= 1 + 1.5**15 * 2**-23 * 8


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="settle"):
        bjorck_settled(torch.eye(3), 4, 0)
    with pytest.raises(ValueError, match="tol"):
        bjorck_settled(torch.eye(3), 4, 2, tol=0.0)
    with pytest.raises(ValueError, match="settle"):
        BjorckLinear(4, 4, settle_iterations=-1)


@pytest.mark.parametrize("max_padding", [1.5, 16.0])
def test_settled_layers_share_the_batched_call_with_the_per_layer_value_and_gradient(
    max_padding: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # settled layers of several shapes (wide, tall) and drifts (so their gains differ), beside a plain
    # Björck layer; 16.0 (CUDA's padding) puts every settled matrix in one padded call
    torch.manual_seed(0)
    settled = {"train_iterations": 4, "order": 1, "settle_iterations": 11}
    model = nn.Sequential(
        BjorckLinear(32, 32),
        BjorckLinear(32, 24, **settled),
        BjorckLinear(24, 10, **settled),
        BjorckLinear(10, 20, **settled),
    ).double()
    drifts = [0.1, 0.02, 0.3, 0.1]
    with torch.no_grad():
        for layer, drift, seed in zip(model, drifts, range(4), strict=True):
            raw = layer.parametrizations.weight.original
            raw.copy_(_drifted(*raw.shape, seed) * (1 + drift))
            raw.add_(drift * torch.randn(*raw.shape).double())
    steps = [_steps_to_tol(layer.parametrizations.weight.original, 1e-3, 15) for layer in model[1:]]
    assert len(set(steps)) > 1 and max(steps) > 4  # the gains differ and are not all 1
    x = torch.randn(5, 32, dtype=torch.float64)
    model.train()
    plain_out = model(x)
    plain_grads = torch.autograd.grad(plain_out.square().sum(), list(model.parameters()))
    batched = batch_weights(model, max_padding=max_padding)
    members = {id(item.parametrization) for item in batched.weight_batcher._eligible()}
    assert all(id(layer.parametrizations.weight[0]) in members for layer in model)

    def per_layer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a settled weight was computed outside the batched call")

    # the module itself (the package's name ``lipnet.layers.bjorck`` is the function ``bjorck``)
    monkeypatch.setattr(sys.modules["lipnet.layers.bjorck"], "bjorck_settled", per_layer)
    out = batched(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert torch.allclose(out, plain_out, rtol=1e-9, atol=1e-11)
    for got, want in zip(grads, plain_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def test_the_trained_layer_is_bounded_by_one() -> None:
    torch.manual_seed(0)
    layer = BjorckLinear(64, 32, train_iterations=4, order=1, settle_iterations=11)
    opt = torch.optim.Adam(layer.parameters(), lr=5e-2)
    x, y = torch.randn(256, 64), torch.randn(256, 32)
    for _ in range(30):
        opt.zero_grad()
        (layer(x) - y).square().mean().backward()
        opt.step()
    layer.eval()
    assert torch.linalg.svdvals(layer.weight.detach().double()).max() <= 1 + 1e-6
    assert lipschitz_bound(layer, (1, 64)) <= 1 + 1e-6
