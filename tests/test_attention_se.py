"""SqueezeExcitation and CBAM: sound bounds, normalisation, active clamps, gradients, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz, sharpen
from torch import Tensor

from certify.exact import jacobian_spectral_norm
from lipnet.attention import CBAM, SqueezeExcitation

SHAPE = (4, 4, 4)


def _zero_mean_channels(scale: float, seed: int = 0) -> Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scale * (x - x.mean(dim=(1, 2), keepdim=True))


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_se_bound_dominates_measured(factor: float) -> None:
    torch.manual_seed(0)
    module = sharpen(SqueezeExcitation(4, reduction=2, clamp=2.0, normalize=False), factor).double()
    bound = module.lipschitz_bound(SHAPE)
    assert bound == module.lipschitz_bound()  # resolution-independent
    measured = measured_lipschitz(module, SHAPE, (0.1, 1.0, 30.0))
    assert measured <= bound * (1 + TOL)
    assert measured >= 0.15 * bound  # the bound is not vacuous


def test_se_normalized_is_at_most_one() -> None:
    torch.manual_seed(1)
    module = sharpen(SqueezeExcitation(4, reduction=2, clamp=3.0), 4.0).double()
    assert module.lipschitz_bound(SHAPE) <= 1 + 1e-15
    assert measured_lipschitz(module, SHAPE, (0.3, 3.0, 100.0)) <= 1 + TOL


def test_se_clamp_is_active() -> None:
    # The unclamped SE s(x) * x has a Jacobian growing with ||x|| on zero-mean channels (its gate is
    # constant there); the clamped module stays within its bound at the same points.
    torch.manual_seed(2)
    module = SqueezeExcitation(4, reduction=2, normalize=False).double()
    bound = module.lipschitz_bound()

    def unclamped(x: Tensor) -> Tensor:
        return module.gate(x)[:, :, None, None] * x

    x = _zero_mean_channels(1000.0)
    assert jacobian_spectral_norm(unclamped, x) > 10 * bound
    assert jacobian_spectral_norm(module, x) <= bound * (1 + TOL)


@pytest.mark.parametrize("use_max", [False, True])
def test_cbam_bound_dominates_measured(use_max: bool) -> None:
    torch.manual_seed(3)
    module = sharpen(CBAM(4, reduction=2, kernel_size=3, clamp=2.0, use_max=use_max, normalize=False), 3.0)
    module = module.double()
    bound = module.lipschitz_bound(SHAPE)
    if use_max:
        assert module.lipschitz_bound() == math.inf  # grows like sqrt(HW)
    else:
        assert bound <= module.lipschitz_bound() * (1 + 1e-12)
    assert measured_lipschitz(module, SHAPE, (0.1, 1.0, 30.0)) <= bound * (1 + TOL)


def test_cbam_max_path_costs_more() -> None:
    torch.manual_seed(4)
    plain = CBAM(4, reduction=2, kernel_size=3, normalize=False)
    with_max = CBAM(4, reduction=2, kernel_size=3, use_max=True, normalize=False)
    with torch.no_grad():
        with_max.fc1.load_state_dict(plain.fc1.state_dict())
        with_max.fc2.load_state_dict(plain.fc2.state_dict())
        with_max.spatial.weight[:, :1] = plain.spatial.weight
        with_max.spatial.weight[:, 1:] = 0.0
    assert (
        with_max.lipschitz_bound((4, 16, 16)) > with_max.lipschitz_bound((4, 4, 4)) > plain.lipschitz_bound()
    )


def test_cbam_normalized_and_clamp_active() -> None:
    torch.manual_seed(5)
    module = sharpen(CBAM(4, reduction=2, kernel_size=3, use_max=True), 3.0).double()
    assert measured_lipschitz(module, SHAPE, (0.3, 3.0, 100.0)) <= 1 + TOL
    # Unclamped, the channel stage grows like SE on zero-mean channels (spatial gate made constant).
    module = CBAM(4, reduction=2, kernel_size=3, normalize=False).double()
    with torch.no_grad():
        module.spatial.weight.zero_()
    bound = module.lipschitz_bound(SHAPE)

    def unclamped(x: Tensor) -> Tensor:
        f = module.channel_gate(x)[:, :, None, None] * x
        return module.spatial_gate(f) * f

    x = _zero_mean_channels(1000.0, seed=1)
    assert jacobian_spectral_norm(unclamped, x) > 10 * bound
    assert jacobian_spectral_norm(module, x) <= bound * (1 + TOL)


@pytest.mark.parametrize(
    "make",
    [lambda: SqueezeExcitation(4, reduction=2), lambda: CBAM(4, reduction=2, kernel_size=3, use_max=True)],
)
def test_gradients_flow(make) -> None:  # noqa: ANN001
    torch.manual_seed(6)
    grads_flow(make(), torch.randn(2, *SHAPE))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SqueezeExcitation(5, reduction=2)
    with pytest.raises(ValueError):
        SqueezeExcitation(4, clamp=0.0)
    with pytest.raises(ValueError):
        CBAM(4, kernel_size=4)
    with pytest.raises(ValueError):
        CBAM(4, reduction=3)
    with pytest.raises(ValueError, match="expects"):
        SqueezeExcitation(4)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="expects"):
        CBAM(4)(torch.randn(2, 4, 4))
