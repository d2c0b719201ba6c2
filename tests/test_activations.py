"""lipnet.activations: GroupSort, MaxMin, FullSort, Householder: values, gradient norms, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipnet.activations import FullSort, GroupSort, HouseholderActivation, MaxMin


def _reference_group_sort(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.unflatten(1, (x.shape[1] // k, k)).sort(dim=2).values.flatten(1, 2)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(1, 4),
    k=st.integers(1, 4),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    seed=st.integers(0, 2**16),
)
def test_group_sort_sorts_each_group(groups: int, k: int, spatial: tuple[int, ...], seed: int) -> None:
    x = torch.randn(2, groups * k, *spatial, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(GroupSort(k)(x), _reference_group_sort(x, k), rtol=0, atol=0)


def test_maxmin_is_group_sort_2_with_ties() -> None:
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, -1.0, 5.0]])
    assert torch.equal(MaxMin()(x), torch.tensor([[1.0, 3.0, 2.0, 2.0, -1.0, 5.0]]))
    assert torch.equal(MaxMin()(x), GroupSort(2)(x))


def test_full_sort_sorts_all_channels() -> None:
    x = torch.randn(3, 5, 2, 2)
    assert torch.equal(FullSort()(x), x.sort(dim=1).values)


def _householder_at(angle: float, channels: int = 4) -> HouseholderActivation:
    act = HouseholderActivation(channels)
    with torch.no_grad():
        act.angle.fill_(angle)
    return act


def test_householder_starts_as_maxmin_on_channel_halves() -> None:
    act = HouseholderActivation(6)
    z = torch.randn(4, 6, 3, 3)
    x, y = z.chunk(2, dim=1)
    torch.testing.assert_close(act(z), torch.cat((torch.minimum(x, y), torch.maximum(x, y)), dim=1))


def test_householder_equals_its_per_half_definition_bit_for_bit() -> None:
    """The pair-axis update ``v - 2 min(theta^T v, 0) theta`` against the definition written per half
    (reflect where ``theta^T v <= 0``): the same values and gradients to the last bit, so rows trained
    before the faster forward are what the code trains now."""
    torch.manual_seed(0)
    for shape in ((5, 6, 4, 4), (7, 8)):
        act = HouseholderActivation(shape[1]).double()
        with torch.no_grad():
            act.angle.uniform_(-7.0, 7.0)
        z = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        view = [1, -1] + [1] * (z.ndim - 2)
        cos, sin = act.angle.cos().view(view), act.angle.sin().view(view)
        x, y = z.chunk(2, dim=1)
        projection = cos * x + sin * y
        reflect = projection <= 0
        expected = torch.cat(
            (
                torch.where(reflect, x - 2 * projection * cos, x),
                torch.where(reflect, y - 2 * projection * sin, y),
            ),
            dim=1,
        )
        out = act(z)
        assert torch.equal(out, expected)
        g = torch.randn(shape, dtype=torch.float64)
        got = torch.autograd.grad(out, (z, act.angle), g)
        want = torch.autograd.grad(expected, (z, act.angle), g)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0)


def test_householder_reflects_exactly_where_theta_z_is_not_positive() -> None:
    phi = 0.3
    act = _householder_at(phi, 2)
    theta = torch.tensor([math.cos(phi), math.sin(phi)])
    z = torch.randn(50, 2)
    out = act(z)
    keep = z @ theta > 0
    torch.testing.assert_close(out[keep], z[keep])
    reflection = torch.eye(2) - 2 * torch.outer(theta, theta)
    torch.testing.assert_close(out[~keep], z[~keep] @ reflection.T)


@pytest.mark.parametrize(
    ("act", "shape"),
    [
        (GroupSort(2), (6, 3, 3)),
        (GroupSort(3), (6,)),
        (MaxMin(), (4,)),
        (FullSort(), (5, 2, 2)),
        (HouseholderActivation(4), (4, 2, 2)),
    ],
    ids=["gs2", "gs3", "maxmin", "fullsort", "householder"],
)
def test_gradient_norm_preserving(act: nn.Module, shape: tuple[int, ...]) -> None:
    if isinstance(act, HouseholderActivation):
        with torch.no_grad():
            act.angle.uniform_(-math.pi, math.pi)
    g = torch.Generator().manual_seed(0)
    act = act.double()
    for _ in range(10):
        x = torch.randn(1, *shape, generator=g, dtype=torch.float64, requires_grad=True)
        u = torch.randn(1, *shape, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad(act(x), x, u)
        assert grad.norm().item() == pytest.approx(u.norm().item(), rel=1e-12)


def test_group_sort_2_derivatives_of_every_mode() -> None:
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    act = GroupSort(2)
    assert torch.autograd.gradcheck(act, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(act, (x,))
    jac = torch.func.jacrev(lambda z: act(z.unsqueeze(0)).squeeze(0))(x[0].detach())
    ref = torch.func.jacrev(lambda z: _reference_group_sort(z.unsqueeze(0), 2).squeeze(0))(x[0].detach())
    assert torch.equal(jac, ref)


def test_bounds_are_one() -> None:
    for act in (GroupSort(4), MaxMin(), FullSort(), HouseholderActivation(2)):
        assert act.lipschitz_bound() == 1.0


def test_householder_refuses_a_non_finite_angle() -> None:
    act = _householder_at(float("nan"), 2)
    with pytest.raises(ValueError, match="non-finite"):
        act.lipschitz_bound()


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        GroupSort(4)(torch.randn(2, 6))
    with pytest.raises(ValueError, match="shape"):
        GroupSort(2)(torch.randn(6))
    with pytest.raises(ValueError, match="group_size"):
        GroupSort(0)
    with pytest.raises(ValueError, match="even"):
        HouseholderActivation(3)
    with pytest.raises(ValueError, match="channels"):
        HouseholderActivation(4)(torch.randn(2, 6))


# -- the portable rewrite (issue 15): the same values and derivatives as the custom autograd Function


class _OldSwapPairs(torch.autograd.Function):
    """The former implementation of GroupSort(2) (a custom autograd Function, which TorchScript and
    torch.jit.trace + save cannot carry), kept here as the reference of values and derivatives."""

    @staticmethod
    def forward(values: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
        pairs = values.unflatten(1, (values.shape[1] // 2, 2))
        return torch.where(swap.unsqueeze(2), pairs.flip(2), pairs).flatten(1, 2)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
        ctx.swap = inputs[1]  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        return _OldSwapPairs.apply(grad, ctx.swap), None  # type: ignore[attr-defined]


def _old_group_sort_2(x: torch.Tensor) -> torch.Tensor:
    pairs = x.detach().unflatten(1, (x.shape[1] // 2, 2))
    return _OldSwapPairs.apply(x, pairs[:, :, 0] > pairs[:, :, 1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 6), (3, 8, 5), (2, 4, 3, 5)])
def test_group_sort_2_has_the_old_values_and_gradients_exactly(
    training: bool, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(shape, generator=gen, dtype=dtype)
        x[0, :2] = 0.5  # a tie: the old Function left the pair in place and its gradient too
        x[-1, 2:4] = 0.0
        u = torch.randn(shape, generator=gen, dtype=dtype)
        act = MaxMin().train(training)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = act(xa), _old_group_sort_2(xb)
        assert torch.equal(ya, yb)
        (ga,) = torch.autograd.grad(ya, xa, u)
        (gb,) = torch.autograd.grad(yb, xb, u)
        assert torch.equal(ga, gb)


def test_group_sort_2_is_scriptable_with_the_same_values() -> None:
    x = torch.randn(3, 6, 2, 2)
    for training in (True, False):
        act = GroupSort(2).train(training)
        scripted = torch.jit.script(act)
        assert torch.equal(scripted(x), act(x))
    for act in (GroupSort(3), FullSort(), HouseholderActivation(6)):
        assert torch.equal(torch.jit.script(act)(x), act(x))
