"""Attention pooling over bags: soft attention (show-attend-tell), loss-based MIL attention, LSE pooling."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz
from torch import Tensor

from certify.exact import jacobian_spectral_norm
from lipnet.attention import LossAttentionMIL, LSEPooling, SoftAttentionPooling
from lipnet.attention._bounds import SLACK
from lipnet.catalogue.networks import CentredPooling

SHAPE = (5, 4)  # (K instances, features)


def test_soft_attention_pooling_bound_and_normalization() -> None:
    torch.manual_seed(0)
    module = SoftAttentionPooling(4, attention_dim=6, radius=2.0, normalize=False).double()
    with torch.no_grad():
        module.score.weight.mul_(3.0)
    bound = module.lipschitz_bound(SHAPE)
    assert bound <= module.lipschitz_bound() * (1 + 1e-12)
    assert measured_lipschitz(module, SHAPE, (0.3, 2.0, 50.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.5, 50.0)) <= 1 + TOL


def test_soft_attention_projection_is_active() -> None:
    # Without the projection, values grow in directions that leave the scores unchanged.
    torch.manual_seed(1)
    module = SoftAttentionPooling(4, attention_dim=2, normalize=False).double()
    bound = module.lipschitz_bound(SHAPE)

    def unprojected(x: Tensor) -> Tensor:
        alpha = module.score(torch.tanh(module.proj(x))).squeeze(-1).softmax(-1)
        return (alpha.unsqueeze(-1) * x).sum(1)

    gen = torch.Generator().manual_seed(0)
    null = torch.linalg.svd(module.proj.weight.detach()).Vh[2:]  # directions the scores ignore
    base = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    x = base + 1000.0 * torch.randn(5, 2, generator=gen, dtype=torch.float64) @ null
    assert jacobian_spectral_norm(unprojected, x) > 10 * bound
    assert jacobian_spectral_norm(module, x) <= bound * (1 + TOL)


def test_loss_attention_mil_bound_and_normalization() -> None:
    torch.manual_seed(2)
    module = LossAttentionMIL(4, 3, beta=2.0, radius=2.0, normalize=False).double()
    bound = module.lipschitz_bound(SHAPE)
    w = torch.linalg.matrix_norm(module.classifier.weight.detach(), ord=2).item()
    assert bound == pytest.approx(w * (1 + 2.0 * 2.0 / math.sqrt(2)), rel=1e-8)
    assert measured_lipschitz(module, SHAPE, (0.3, 2.0, 50.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.5, 50.0)) <= 1 + TOL
    bag, alpha, inst = module.with_attention(torch.randn(2, *SHAPE, dtype=torch.float64))
    assert bag.shape == (2, 3) and alpha.shape == (2, 5) and inst.shape == (2, 5, 3)
    assert torch.allclose(alpha.sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(bag, (alpha.unsqueeze(-1) * inst).sum(1))


def test_loss_attention_projection_is_active() -> None:
    # The paper's form (no projection) has a Jacobian growing with the instance logits.
    torch.manual_seed(3)
    module = LossAttentionMIL(4, 3, normalize=False).double()
    bound = module.lipschitz_bound(SHAPE)

    def unprojected(x: Tensor) -> Tensor:
        z = module.classifier(x)
        alpha = (module.beta * torch.logsumexp(z, -1)).softmax(-1)
        return (alpha.unsqueeze(-1) * z).sum(1)

    # Instances whose logits are class permutations of one large vector: equal scores (LSE is
    # permutation-invariant), so the weights stay spread, while the values differ and are large.
    w, bias = module.classifier.weight.detach(), module.classifier.bias.detach()
    points = []
    for t in (30.0, 100.0):
        z = t * torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
        logits = torch.stack([z.roll(k) for k in range(SHAPE[0])])
        points.append((logits - bias) @ torch.linalg.pinv(w).T)
    assert max(jacobian_spectral_norm(unprojected, x) for x in points) > 2 * bound
    assert max(jacobian_spectral_norm(module, x) for x in points) <= bound * (1 + TOL)


def test_centred_pooling_bound_and_normalization() -> None:
    torch.manual_seed(5)
    pool = SoftAttentionPooling(4, attention_dim=6, radius=1.0, normalize=False).double()
    with torch.no_grad():
        pool.score.weight.mul_(3.0)
    module = CentredPooling(pool, normalize=False)
    bound = module.lipschitz_bound(SHAPE)
    formula = math.sqrt(1 / SHAPE[0] + pool.lipschitz_bound(SHAPE) ** 2)
    assert formula <= bound <= formula * SLACK * (1 + 1e-15)  # the closed form times the float64 slack
    assert module.lipschitz_bound() >= bound
    assert measured_lipschitz(module, SHAPE, (0.3, 2.0, 50.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert module.lipschitz_bound(SHAPE) <= 1 + 1e-15
    assert measured_lipschitz(module, SHAPE, (0.5, 50.0)) <= 1 + TOL
    # With the pooling switched off (zero values) only the mean is left: exactly 1 / sqrt(K).
    empty = CentredPooling(SoftAttentionPooling(4, radius=1e-300, normalize=False).double(), normalize=False)
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert jacobian_spectral_norm(empty, x) == pytest.approx(1 / math.sqrt(SHAPE[0]), rel=1e-9)


def test_centred_pooling_ignores_a_common_offset() -> None:
    # The encoder's biases shift every instance of a bag alike. Centred, the pooling moves with the
    # offset and keeps reading the instances; projected around the origin, far away every instance
    # is on the sphere and the output no longer depends on them.
    torch.manual_seed(6)
    pool = SoftAttentionPooling(4, attention_dim=6, radius=2.0, normalize=False).double()
    module = CentredPooling(pool, normalize=False)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    offset = 1000.0 * torch.randn(4, dtype=torch.float64)
    assert torch.allclose(module(x + offset), module(x) + offset, atol=1e-9)
    assert torch.allclose(module.attention(x + offset), pool.attention(x - x.mean(1, keepdim=True)))
    far = x[0] + offset
    assert jacobian_spectral_norm(pool, far) < 0.01 * jacobian_spectral_norm(module, far)
    grads_flow(module, x)


def test_lse_pooling_is_one_lipschitz_and_tight() -> None:
    module = LSEPooling(beta=4.0)
    measured = measured_lipschitz(module, SHAPE, (0.3, 3.0, 30.0))
    assert 0.9 < measured <= module.lipschitz_bound() * (1 + TOL)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    assert torch.allclose(LSEPooling(1e-6)(x), x.mean(1), atol=1e-4)
    assert torch.allclose(LSEPooling(1e4)(x), x.amax(1), atol=1e-3)


def test_gradients_flow_and_bad_arguments() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, *SHAPE)
    grads_flow(SoftAttentionPooling(4), x)
    grads_flow(LossAttentionMIL(4, 3), x)
    with pytest.raises(ValueError):
        LSEPooling(beta=0.0)
    with pytest.raises(ValueError):
        LossAttentionMIL(4, 0)
    with pytest.raises(ValueError):
        SoftAttentionPooling(4, radius=math.inf)
    with pytest.raises(ValueError, match="expects"):
        SoftAttentionPooling(4)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="expects"):
        LSEPooling()(torch.randn(2, 5))
