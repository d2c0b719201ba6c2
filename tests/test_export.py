"""``lipnet.export``: plain frozen layers, identical eval outputs, the same bounds and certificates.

Every model family (each registered model's class, built tiny) with every layer kind it takes:
the copy's outputs equal the model's, no lipnet layer (parametrization, eval cache, step
rescaling) is left in it, its bound is a bound (Jacobian norms) no larger than the model's, and
``certify`` gives the same rule and radii. Then the two frozen forms the export introduces:
:class:`~lipnet.layers.PotentialStep` (SLL / CPL blocks) and :class:`~lipnet.layers.FourierConv2d`
(Cayley), against exact operators, with adversarial weights and bad arguments.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_models import SLL_TINY, TINY
from torch import Tensor, nn

import lipnet
from certify.bounds import lipschitz_bound
from certify.exact import dense_matrix, dense_operator_norm, jacobian_spectral_norm
from certify.radius import certify, split_head
from lipnet import models
from lipnet.layers import (
    AOLConv2d,
    CayleyConv2d,
    CPLConv2d,
    CPLLinear,
    FourierConv2d,
    PotentialStep,
    SLLConv2d,
    SLLLinear,
    list_layer_kinds,
)
from lipnet.models.fmnist import FashionConvNet
from lipnet.models.lipconvnet import LipConvNet
from lipnet.models.sll import SLLNet

#: Modules of the copy that may hold weights: plain torch layers and the export's frozen forms.
_WEIGHTED = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d, FourierConv2d, PotentialStep)

Build = Callable[[str], nn.Module]

#: Every model family, tiny: class -> (builder taking a layer kind, per-sample input shape, kinds).
FAMILIES: dict[str, tuple[Build, tuple[int, int, int], list[str]]] = {
    "BethuneVGG": (
        lambda k: models.create("bethune_vgg", conv=k, **TINY["bethune_vgg"][0]),
        TINY["bethune_vgg"][1],
        list_layer_kinds(),
    ),
    "LipConvNet": (
        lambda k: LipConvNet(3, 3, input_size=4, conv=k, width=4, depth=1),
        (3, 4, 4),
        list_layer_kinds(),
    ),
    "LiResNet": (
        lambda k: models.create("liresnet", conv=k, **TINY["liresnet"][0]),
        TINY["liresnet"][1],
        list_layer_kinds(),
    ),
    "FashionConvNet": (lambda k: FashionConvNet(1, 3, 2, 1, 4, k, 4), (1, 4, 4), list_layer_kinds()),
    "SLLNet": (
        lambda k: SLLNet(**SLL_TINY[0], width=4, n_conv=2, n_dense=1, dense_inner=8),  # type: ignore[arg-type]
        SLL_TINY[1],
        ["sll"],
    ),
    "SmallCNN": (
        # norm="none": every layer plain after the export (AOL's default centring exports to BatchNorm2d,
        # tested in tests/test_centering.py)
        lambda k: models.create(
            "small_cnn", conv=k, in_channels=1, num_classes=3, width=2, input_size=4, norm="none"
        ),
        (1, 4, 4),
        ["aol", "bcop", "bjorck"],
    ),
}
CASES = [(family, kind) for family, (_, _, kinds) in FAMILIES.items() for kind in kinds]


def _trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Move the weights away from their initialisation with two Adam steps, then eval."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn((4, *shape))).square().sum().backward()
        opt.step()
    return model.eval()


def test_families_cover_every_registered_model() -> None:
    # a constructor's return annotation names the family without building the full-size model (tens of
    # millions of weights)
    names = models.list_models()
    classes = {typing.get_type_hints(models.model_entrypoint(name))["return"].__name__ for name in names}
    assert classes == set(FAMILIES)


def _product_error_bound(head: nn.Linear, inputs: Tensor) -> Tensor:
    """Bound of ``|fl32(W g + b) - (W g + b)|`` per sample and output, float64, for float32 ``g``.

    ``gamma_(n+1) (|W| |g| + |b|)`` with ``gamma_k = k u / (1 - k u)``, ``u = 2^-24`` and ``n`` input
    features: a dot product of ``n`` terms plus the bias, in any order, with or without FMA
    (Higham, "Accuracy and Stability of Numerical Algorithms", 2002, section 3.1). Flushing a
    subnormal result to zero (``torch.set_flush_denormal``) adds less than ``tiny = 2^-126`` for each
    of the ``2n + 1`` operations, and zeroing a subnormal input entry ``g_k`` less than
    ``|w_k| tiny``. The float64 evaluation of the bound rounds by far less than the factor
    ``1 + 1e-9``.
    """
    w = head.weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if head.bias is None else head.bias.detach().double()
    k = w.shape[1] + 1
    u, tiny = 2.0**-24, torch.finfo(torch.float32).tiny
    gamma = k * u / (1.0 - k * u)
    flushed = (2 * k + w.abs().sum(dim=1)) * tiny
    return (gamma * (inputs.double().abs() @ w.abs().T + b.abs()) + flushed) * (1.0 + 1e-9)


def _radius_tolerance(
    own_bound: float,
    copy_bound: float,
    own_logits: Tensor,
    copy_logits: Tensor,
    head_weight: Tensor,
    input_norm: float,
) -> tuple[float, float]:
    """``(rtol, atol)`` such that the copy's last-layer radii are within ``atol + rtol r`` of ``r``.

    ``certified_radius`` gives ``r = max(0, min_j (m_j - s) / (L d_j))`` with ``m_j = f_y - f_j``,
    ``s = 2e-5 (max_k |f_k| + L ||W|| ||x||)`` and ``d_j = ||w_y - w_j||``, ``W`` and ``x`` the same on
    both sides (the same head weight and batch). Then ``r_j = R_j - c_j`` with
    ``R_j = (m_j - 2e-5 max_k |f_k|) / (L d_j)`` and ``c_j = 2e-5 ||W|| ||x|| / d_j``, which does not
    depend on ``L``. With ``delta = max |f' - f|`` (both forward passes, which ``certify`` repeats on
    the same batch), the numerators of ``R`` differ by at most ``D = (2 + 2e-5) delta``, plus
    ``1e-12 max|f|`` for the float64 rounding of the margins and ratios (a few ``2^-53`` of
    ``|f_y| + |f_j| + s <= 3 max|f|``). Then ``R'_j = R_j L / L' + (that) / (L' d_j)``; ``min`` and
    ``max(0, .)`` are 1-Lipschitz, so with ``rho = max(L/L', L'/L) - 1``, ``d_min`` the smallest row
    distance and ``c = 2e-5 ||W|| max ||x|| / d_min``,
    ``|r' - r| <= rho (max(r, r') + c) + D / (min(L, L') d_min)``, i.e. (using
    ``max(r, r') <= r + |r' - r|``) ``rtol = rho / (1 - rho)`` and
    ``atol = (rho c + D / (min(L, L') d_min)) / (1 - rho)``. A radius that is 0 on one side only is at
    most that ``atol`` on the other.
    """
    w = head_weight.detach().double()
    rows = w.shape[0]
    pairs = torch.linalg.vector_norm(w[:, None, :] - w[None, :, :], dim=-1)
    # a lower bound of any float64 evaluation of the distances certify divides by
    d_min = float(pairs[~torch.eye(rows, dtype=torch.bool)].min()) * (1.0 - 1e-9)
    assert d_min > 0, "equal head rows: the radii are not a test of the copy"
    delta = float((copy_logits.double() - own_logits.double()).abs().max())
    margin_error = (2.0 + 2e-5) * delta + 1e-12 * float(own_logits.double().abs().max())
    rho = max(own_bound / copy_bound, copy_bound / own_bound) - 1.0
    # an upper bound of the head's norm in certify's slack term (its float64 SVD is within 1e-9 of it)
    slack_shift = 2e-5 * float(torch.linalg.matrix_norm(w, ord=2)) * (1.0 + 1e-9) * input_norm / d_min
    atol = (rho * slack_shift + margin_error / (min(own_bound, copy_bound) * d_min)) / (1.0 - rho)
    return rho / (1.0 - rho), atol


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_export_is_plain_with_the_same_outputs_bound_and_certificates(family: str, kind: str) -> None:
    if kind == "aoc":
        pytest.importorskip("orthogonium")
    build, shape, _ = FAMILIES[family]
    torch.manual_seed(1)
    model = _trained(build(kind), shape)
    exported = lipnet.export(model)

    x = torch.randn((8, *shape))
    (own_body, own_head), (copy_body, copy_head) = split_head(model), split_head(exported)  # type: ignore[misc]
    torch.testing.assert_close(copy_head.weight, own_head.weight, rtol=0, atol=0)
    with torch.no_grad():
        logits, copied, features = model(x), exported(x), own_body(x)
        # each frozen layer holds its source's values in its source's layout: the same operations
        assert torch.equal(copy_body(x), features)
    # Only the head may round differently (LipConvNet's copy computes only the logit rows, another
    # product kernel). Both are float32 evaluations of w_i . g + b_i with the same g, w_i and b_i:
    # each is within gamma_(n+1) (|W| |g| + |b|)_i of the exact value (Higham 2002, section 3.1,
    # any summation order), so they differ by at most twice that.
    difference = (copied.double() - logits.double()).abs()
    assert bool((difference <= 2.0 * _product_error_bound(copy_head, features)).all()), difference.max()
    assert type(exported) is nn.Sequential and not exported.training
    for m in exported.modules():
        # the two frozen forms live beside the layers they freeze; no other lipnet layer may be left
        frozen_form = type(m) in (FourierConv2d, PotentialStep)
        assert frozen_form or not type(m).__module__.startswith("lipnet.layers"), type(m)
        assert not hasattr(m, "parametrizations")
        if next(m.parameters(recurse=False), None) is not None:
            assert type(m) in _WEIGHTED, type(m)

    bound = lipschitz_bound(exported, shape)
    assert bound <= model.lipschitz_bound(shape) * (1 + 1e-5)
    for point in torch.randn((3, *shape), dtype=torch.float64):
        assert jacobian_spectral_norm(exported.double(), point) <= bound * (1 + 1e-6)
    exported.float()

    # the same certificate: last-layer rule on the same head rows, the same body bound and radii
    labels = logits.argmax(dim=1)
    own = certify(model, [(x, labels)], progress=False)
    copy = certify(exported, [(x, labels)], progress=False)
    assert own.rule == copy.rule == "last-layer"
    assert copy.lipschitz == pytest.approx(own.lipschitz, rel=1e-6)
    assert torch.equal(own.predictions, copy.predictions)
    norm = float(x.flatten(1).double().norm(dim=1).max())
    rtol, atol = _radius_tolerance(own.lipschitz, copy.lipschitz, logits, copied, own_head.weight, norm)
    torch.testing.assert_close(copy.radii, own.radii, rtol=rtol, atol=atol)


def test_lipconvnet_export_ends_with_the_rows_that_produce_the_logits() -> None:
    torch.manual_seed(0)
    model = _trained(LipConvNet(3, 3, input_size=4, conv="aol", width=4, depth=1), (3, 4, 4))
    exported = lipnet.export(model)
    head = exported[-1]
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (model.features, 3)
    assert torch.equal(head.weight, model[-2].weight[:3]) and torch.equal(head.bias, model[-2].bias[:3])
    # the residual head of sll is kept in the body, followed by the projection [I 0]
    sll = lipnet.export(_trained(LipConvNet(3, 3, input_size=4, conv="sll", width=4, depth=1), (3, 4, 4)))
    assert isinstance(sll[-2], PotentialStep) and torch.equal(sll[-1].weight, torch.eye(3, model.features))


def test_export_leaves_the_model_alone_and_is_independent() -> None:
    torch.manual_seed(2)
    kwargs, shape = TINY["bethune_vgg"]
    model = _trained(models.create("bethune_vgg", **kwargs), shape)
    exported = lipnet.export(model)
    assert model[0].__class__.__name__ != "Conv2d" and hasattr(model[0], "parametrizations")
    with torch.no_grad():
        exported[0].weight.zero_()
    x = torch.randn((2, *shape))
    assert not torch.equal(model(x), exported(x))
    assert lipnet.export is not None and "export" in lipnet.__all__


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: SLLConv2d(3, 4), (3, 5, 5)),
        (lambda: CPLConv2d(3, 5, 5), (3, 6, 4)),
        (lambda: CayleyConv2d(2, 4, 3, stride=2), (2, 4, 6)),
        (lambda: CayleyConv2d(3, 3, 3), (3, 5, 4)),
    ],
    ids=["sll-conv", "cpl-conv-k5", "cayley-stride2", "cayley-odd-grid"],
)
def test_frozen_forms_repeat_the_eval_forward_exactly(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    layer = _trained(make(), shape)
    exported = lipnet.export(nn.Sequential(layer), input_shape=shape)[0]
    assert type(exported) in (PotentialStep, FourierConv2d)
    x = torch.randn((5, *shape))
    with torch.no_grad():
        assert torch.equal(exported(x), layer(x))
    assert lipschitz_bound(exported, shape) == pytest.approx(layer.lipschitz_bound(shape), rel=1e-6)


@pytest.mark.parametrize("block_type", [SLLLinear, CPLLinear])
def test_dense_blocks_export_to_two_plain_linear_layers(block_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    block = _trained(block_type(6, 9), (6,))
    exported = lipnet.export(nn.Sequential(block))[0]
    assert type(exported.inner) is nn.Linear and type(exported.outer) is nn.Linear
    x = torch.randn((5, 6))
    with torch.no_grad():
        # the outer layer holds the block's transposed step weight in its layout: the same product
        assert torch.equal(exported(x), block(x))
    assert lipschitz_bound(exported, (6,)) == pytest.approx(block.lipschitz_bound((6,)), rel=1e-6)


def test_aoc_exports_to_its_kernel_in_a_plain_conv() -> None:
    pytest.importorskip("orthogonium")
    from lipnet.layers import AOCConv2d

    torch.manual_seed(0)
    layer = _trained(AOCConv2d(4, 4, 3), (4, 6, 6))
    conv = lipnet.export(nn.Sequential(layer))[0]
    assert type(conv) is nn.Conv2d and conv.padding_mode == "circular"
    assert torch.equal(conv.weight, layer.kernel())
    x = torch.randn((3, 4, 6, 6))
    with torch.no_grad():
        assert torch.equal(conv(x), layer(x))


def test_cayley_export_needs_the_input_size() -> None:
    model = nn.Sequential(CayleyConv2d(2, 2, 3))
    with pytest.raises(ValueError, match="input size"):
        lipnet.export(model)
    exported = lipnet.export(model, input_shape=(2, 4, 4))
    assert exported[0].input_size == (4, 4)
    with pytest.raises(ValueError, match="expects"):
        exported(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        exported[0].lipschitz_bound((2, 8, 8))
    # the model families declare their input shape, which the export uses
    family = LipConvNet(3, 3, input_size=4, conv="cayley", width=4, depth=1)
    assert isinstance(lipnet.export(family)[1], FourierConv2d)


def _pattern_norm(inner: Tensor, outer_t: Tensor, pattern: Tensor) -> float:
    """``||I - P^T S Q||_2`` for dense ``Q`` (inner), ``P^T`` (outer) and ``S = diag(pattern)``."""
    eye = torch.eye(inner.shape[1], dtype=torch.float64)
    return float(torch.linalg.matrix_norm(eye - outer_t @ (pattern[:, None] * inner), ord=2))


@pytest.mark.parametrize("perturbation", [0.0, 0.3])
def test_potential_step_bound_covers_every_activation_pattern(perturbation: float) -> None:
    """Dense block: the exact Lipschitz constant is the max over the 2^m ReLU patterns (convexity)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn((5, 4), generator=gen, dtype=torch.float64)
    s = torch.rand(5, generator=gen, dtype=torch.float64) * 2.0 / torch.linalg.matrix_norm(q, ord=2) ** 2
    error = perturbation * torch.randn((5, 4), generator=gen, dtype=torch.float64)
    inner = nn.Linear(4, 5, dtype=torch.float64)
    outer = nn.Linear(5, 4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        inner.weight.copy_(q)
        outer.weight.copy_((s[:, None] * q + error).T)
    block = PotentialStep(inner, outer, s)
    exact = max(
        _pattern_norm(q, outer.weight.detach(), torch.tensor(p, dtype=torch.float64))
        for p in itertools.product((0.0, 1.0), repeat=5)
    )
    bound = block.lipschitz_bound((4,))
    assert exact <= bound * (1 + 1e-9)
    a2 = float(torch.linalg.matrix_norm(s.sqrt()[:, None] * q, ord=2)) ** 2
    if perturbation:  # the bound without the rounding term would not hold: the term does work
        assert exact > max(1.0, a2 - 1.0) * (1 + 1e-3)
    else:
        assert bound == pytest.approx(max(1.0, a2 - 1.0), rel=1e-8)


def test_potential_step_conv_bound_is_sound_with_a_perturbed_adjoint() -> None:
    gen = torch.Generator().manual_seed(4)
    kernel = torch.randn((3, 2, 3, 3), generator=gen, dtype=torch.float64)
    shape = (2, 4, 4)
    q = dense_matrix(lambda z: F.conv2d(z, kernel, padding=1), shape)
    s = torch.rand(3, generator=gen, dtype=torch.float64) * 2.0 / torch.linalg.matrix_norm(q, ord=2) ** 2
    outer_kernel = s[:, None, None, None] * kernel + 0.05 * torch.randn(
        kernel.shape, generator=gen, dtype=torch.float64
    )
    inner = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    outer = nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        inner.weight.copy_(kernel)
        outer.weight.copy_(outer_kernel)
    block = PotentialStep(inner, outer, s)
    outer_t = dense_matrix(lambda z: F.conv_transpose2d(z, outer_kernel, padding=1), (3, 4, 4))
    patterns = [torch.ones(q.shape[0], dtype=torch.float64)]
    patterns += [torch.randint(0, 2, (q.shape[0],), generator=gen).double() for _ in range(200)]
    measured = max(_pattern_norm(q, outer_t, p) for p in patterns)
    for point in torch.randn((3, *shape), generator=gen, dtype=torch.float64):
        measured = max(measured, jacobian_spectral_norm(block, point))
    assert measured <= block.lipschitz_bound(shape) * (1 + 1e-9)
    assert measured <= block.lipschitz_bound() * (1 + 1e-9)


def test_fourier_conv_bound_is_the_exact_operator_norm() -> None:
    torch.manual_seed(5)
    layer = CayleyConv2d(3, 2, 3, stride=2, input_size=(4, 6)).double()
    frozen = lipnet.export(nn.Sequential(layer))[0]
    with torch.no_grad():
        frozen.symbol.mul_(1.5)  # a non-orthogonal symbol: the bound follows the buffer
    exact = dense_operator_norm(frozen, (3, 4, 6))
    assert frozen.lipschitz_bound() == pytest.approx(exact, rel=1e-9)
    assert frozen.lipschitz_bound() == pytest.approx(1.5, rel=1e-6)


def test_frozen_forms_refuse_bad_arguments() -> None:
    conv, transposed = nn.Conv2d(2, 3, 3, padding=1), nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False)
    PotentialStep(conv, transposed, torch.ones(3))
    with pytest.raises(ValueError, match="steps"):
        PotentialStep(conv, transposed, torch.ones(2))
    with pytest.raises(ValueError, match="inner"):
        PotentialStep(nn.Conv2d(2, 3, 3, stride=2, padding=1), transposed, torch.ones(3))
    with pytest.raises(ValueError, match="inner"):
        PotentialStep(nn.Conv2d(2, 3, 3, padding=0), transposed, torch.ones(3))
    with pytest.raises(ValueError, match="outer"):
        PotentialStep(conv, nn.ConvTranspose2d(3, 2, 3, padding=1), torch.ones(3))
    with pytest.raises(ValueError, match="outer"):
        PotentialStep(nn.Linear(2, 3), nn.Linear(3, 2), torch.ones(3))
    with pytest.raises(TypeError, match="PotentialStep takes"):
        PotentialStep(conv, nn.Linear(3, 2, bias=False), torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        PotentialStep(nn.Linear(2, 3), nn.Linear(3, 2, bias=False), -torch.ones(3)).lipschitz_bound()
    with pytest.raises(ValueError, match="symbol"):
        FourierConv2d(torch.zeros(4, 3, 2, 2), None, 1, (4, 4))
    with pytest.raises(ValueError, match="stride"):
        FourierConv2d(torch.zeros(2, 2, 2, 2, dtype=torch.complex64), None, 3, (4, 4))


class _ShiftedSLL(SLLConv2d):
    """Computes something else than SLLConv2d: the export of its base class does not apply."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 1.0


class _RenamedAOL(AOLConv2d):
    """Computes exactly what AOLConv2d computes: exported like it."""


class _Frozen(nn.Module):
    """A third-party layer with its own export(): the walker knows no layer class."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x

    def export(self) -> nn.Module:
        # a container: the walker walks the children of what export() returns
        return nn.Sequential(_Half(), nn.Identity())


class _Half(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x


def test_the_walker_follows_each_layer_export_and_its_behaviour() -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.export = nn.Linear(2, 2)  # a child named export is not an export() method
    model = nn.Sequential(_ShiftedSLL(2), _RenamedAOL(2, 2, 3, padding=1), _Frozen(), holder)
    exported = lipnet.export(model)
    # a subclass that redefines forward keeps its class (and is still bounded by its own method)
    assert type(exported[0]) is _ShiftedSLL
    assert type(exported[1]) is nn.Conv2d
    assert type(exported[2]) is nn.Sequential and type(exported[2][0]) is _Half
    assert type(exported[3]) is nn.Module and type(exported[3].export) is nn.Linear
    x = torch.randn((2, 2, 5, 5))
    with torch.no_grad():
        assert torch.equal(exported[:3](x), model.eval()[:3](x))
