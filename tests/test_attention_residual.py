"""ResidualAttention: sound bound, normalisation, active clamp, gradients, bad arguments."""

from __future__ import annotations

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz
from torch import Tensor

from certify.exact import jacobian_spectral_norm
from lipnet.attention import ResidualAttention

SHAPE = (2, 4, 4)


def test_bound_dominates_measured_and_normalized_is_one() -> None:
    torch.manual_seed(0)
    module = ResidualAttention(2, clamp=2.0, normalize=False).double().eval()
    bound = module.lipschitz_bound(SHAPE)
    assert bound <= 1.0 + 2.0 / 8 + 1e-6  # trunk and mask are 1-Lipschitz Björck convolutions
    assert measured_lipschitz(module, SHAPE, (0.1, 1.0, 30.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.3, 10.0)) <= 1 + TOL


def test_clamp_is_active() -> None:
    # Without the clamp, (1 + sigmoid(m)) / 2 * T(x) has a Jacobian growing with the input.
    torch.manual_seed(1)
    module = ResidualAttention(2, normalize=False).double().eval()
    bound = module.lipschitz_bound(SHAPE)

    def unclamped(x: Tensor) -> Tensor:
        return (1 + module.mask_logits(x).sigmoid()) / 2 * module.act(module.trunk(x))

    gen = torch.Generator().manual_seed(0)
    worst = max(
        jacobian_spectral_norm(unclamped, 3000.0 * torch.randn(SHAPE, generator=gen, dtype=torch.float64))
        for _ in range(4)
    )
    x = 3000.0 * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    assert worst > 1.5 * bound
    assert jacobian_spectral_norm(module, x) <= bound * (1 + TOL)


def test_gradients_flow_and_bad_arguments() -> None:
    torch.manual_seed(2)
    grads_flow(ResidualAttention(2), torch.randn(2, *SHAPE))
    with pytest.raises(ValueError):
        ResidualAttention(3)
    with pytest.raises(ValueError):
        ResidualAttention(2, clamp=-1.0)
    with pytest.raises(ValueError, match="even"):
        ResidualAttention(2)(torch.randn(1, 2, 5, 4))
