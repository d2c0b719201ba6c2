"""LinearResidualConv2d: x + conv(x) as one merged convolution, its exact bound and its normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from certify.exact import dense_operator_norm
from certify.rules.conv import conv_operator_bound
from lipnet.layers import LinearResidualConv2d
from lipnet.layers.cpl import AmortisedSymbolBound
from lipnet.layers.residual import symbol_norm_bound


def _raw(layer: LinearResidualConv2d) -> Tensor:
    return layer.parametrizations.weight.original


def _reference(layer: LinearResidualConv2d, x: Tensor) -> Tensor:
    """``x + conv_W(x) + bias`` computed the unmerged way."""
    k = layer.kernel_size[0] // 2
    mode = "constant" if layer.padding_mode == "zeros" else "circular"
    branch = F.conv2d(F.pad(x, (k, k, k, k), mode=mode), _raw(layer), layer.bias, groups=layer.groups)
    return x + branch


@pytest.mark.parametrize(("padding_mode", "groups"), [("zeros", 1), ("circular", 1), ("zeros", 2)])
def test_merged_kernel_computes_the_residual(padding_mode: str, groups: int) -> None:
    torch.manual_seed(0)
    layer = LinearResidualConv2d(4, 3, groups=groups, padding_mode=padding_mode).double()
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    assert torch.allclose(layer(x), _reference(layer, x), atol=1e-12)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_merged_bound_is_tighter_than_the_sum_and_sound(padding_mode: str) -> None:
    torch.manual_seed(1)
    layer = LinearResidualConv2d(4, 3, padding_mode=padding_mode).double().eval()
    shape = (4, 6, 6)
    exact = dense_operator_norm(lambda z: layer(z) - layer.bias[:, None, None], shape)
    naive = 1.0 + conv_operator_bound(_raw(layer), padding=1, padding_mode=padding_mode)
    merged_all_sizes, merged_sized = layer.lipschitz_bound(), layer.lipschitz_bound(shape)
    assert exact <= merged_sized * (1 + 1e-9) and merged_sized <= merged_all_sizes * (1 + 1e-9)
    assert merged_all_sizes < naive - 0.05
    assert merged_sized == pytest.approx(exact, rel=1e-6)  # small dense matrix: exact


def test_symbol_norm_bound_covers_the_continuum() -> None:
    """Above the sup over a fine grid (which the plain coarse-grid max is not) and the exact norms."""
    gen = torch.Generator().manual_seed(2)
    below = 0
    for _ in range(8):
        w = torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
        fine = torch.fft.rfft2(w, s=(256, 256)).permute(2, 3, 0, 1)
        sup = torch.linalg.matrix_norm(fine, ord=2).max().item()
        coarse = (
            torch.linalg.matrix_norm(torch.fft.rfft2(w, s=(8, 8)).permute(2, 3, 0, 1), ord=2).max().item()
        )
        below += coarse < sup * (1 - 1e-3)
        bound = symbol_norm_bound(w, grid=8).item()
        assert bound >= sup
        assert bound <= sup / (1 - (torch.pi / 2) ** 2 / 4) ** 0.5 + 1e-9
        exact = dense_operator_norm(lambda z, w=w: F.conv2d(z, w, padding=1), (3, 7, 7))
        assert exact <= bound
    assert below > 0, "the test kernels never put the sup off the coarse grid"


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_normalized_block_is_1_lipschitz_even_with_large_weights(padding_mode: str) -> None:
    torch.manual_seed(3)
    layer = LinearResidualConv2d(4, 3, padding_mode=padding_mode, normalize=True, bound_grid=16).double()
    with torch.no_grad():
        _raw(layer).mul_(50.0)
    layer.eval()
    bound = layer.lipschitz_bound()
    exact = dense_operator_norm(lambda z: layer(z) - layer.bias[:, None, None], (4, 6, 6))
    assert exact <= bound * (1 + 1e-9)
    assert bound <= 1.0
    assert bound > 0.8  # the normalisation is not wastefully loose


def test_gradients_flow_and_eval_cache_matches_training() -> None:
    torch.manual_seed(4)
    layer = LinearResidualConv2d(4, 3, normalize=True, bound_grid=16)
    x = torch.randn(3, 4, 6, 6)
    y_train = layer(x)
    y_train.square().sum().backward()
    grad = _raw(layer).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        cached = layer.parametrizations.weight[0]._cache_value
        second = layer(x)
    assert cached is not None and layer.parametrizations.weight[0]._cache_value is cached
    assert torch.equal(first, second)
    assert torch.allclose(first, y_train.detach(), atol=1e-6)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(5)
    layer = LinearResidualConv2d(4, 3, padding_mode="circular", normalize=True, bound_grid=16).eval()
    clone = LinearResidualConv2d(4, 3, padding_mode="circular", normalize=True, bound_grid=16).eval()
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(clone(x), layer(x), atol=1e-7)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive odd int"):
        LinearResidualConv2d(4, 2)
    with pytest.raises(ValueError, match="read border pixels twice"):
        LinearResidualConv2d(4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="must divide channels"):
        LinearResidualConv2d(4, 3, groups=3)
    with pytest.raises(ValueError, match="too coarse"):
        LinearResidualConv2d(4, 5, normalize=True, bound_grid=6)
    with pytest.raises(ValueError, match="too coarse"):
        symbol_norm_bound(torch.randn(2, 2, 3, 3), grid=4)


@pytest.mark.parametrize(("padding_mode", "groups"), [("zeros", 1), ("circular", 2)])
def test_normalized_block_stays_1_lipschitz_across_many_adam_steps(padding_mode: str, groups: int) -> None:
    """After every step the exact norm of the normalised block is at most 1, between refreshes too.

    The loss grows the kernel, so the anchored bound alone falls below the merged norm between
    refreshes (checked): the test fails if the drift term is dropped.
    """
    torch.manual_seed(6)
    layer = LinearResidualConv2d(
        4, 3, groups=groups, padding_mode=padding_mode, normalize=True, bound_grid=32, drift_tol=0.2
    ).double()
    norm_bound = layer.parametrizations.weight[0].norm_bound
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    mode = "constant" if padding_mode == "zeros" else "circular"

    def norm(kernel: Tensor) -> float:
        return dense_operator_norm(
            lambda z: F.conv2d(F.pad(z, (1, 1, 1, 1), mode=mode), kernel, groups=groups), (4, 6, 6)
        )

    refreshes = amortised = stale_anchor_too_small = 0
    for _ in range(40):
        opt.zero_grad()
        (-(layer(x) - x).square().mean() - _raw(layer).square().sum()).backward()
        opt.step()
        anchor_before = norm_bound.anchor.clone()
        with torch.no_grad():
            normalized = layer.weight.detach()
        moved = not torch.equal(anchor_before, norm_bound.anchor)
        refreshes += moved
        amortised += not moved
        assert norm(normalized) <= 1.0 + 1e-9
        merged = _raw(layer).detach().clone()
        merged[:, :, 1, 1] += torch.eye(4 // groups, dtype=torch.float64).repeat(groups, 1)
        stale_anchor_too_small += not moved and float(norm_bound.anchor_bound) < norm(merged)
    assert refreshes >= 3 and amortised >= 10
    assert stale_anchor_too_small > 0, "the drift term was never needed: the test would not catch its loss"
    assert layer.lipschitz_bound() <= 1.0 + 1e-9


def test_normalized_state_dict_round_trip_mid_period_in_training() -> None:
    torch.manual_seed(7)
    layer = LinearResidualConv2d(4, 3, normalize=True, bound_grid=16)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(2, 4, 5, 5)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    norm_bound = layer.parametrizations.weight[0].norm_bound
    assert not torch.equal(norm_bound.anchor, layer.weight.detach())  # the weight is no anchor
    clone = LinearResidualConv2d(4, 3, normalize=True, bound_grid=16)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x), layer(x))
    assert torch.equal(clone.parametrizations.weight[0].norm_bound.anchor, norm_bound.anchor)


def test_normalized_block_keeps_its_norm_within_tolerance_while_the_kernel_grows_and_shrinks() -> None:
    """Every step: ``1 / ((1 + drift_tol) g) <= ||block|| <= 1`` (every-size norm, ``g`` the grid correction).

    Adam grows the residual kernel, then shrinks it. The norm is the sup of the normalised symbol
    over a fine grid. The previous refresh rule (``delta > drift_tol s0``) let the block fall below
    the lower end while the kernel shrank (checked on the same kernels, so that the test fails if
    the rule regresses).
    """
    torch.manual_seed(8)
    tol = 0.1
    layer = LinearResidualConv2d(4, 3, normalize=True, bound_grid=16, drift_tol=tol).double()
    norm_bound = layer.parametrizations.weight[0].norm_bound
    old = AmortisedSymbolBound(
        (4, 4, 3, 3), groups=1, grid=16, drift_tol=tol, drift_steps=6, dtype=torch.float64
    )
    g = norm_bound.grid_factor**0.5
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)

    def every_size_norm(kernel: Tensor) -> float:
        symbol = torch.fft.rfft2(kernel, s=(128, 128)).permute(2, 3, 0, 1)
        return float(torch.linalg.matrix_norm(symbol, ord=2).max())

    old_too_small = 0
    for step in range(40):
        opt.zero_grad()
        sign = -1.0 if step < 20 else 1.0
        (-(layer(x) - x).square().mean() + sign * _raw(layer).square().sum()).backward()
        opt.step()
        with torch.no_grad():
            normalized = layer.weight.detach()
        merged = _raw(layer).detach().clone()
        merged[:, :, 1, 1] += torch.eye(4, dtype=torch.float64)
        assert 1.0 / ((1 + tol) * g) * (1 - 2e-6) <= every_size_norm(normalized) <= 1.0
        drift, s0 = old.drift_bound(merged), old.anchor_bound
        if not bool(torch.isfinite(s0) & (drift <= tol * s0)):
            old.refresh(merged)
            drift = torch.zeros((), dtype=torch.float64)
        old_too_small += every_size_norm(merged) / float(old.anchor_bound + drift) < 1.0 / ((1 + tol) * g)
    assert old_too_small > 0
