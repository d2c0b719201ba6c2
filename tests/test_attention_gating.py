"""FeedbackGating and AttentionToScale: sound bounds, normalisation, active clamps, gradients, bad args."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention_common import TOL, grads_flow, measured_lipschitz
from torch import Tensor

from certify.exact import dense_operator_norm, jacobian_spectral_norm
from lipnet.attention import AttentionToScale, FeedbackGating
from lipnet.attention.gating import bilinear_resize_norm

SHAPE = (2, 4, 4)


def _sharpen(module: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Scale every plain weight so that the gates are far from constant (a harder test of the bound)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("conv"):  # Björck convolutions re-orthonormalise anyway
                p.mul_(factor)
    return module


@pytest.mark.parametrize(("size_in", "size_out"), [((6, 6), (3, 3)), ((5, 7), (3, 4)), ((3, 4), (5, 7))])
def test_resize_norm_is_the_exact_operator_norm(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    exact = dense_operator_norm(
        lambda z: F.interpolate(z, size=size_out, mode="bilinear", align_corners=False), (1, *size_in)
    )
    # both carry the same 1 + 1e-9 slack: equal up to float64 rounding
    assert bilinear_resize_norm(size_in, size_out) == pytest.approx(exact, rel=1e-12)


def test_feedback_bound_dominates_measured_and_normalized_is_one() -> None:
    torch.manual_seed(0)
    module = _sharpen(FeedbackGating(2, 4, clamp=2.0, normalize=False), 4.0).double()
    bound = module.lipschitz_bound(SHAPE)
    assert bound <= module.lipschitz_bound() * (1 + 1e-12)  # the every-size bound is not smaller
    measured = measured_lipschitz(module, SHAPE, (0.1, 1.0, 30.0))
    assert measured <= bound * (1 + TOL)
    module.normalize = True
    assert module.lipschitz_bound(SHAPE) <= 1 + 1e-15
    assert measured_lipschitz(module, SHAPE, (0.3, 10.0)) <= 1 + TOL


def test_feedback_clamp_is_active() -> None:
    # Without the clamp the second pass multiplies a non-constant gate by unbounded responses. The
    # biases of the policy are set so that its hidden units are active and the gate logits are 0 at
    # a large input (the gate is then at its steepest); the bound does not depend on biases.
    torch.manual_seed(1)
    module = _sharpen(FeedbackGating(2, 4, normalize=False), 3.0).double()
    bound = module.lipschitz_bound(SHAPE)
    x = 300.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        module.fc1.bias.zero_()
        module.fc2.bias.zero_()
        responses = module.act(module.conv1(x.unsqueeze(0)))
        top = module.act(module.conv2(responses)).mean(dim=(2, 3))
        module.fc1.bias.copy_(1.0 - module.fc1(top).squeeze(0))
        module.fc2.bias.copy_(-module.fc2(module.fc1(top).relu()).squeeze(0))

    def unclamped(z: Tensor) -> Tensor:
        r = module.act(module.conv1(z))
        return module.act(module.conv2(module._gate_from(r)[:, :, None, None] * r))

    assert jacobian_spectral_norm(unclamped, x) > 3 * bound
    assert jacobian_spectral_norm(module, x) <= bound * (1 + TOL)


def test_attention_to_scale_bound_dominates_measured_and_normalized_is_one() -> None:
    torch.manual_seed(2)
    module = _sharpen(AttentionToScale(2, 2, hidden=2, scales=(1.0, 0.5), radius=2.0, normalize=False), 4.0)
    module = module.double()
    bound = module.lipschitz_bound(SHAPE)
    assert module.lipschitz_bound() == math.inf  # the resize norms depend on the size
    measured = measured_lipschitz(module, SHAPE, (0.1, 1.0, 10.0))
    assert measured <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.3, 3.0)) <= 1 + TOL


def test_attention_to_scale_projection_is_active() -> None:
    # Without the per-pixel projection, the softmax weights multiply unbounded score maps.
    torch.manual_seed(3)
    module = _sharpen(AttentionToScale(2, 2, hidden=2, radius=1.0, normalize=False), 4.0).double()
    bound = module.lipschitz_bound(SHAPE)

    def unprojected(x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        maps = []
        for s in module.scales:
            small = F.interpolate(x, size=module._size(s, h, w), mode="bilinear", align_corners=False)
            scores = module.conv2(module.act(module.conv1(small)))
            maps.append(F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False))
        v = torch.stack(maps, dim=1)
        p = module.score(v.flatten(1, 2)).softmax(dim=1)
        return (p.unsqueeze(2) * v).sum(dim=1)

    gen = torch.Generator().manual_seed(1)
    points = [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(6)]
    assert max(jacobian_spectral_norm(unprojected, 300.0 * p) for p in points) > 3 * bound
    assert max(jacobian_spectral_norm(module, 300.0 * p) for p in points) <= bound * (1 + TOL)


@pytest.mark.parametrize(
    "make", [lambda: FeedbackGating(2, 4), lambda: AttentionToScale(2, 3, hidden=2, scales=(1.0, 0.5, 0.75))]
)
def test_gradients_flow(make) -> None:  # noqa: ANN001
    torch.manual_seed(4)
    grads_flow(make(), torch.randn(2, *SHAPE))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        FeedbackGating(2, 3)
    with pytest.raises(ValueError):
        FeedbackGating(2, 4, reduction=3)
    with pytest.raises(ValueError):
        FeedbackGating(2, 4, clamp=0.0)
    with pytest.raises(ValueError):
        AttentionToScale(2, 2, scales=(1.0,))
    with pytest.raises(ValueError):
        AttentionToScale(2, 2, scales=(1.0, -0.5))
    with pytest.raises(ValueError):
        AttentionToScale(2, 2, hidden=3)
    with pytest.raises(ValueError, match="expects"):
        FeedbackGating(2, 4)(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="expects"):
        AttentionToScale(2, 2)(torch.randn(2, 4, 4))
