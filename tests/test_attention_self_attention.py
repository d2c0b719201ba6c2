"""Token mixers: bounded dot-product, Kim et al.'s L2-MHA (and why untied values fail), memory attention."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_common import TOL, grads_flow, measured_lipschitz, sharpen
from torch import Tensor

from certify.exact import jacobian_spectral_norm
from lipnet.attention import BoundedDotProductAttention, L2MultiheadAttention, MemoryAttention

SHAPE = (4, 4)  # (N tokens, dim)


def test_bounded_dot_product_bound_and_normalization() -> None:
    torch.manual_seed(0)
    module = BoundedDotProductAttention(4, heads=2, radius=2.0, normalize=False).double()
    bound = module.lipschitz_bound(SHAPE)
    assert bound <= module.lipschitz_bound() * (1 + 1e-12)  # the N-free bound is the larger one
    assert measured_lipschitz(module, SHAPE, (0.3, 1.5, 50.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.5, 50.0)) <= 1 + TOL


def test_bounded_dot_product_projection_is_active() -> None:
    # Without the token projection, dot-product attention is not Lipschitz (Kim et al., Thm 3.1).
    torch.manual_seed(1)
    module = BoundedDotProductAttention(4, heads=1, radius=1.0, normalize=False).double()
    bound = module.lipschitz_bound(SHAPE)

    def unprojected(x: Tensor) -> Tensor:
        q, k, v = module.query(x), module.key(x), module.value(x)
        return module.out((q @ k.transpose(-1, -2) / math.sqrt(module.head_dim)).softmax(-1) @ v)

    gen = torch.Generator().manual_seed(0)
    points = [3.0 * torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(6)]
    assert max(jacobian_spectral_norm(unprojected, x) for x in points) > bound
    assert max(jacobian_spectral_norm(module, x) for x in points) <= bound * (1 + TOL)


def test_l2_mha_bound_and_normalization() -> None:
    torch.manual_seed(2)
    module = L2MultiheadAttention(4, heads=2, normalize=False).double()
    with torch.no_grad():
        module.query.weight.mul_(2.0)  # sharper attention
    bound = module.lipschitz_bound(SHAPE)
    assert bound < module.lipschitz_bound((16, 4))  # grows with N
    assert module.lipschitz_bound() == math.inf  # no finite bound holds for every N
    assert measured_lipschitz(module, SHAPE, (0.3, 3.0, 30.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert measured_lipschitz(module, SHAPE, (0.5, 30.0)) <= 1 + TOL


def _l2_far_tokens(query_scale: float, normalize: bool) -> tuple[L2MultiheadAttention, Tensor]:
    """dim 2, one head, ``W_Q = query_scale I``, ``W_V = W_O = I``, and two tokens far apart."""
    module = L2MultiheadAttention(2, heads=1, normalize=normalize).double()
    with torch.no_grad():
        module.query.weight.copy_(query_scale * torch.eye(2))
        module.value.weight.copy_(torch.eye(2))
        module.out.weight.copy_(torch.eye(2))
        module.out.bias.zero_()
    return module, torch.tensor([[0.0, 0.0], [5.0, 0.0]], dtype=torch.float64)


def test_l2_mha_bound_is_quadratic_in_the_query_weights() -> None:
    # Scaling W_Q by t and X by 1/t leaves P unchanged and scales f by 1/t: the Lipschitz constant is
    # t^2 times larger. With W_Q = 10 I and tokens 50 apart in query space, P = I to machine precision
    # and f = X A W_V^T with A = 100 I / sqrt 2: ||J(X)|| = 100 / sqrt 2, more than twice the bound
    # sqrt(N / d) (4 W_0(N / e) + 1) ||W_Q|| ||W_V|| ||W_O|| = 28.5 (Kim et al.'s, linear in W_Q).
    module, x = _l2_far_tokens(10.0, normalize=False)
    jacobian = jacobian_spectral_norm(module, x)
    assert jacobian == pytest.approx(100 / math.sqrt(2), rel=1e-9)
    assert jacobian <= module.lipschitz_bound((2, 2))
    small, _ = _l2_far_tokens(1.0, normalize=False)
    # W_Q enters as ||W_V W_Q^T|| ||W_Q||: exactly quadratic, up to the float64 rounding of the norms.
    assert module.lipschitz_bound((2, 2)) == pytest.approx(100 * small.lipschitz_bound((2, 2)), rel=1e-12)
    normalized, _ = _l2_far_tokens(10.0, normalize=True)
    assert jacobian_spectral_norm(normalized, x) <= 1 + TOL


@pytest.mark.parametrize("factor", [3.0, 10.0, 30.0, 100.0])
def test_l2_mha_bound_holds_for_large_weights(factor: float) -> None:
    # Every parameter times ``factor``: the Lipschitz constant grows like factor^4 (W_Q twice, W_V, W_O).
    # At 30 and 100 the ascent beats a bound linear in W_Q (factor^3) by 1.07x and 3.0x; normalised by
    # it, the module is 2.0- and 5.5-Lipschitz. Small inputs matter: the worst points shrink like 1 / ||W_Q||.
    torch.manual_seed(0)
    module = sharpen(L2MultiheadAttention(4, heads=2, normalize=False).double(), factor)
    bound = module.lipschitz_bound(SHAPE)
    measured = measured_lipschitz(module, SHAPE, (0.1 / factor, 0.1, 3.0))
    assert measured <= bound * (1 + TOL)
    assert measured > bound / 20  # the ascent found the factor^4 growth: the test can fail
    torch.manual_seed(0)
    normalized = sharpen(L2MultiheadAttention(4, heads=1).double(), factor)
    assert measured_lipschitz(normalized, (3, 4), (0.1 / factor, 0.1, 3.0)) <= 1 + TOL


def _untied_l2_attention(wq: Tensor, wv: Tensor) -> callable:  # type: ignore[valid-type]
    """L2 attention with scores from W_Q (tied keys) but the untied value path P X W_V^T."""

    def fn(x: Tensor) -> Tensor:
        q = x @ wq.T
        return (-torch.cdist(q, q).square() / math.sqrt(wq.shape[0])).softmax(-1) @ x @ wv.T

    return fn


def test_untied_value_l2_attention_is_not_lipschitz() -> None:
    # W_Q has a null space (2 x 4): token components there leave the scores unchanged, but the
    # untied values X W_V^T grow with them, and so does the Jacobian (through dP X W_V^T).
    gen = torch.Generator().manual_seed(3)
    wq = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    wv = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    null = torch.linalg.svd(wq).Vh[2:]  # (2, 4): rows span the null space of W_Q
    base = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    direction = torch.randn(4, 2, generator=gen, dtype=torch.float64) @ null
    fn = _untied_l2_attention(wq, wv)
    norms = [jacobian_spectral_norm(fn, base + t * direction) for t in (1.0, 10.0, 100.0, 1000.0)]
    assert all(b > 3 * a for a, b in zip(norms, norms[1:], strict=False)), norms  # unbounded growth
    assert norms[-1] > 200 * norms[0], norms
    # The tied form (Kim et al.) with the same W_Q stays below its bound at the same points.
    module = L2MultiheadAttention(4, heads=2, normalize=False).double()
    with torch.no_grad():
        module.query.weight.copy_(torch.cat([wq, wq]) / math.sqrt(2))
    bound = module.lipschitz_bound(SHAPE)
    assert norms[-1] > bound
    assert all(
        jacobian_spectral_norm(module, base + t * direction) <= bound * (1 + TOL) for t in (1.0, 1000.0)
    )
    with pytest.raises(ValueError, match="not Lipschitz"):
        L2MultiheadAttention(4, heads=2, tied=False)


def test_memory_attention_is_non_expansive() -> None:
    torch.manual_seed(4)
    module = MemoryAttention(4, slots=6, beta=3.0).double()
    with torch.no_grad():
        module.memory.mul_(3.0)
    assert module.lipschitz_bound() == 1.0
    measured = measured_lipschitz(module, SHAPE, (0.3, 3.0, 30.0))
    assert 0.5 < measured <= 1 + TOL
    # A step twice too large is not non-expansive: the bound's step is what makes it so.
    x = torch.randn(SHAPE, dtype=torch.float64)
    step = module._step(torch.float64)

    def doubled(z: Tensor) -> Tensor:
        w = (module.beta * (z @ module.memory.T) + module.bias).softmax(-1)
        return z - 4 * step * (w @ module.memory)

    worst = max(jacobian_spectral_norm(doubled, s * x) for s in (0.01, 0.1, 0.3))
    assert worst > 1 + 1e-3


def test_gradients_flow_and_bad_arguments() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, *SHAPE)
    grads_flow(BoundedDotProductAttention(4, heads=2), x)
    grads_flow(L2MultiheadAttention(4, heads=2), x)
    grads_flow(MemoryAttention(4, slots=3), x)
    with pytest.raises(ValueError):
        L2MultiheadAttention(5, heads=2)
    with pytest.raises(ValueError):
        BoundedDotProductAttention(4, radius=0.0)
    with pytest.raises(ValueError):
        MemoryAttention(4, slots=0)
    with pytest.raises(ValueError, match="expects"):
        BoundedDotProductAttention(4)(torch.randn(2, 3, 5))
