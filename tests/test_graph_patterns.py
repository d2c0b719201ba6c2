"""``certify.graph.patterns``: op patterns bounded as a whole, on the graphs exported files hold.

Each pattern is exported with ``torch.export`` (the aten graph a ``.pt2`` file holds; TorchScript and
ONNX graphs spell the same operations) and bounded by certify; the bound must be what the module's
own rule gives (no looseness from spelling it in small operations) and above the measured Lipschitz
constant: Jacobian norms at many points (exact, float64) and gradient ascent on difference
quotients, with weights pushed away from their initialisation. Variants that are not the pattern
(a condition that is not the pair's own order, mixed operands, a square used without its root)
must fall back to the per-op rules or be refused.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from certify.audit import empirical_lipschitz_lower
from certify.bounds import lipschitz_bound
from certify.graph import UnsupportedOperationsError, analyze
from lipnet.activations import MaxMin
from lipnet.pooling import GlobalL2NormPool2d, ScaledL2NormPool2d

TOL = 1e-6


def _graph(module: nn.Module, shape: tuple[int, ...]) -> fx.GraphModule:
    """``module`` as the aten graph of a torch.export program (what ``certify.loading`` reads from .pt2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module.eval(), (torch.rand(2, *shape),))
    gm = program.module()
    return fx.GraphModule(gm, gm.graph)


def _measured(fn: nn.Module, shape: tuple[int, ...], seed: int = 0) -> float:
    """A lower bound of ``fn``'s Lipschitz constant: exact Jacobian norms at random points and ascent."""
    gen = torch.Generator().manual_seed(seed)
    fn = fn.double()
    best = 0.0
    for _ in range(20):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda z: fn(z.unsqueeze(0)).flatten(), x)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2)))
    x = torch.randn((4, *shape), generator=gen, dtype=torch.float64)
    return max(best, empirical_lipschitz_lower(fn, x, steps=60, step_size=0.05))


def _check(module: nn.Module, shape: tuple[int, ...]) -> float:
    """The graph bound equals the module's own (eager) bound and is above the measured constant."""
    torch.manual_seed(0)
    with torch.no_grad():  # weights away from their initialisation
        for p in module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    graph_bound = analyze(_graph(module, shape), shape).bound
    assert _measured(module, shape) <= graph_bound * (1 + TOL)
    return graph_bound


# -- 1. sorted pairs by a swap ---------------------------------------------------------------


def test_group_sort_swap_is_one_lipschitz_in_the_graph() -> None:
    model = nn.Sequential(nn.Linear(6, 8), MaxMin(), nn.Linear(8, 8), MaxMin(), nn.Linear(8, 3))
    bound = _check(model, (6,))
    assert bound == pytest.approx(lipschitz_bound(model.eval(), (6,)), rel=1e-9)


