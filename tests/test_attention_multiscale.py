"""MultiScaleAttentionAggregation: vector and per-attribute bounds, normalisation, projection, shapes."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz, sharpen
from torch import Tensor, nn

from certify.exact import jacobian_spectral_norm
from lipnet.attention import MultiScaleAttentionAggregation

SHAPE = (2, 4, 4)
MODES = [(m, a) for m in ("spatial", "elementwise") for a in ("mean", "max")]


class _Logit(nn.Module):
    """One output logit of the module, as a module for the measuring helpers."""

    def __init__(self, net: nn.Module, index: int) -> None:
        super().__init__()
        self.net, self.index = net, index

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, self.index : self.index + 1]


def _sharp(mask: str, aggregate: str, normalize: bool, seed: int = 0) -> MultiScaleAttentionAggregation:
    """Steep masks (mask convolutions scaled by 4) make the gated products far from linear."""
    torch.manual_seed(seed)
    net = MultiScaleAttentionAggregation(
        2, 3, scales=2, mask=mask, radius=2.0, aggregate=aggregate, normalize=normalize
    )
    sharpen(net.mask_convs, 4.0)
    # eval mode with frozen weights: the layers' weight caches serve the input-only derivatives
    return net.double().eval().requires_grad_(False)


@pytest.mark.parametrize(("mask", "aggregate"), MODES)
def test_bound_dominates_measured(mask: str, aggregate: str) -> None:
    net = _sharp(mask, aggregate, normalize=False)
    bound = net.lipschitz_bound(SHAPE)
    assert bound <= net.lipschitz_bound() * (1 + 1e-12)  # the every-size bound is never smaller
    measured = measured_lipschitz(net, SHAPE, (0.3, 3.0))
    assert measured <= bound * (1 + TOL)
    assert measured >= 0.1 * bound  # the bound is not vacuous


@pytest.mark.parametrize("mask", ["spatial", "elementwise"])
@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_bound_is_nearly_attained(mask: str, aggregate: str) -> None:
    # One scale, identity heads, a 1x1 mask kernel s e_1 (per channel for elementwise masks) and a
    # constant input (a, 0) at every pixel with the mask at p = sigmoid(z) = 9/16: along e_1 the gated
    # branch has gain p + p (1 - p) s a, which tends to the refined Lemma 1 constant
    # max_p (p + s rho p (1 - p)) = 2.53125 at s rho = 8 as a -> rho (spatial). The soft clamp of
    # elementwise masks cannot saturate and stay steep at once, so that variant is looser.
    s, rho = 8.0, 1.0
    a = 0.999 if mask == "spatial" else 3.0
    net = MultiScaleAttentionAggregation(
        2, 2, scales=1, mask=mask, kernel_size=1, radius=rho, aggregate=aggregate, normalize=False
    ).double()
    p = 9.0 / 16.0
    with torch.no_grad():
        for head in (net.heads[0], net.primary):
            head.parametrizations.weight.original.copy_(torch.eye(2))
            head.bias.zero_()
        net.heads[0].bias[0] = 10.0  # branch 0 wins the max of attribute 0
        conv = net.mask_convs[0]
        conv.weight.zero_()
        conv.weight[0, 0] = s
        conv.bias.fill_(torch.logit(torch.tensor(p)).item() - s * a)
    net.eval().requires_grad_(False)
    x = torch.zeros(2, 3, 3, dtype=torch.float64)
    x[0] = a
    if mask == "spatial":  # inside the ball: u = F
        gain = p + p * (1 - p) * s * a
    else:  # u = rho tanh(F / rho), u' = 1 - (u / rho)^2
        u = rho * math.tanh(a / rho)
        gain = p * (1 - (u / rho) ** 2) + p * (1 - p) * s * u
    if aggregate == "mean":
        measured, bound = jacobian_spectral_norm(net, x), net.lipschitz_bound((2, 3, 3))
        gain = (gain + 1.0) / 2.0  # the primary branch moves by 1 along the same direction
    else:
        measured = jacobian_spectral_norm(_Logit(net, 0), x)
        bound = float(net.attribute_lipschitz_bounds((2, 3, 3))[0])
    assert measured >= gain * (1 - 1e-9)  # the construction does what it says
    assert measured <= bound * (1 + TOL)
    assert measured >= (0.99 if mask == "spatial" else 0.75) * bound


@pytest.mark.parametrize(("mask", "aggregate"), [("spatial", "max"), ("elementwise", "mean")])
def test_per_attribute_bounds(mask: str, aggregate: str) -> None:
    net = _sharp(mask, aggregate, normalize=False, seed=1)
    per_attribute = net.attribute_lipschitz_bounds(SHAPE)
    vector = net.lipschitz_bound(SHAPE)
    assert per_attribute.shape == (3,) and per_attribute.dtype == torch.float64
    assert (per_attribute <= vector * (1 + 1e-12)).all()
    if aggregate == "max":
        # the per-attribute constant is what max aggregation is for: strictly below the vector's,
        # which is itself never above the root sum of the per-attribute constants squared
        assert per_attribute.max() < vector / 1.2
        assert vector <= float(per_attribute.square().sum().sqrt()) * (1 + 1e-9)
    for c in range(3):
        measured = measured_lipschitz(_Logit(net, c), SHAPE, (1.0,), seed=c)
        assert measured <= float(per_attribute[c]) * (1 + TOL)


@pytest.mark.parametrize(("mask", "aggregate"), [("spatial", "mean"), ("elementwise", "max")])
def test_normalized_is_one_lipschitz(mask: str, aggregate: str) -> None:
    net = _sharp(mask, aggregate, normalize=True, seed=2)
    assert net.lipschitz_bound(SHAPE) <= 1 + 1e-9
    assert net.lipschitz_bound() <= 1 + 1e-9
    assert (net.attribute_lipschitz_bounds(SHAPE) <= 1 + 1e-9).all()
    assert (net.attribute_lipschitz_bounds() <= 1 + 1e-9).all()
    assert measured_lipschitz(net, SHAPE, (0.3, 3.0)) <= 1 + TOL
    # the division is by the raw vector bound: the per-attribute bounds keep their ratios
    net.normalize = False
    raw, raw_vector = net.attribute_lipschitz_bounds(SHAPE), net.lipschitz_bound(SHAPE)
    net.normalize = True
    assert torch.allclose(net.attribute_lipschitz_bounds(SHAPE), raw / raw_vector, rtol=1e-8)


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_branches_aggregate_to_the_output(aggregate: str) -> None:
    net = _sharp("spatial", aggregate, normalize=True, seed=3)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    branches = torch.stack(net.branch_logits(x), dim=1)
    assert branches.shape == (3, net.scales + 1, 3)
    expected = branches.mean(dim=1) if aggregate == "mean" else branches.amax(dim=1)
    torch.testing.assert_close(net(x), expected)


def test_shapes_and_masks() -> None:
    torch.manual_seed(4)
    for mask, channels in (("spatial", 1), ("elementwise", 4)):
        net = MultiScaleAttentionAggregation(4, 5, scales=3, mask=mask)
        x = torch.randn(2, 4, 9, 8)  # odd sizes are floored by the stride-2 stages
        assert net(x).shape == (2, 5)
        masks = net.masks(x)
        assert [tuple(m.shape) for m in masks] == [
            (2, channels, 9, 8),
            (2, channels, 4, 4),
            (2, channels, 2, 2),
        ]
        assert all(((m >= 0) & (m <= 1)).all() for m in masks)
        assert len(net.branch_logits(x)) == 4


def test_projection_is_active() -> None:
    # Without the ball projection the mask multiplies the raw features. With 1x1 mask kernels, pixels
    # orthogonal to the kernel give logits equal to the bias (0: the steepest point of the sigmoid),
    # so the product term of the Jacobian grows like ||x||. The projected module stays within its bound.
    torch.manual_seed(5)
    net = MultiScaleAttentionAggregation(2, 2, scales=1, kernel_size=1, normalize=False).double()
    conv = net.mask_convs[0]
    with torch.no_grad():
        conv.bias.zero_()
    bound = net.lipschitz_bound((2, 3, 3))

    def unprojected(x: Tensor) -> Tensor:
        attended = conv(x).sigmoid() * x
        return (net.heads[0](attended.sum(dim=(2, 3)) / 3.0) + net.primary(x.sum(dim=(2, 3)) / 3.0)) / 2

    k = conv.weight.detach().reshape(2)
    orth = torch.stack([-k[1], k[0]]) / k.norm()
    x = 1e3 * orth[:, None, None] * torch.ones(2, 3, 3, dtype=torch.float64)
    assert jacobian_spectral_norm(unprojected, x) > 10 * bound
    assert jacobian_spectral_norm(net, x) <= bound * (1 + TOL)


def test_gradients_flow() -> None:
    torch.manual_seed(6)
    grads_flow(MultiScaleAttentionAggregation(2, 3, scales=2), torch.randn(2, *SHAPE))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="even"):
        MultiScaleAttentionAggregation(3, 2)
    with pytest.raises(ValueError, match="mask"):
        MultiScaleAttentionAggregation(2, 2, mask="channel")
    with pytest.raises(ValueError, match="aggregate"):
        MultiScaleAttentionAggregation(2, 2, aggregate="sum")
    with pytest.raises(ValueError, match="odd"):
        MultiScaleAttentionAggregation(2, 2, kernel_size=2)
    net = MultiScaleAttentionAggregation(2, 2, scales=3)
    with pytest.raises(ValueError, match="H, W >= 4"):
        net(torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="H, W >= 4"):
        net.lipschitz_bound((2, 8, 2))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(1, 4, 8, 8))