class _OtherCondition(nn.Module):
    """Swaps each pair where its first entry is positive: discontinuous, not a sort."""

    def forward(self, x: Tensor) -> Tensor:
        pairs = x.unflatten(1, [x.shape[1] // 2, 2])
        swap = (pairs.select(2, 0) > 0).unsqueeze(2)
        return torch.where(swap, pairs.flip([2]), pairs).flatten(1, 2)


class _OtherPairs(nn.Module):
    """Swaps pairs by the order of another pair's entries: discontinuous too."""

    def forward(self, x: Tensor) -> Tensor:
        pairs = x.unflatten(1, [x.shape[1] // 2, 2])
        other = pairs.roll(1, 1)
        swap = (other.select(2, 0) > other.select(2, 1)).unsqueeze(2)
        return torch.where(swap, pairs.flip([2]), pairs).flatten(1, 2)


@pytest.mark.parametrize("module", [_OtherCondition(), _OtherPairs()])
def test_a_swap_on_another_condition_is_refused(module: nn.Module) -> None:
    with pytest.raises(UnsupportedOperationsError, match="condition"):
        analyze(_graph(module, (6,)), (6,))


# -- 2. complementary order statistics -------------------------------------------------------


class _SplitMaxMin(nn.Module):
    """orthogonium's MaxMin: the halves' entrywise max, then min."""

    def forward(self, z: Tensor) -> Tensor:
        a, b = z.split(z.shape[1] // 2, 1)
        return torch.cat([torch.max(a, b), torch.min(a, b)], dim=1)


class _ReducedPairs(nn.Module):
    """deel-torchlip's GroupSort2: min and max over a dimension of size 2, concatenated."""

    def forward(self, z: Tensor) -> Tensor:
        p = z.view(z.shape[0], z.shape[1] // 2, 2)
        low, high = torch.min(p, 2, keepdim=True)[0], torch.max(p, 2, keepdim=True)[0]
        return torch.cat([low, high], dim=2).view(z.shape)


class _MixedOperands(nn.Module):
    """min(a, b) with max(a, c): not a sorted pair; the per-op rules apply."""

    def forward(self, z: Tensor) -> Tensor:
        a, b, c = z.chunk(3, 1)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, c)], dim=1)


@pytest.mark.parametrize("activation", [_SplitMaxMin(), _ReducedPairs()])
def test_complementary_min_max_pairs_are_one_lipschitz(activation: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(6, 8), activation, nn.Linear(8, 3))
    bound = _check(model, (6,))
    norms = math.prod(float(torch.linalg.matrix_norm(m.weight.double(), ord=2)) for m in (model[0], model[2]))
    assert bound == pytest.approx(norms, rel=1e-8)  # certify adds its float64 slack to each norm


def test_mixed_min_max_fall_back_to_the_per_op_rules() -> None:
    model = nn.Sequential(nn.Linear(6, 6), _MixedOperands())
    bound = _check(model, (6,))
    norm = float(torch.linalg.matrix_norm(model[0].weight.double(), ord=2))
    assert bound > norm * 1.01  # not the sorted-pair bound: each part counts both of its operands


# -- 3. square sums and their roots ----------------------------------------------------------


class _NormResidual(nn.Module):
    """orthogonium's L2NormResidual: sqrt(x^2 / 2 + fn(x)^2 / 2 + eps) entrywise."""

    def __init__(self) -> None:
        super().__init__()
        self.fn = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt(0.5 * x * x + 0.5 * self.fn(x) ** 2 + 1e-6)


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (ScaledL2NormPool2d(2), (2, 4, 4)),
        (GlobalL2NormPool2d(), (2, 4, 4)),
        (nn.LPPool2d(2, 2), (2, 4, 4)),
        (nn.LPPool2d(2, 3, stride=1), (2, 5, 5)),  # overlapping windows: sqrt(9) copies
    ],
)
def test_l2_norms_of_windows_are_bounded_by_their_copies(pool: nn.Module, shape: tuple[int, ...]) -> None:
    model = nn.Sequential(nn.Conv2d(shape[0], 2, 3, padding=1), pool)
    bound = _check(model, shape)
    assert bound == pytest.approx(lipschitz_bound(model.eval(), shape), rel=1e-6)


def test_a_sum_of_squares_of_two_functions_is_bounded_at_its_root() -> None:
    model = _NormResidual()
    bound = _check(model, (4,))
    fn_norm = float(torch.linalg.matrix_norm(model.fn.weight.double(), ord=2))
    assert bound == pytest.approx(math.sqrt(0.5 + 0.5 * fn_norm**2), rel=1e-8)


class _Shifted(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt((x * x - 1.0).clamp_min(0.0))


class _Square(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x * x).sum(dim=1, keepdim=True)


class _Product(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sqrt(x * x.flip(1))


@pytest.mark.parametrize("module", [_Shifted(), _Square(), _Product()])
def test_squares_without_a_plain_root_are_refused(module: nn.Module) -> None:
    with pytest.raises(UnsupportedOperationsError, match="product of two input-dependent"):
        analyze(_graph(module, (4,)), (4,))


# -- 4. circular convolutions ----------------------------------------------------------------


@pytest.mark.parametrize(("kernel", "size"), [(3, 5), (5, 4), (3, 8)])
def test_circular_padding_and_convolution_are_one_circular_convolution(kernel: int, size: int) -> None:
    conv = nn.Conv2d(2, 3, kernel, padding=kernel // 2, padding_mode="circular")
    bound = _check(conv, (2, size, size))
    assert bound == pytest.approx(lipschitz_bound(conv.eval(), (2, size, size)), rel=1e-9)


# -- 5. gradient steps -----------------------------------------------------------------------


class _Step(nn.Module):
    """``x - P^T relu(Q x + b)``: a dense or convolutional gradient step with any weights."""

    def __init__(self, conv: bool, adjoint: bool) -> None:
        super().__init__()
        if conv:
            self.inner: nn.Module = nn.Conv2d(3, 4, 3, padding=1)
            self.outer: nn.Module = nn.ConvTranspose2d(4, 3, 3, padding=1, bias=False)
        else:
            self.inner = nn.Linear(5, 7)
            self.outer = nn.Linear(7, 5, bias=False)
        if adjoint:  # the SLL form: P = diag(2 / ||Q_i||^2 ... ) Q, a step of at most 1
            with torch.no_grad():
                q = self.inner.weight
                scale = 1.0 / float(torch.linalg.matrix_norm(q.flatten(1).double(), ord=2)) ** 2
                self.outer.weight.copy_(q.T * scale if not conv else q * scale / 9.0)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.outer(F.relu(self.inner(x)))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("adjoint", [False, True])
def test_gradient_steps_are_bounded_soundly(conv: bool, adjoint: bool) -> None:
    shape = (3, 4, 4) if conv else (5,)
    step = _Step(conv, adjoint)
    torch.manual_seed(1)
    bound = analyze(_graph(step, shape), shape).bound
    assert _measured(step, shape) <= bound * (1 + TOL)
    if adjoint:
        assert bound <= 1.0 + 1e-6  # the fitted steps make E = 0: max(1, a^2 - 1) with a^2 <= 1
