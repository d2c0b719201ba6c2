"""lipnet.layers: orthogonality, the eval cache, export, AOL, RKO scaling, batch centering, attach."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lipnet
from certify.bounds import lipschitz_bound
from certify.exact import dense_operator_norm
from certify.radius import split_head
from lipnet.layers import (
    AOLConv2d,
    AOLConvRescaling,
    AOLLinear,
    AOLRescaling,
    BatchCentering,
    BjorckConv2d,
    BjorckLinear,
    BjorckOrthonormal,
    OrthogonalLinear,
    aol,
    bjorck,
    bjorck_orthonormalize,
    gram_norm_bound,
    orthogonal,
    patch_multiplicity,
)
from lipnet.layers.aol import aol_conv_scales
from lipnet.layers.base import frozen_conv2d, frozen_linear
from lipnet.layers.parametrization import EvalCache
from lipnet.layers.patches import patch_multiplicity_1d
from lipnet.models import create


def _svd(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().double().reshape(weight.shape[0], -1))


# --- Björck -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), steps=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_gram_norm_bound_is_an_upper_bound_within_its_factor(m: int, n: int, steps: int, seed: int) -> None:
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gram = w @ w.T if m <= n else w.T @ w
    true = torch.linalg.matrix_norm(gram, ord=2).item()
    bound = gram_norm_bound(gram, steps).item()
    assert true <= bound * (1 + 1e-12)
    assert bound <= true * min(m, n) ** (1 / 2**steps) * (1 + 1e-12)


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4), (3, 2, 7)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_bjorck_converges_to_the_polar_factor(shape: tuple[int, ...], order: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    got = bjorck_orthonormalize(w, 200, order=order, tol=1e-12)
    torch.testing.assert_close(got, u @ vh, atol=1e-10, rtol=0)


def test_bjorck_iterates_stay_contractive() -> None:
    # singular values spread over many orders of magnitude: no iterate may exceed 1
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    w = q1 @ torch.diag(torch.logspace(-6, 3, 8, dtype=torch.float64)) @ q2
    for iterations in range(1, 8):
        assert _svd(bjorck_orthonormalize(w, iterations, order=2)).max() <= 1 + 1e-12


@pytest.mark.parametrize(("n_in", "n_out"), [(16, 16), (24, 8), (8, 24)])
def test_bjorck_linear_is_orthonormal_in_eval(n_in: int, n_out: int) -> None:
    layer = BjorckLinear(n_in, n_out).eval()
    with torch.no_grad():
        layer.parametrizations.weight.original.normal_()  # a raw weight far from orthogonal
    sv = _svd(layer.weight)
    assert (sv - 1).abs().max() < 1e-6
    assert layer.lipschitz_bound() == pytest.approx(1.0, abs=1e-6)
    layer.train()
    assert _svd(layer.weight).max() <= 1 + 1e-5  # few iterations: a contraction, not yet orthogonal


def test_orthogonal_linear_is_orthonormal() -> None:
    layer = OrthogonalLinear(12, 7).eval()
    assert (_svd(layer.weight) - 1).abs().max() < 1e-5
    assert layer.lipschitz_bound() == pytest.approx(1.0, abs=1e-5)


def test_bjorck_survives_a_large_adam_step_on_a_large_layer() -> None:
    # deel-torchlip 1.0.5's SpectralLinear(1024, 1024) has a NaN weight after exactly this step: its
    # power-iteration estimate of ||W|| is stale after the update, so Björck starts outside its
    # region of convergence. Ours pre-scales by a sound bound computed from the new weight.
    torch.manual_seed(0)
    layer = BjorckLinear(1024, 1024)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 1024)
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        weight = layer.weight
        assert torch.isfinite(weight).all()
        assert torch.isfinite(layer(x)).all()
    assert layer.lipschitz_bound() <= 1 + 1e-5


def test_bjorck_conv_reshaped_kernel_is_scaled_orthonormal() -> None:
    conv = BjorckConv2d(4, 6, 3, stride=2, padding=1, groups=2).eval()
    assert conv.patch_multiplicity == 4  # ceil(3 / 2)^2
    per_group = conv.weight.detach().double().reshape(2, 3, -1)
    sv = torch.linalg.svdvals(per_group)
    torch.testing.assert_close(sv, torch.full_like(sv, 0.5), atol=1e-6, rtol=0)


# --- RKO scale ----------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "s", "d"), list(itertools.product((1, 2, 3, 5), (1, 2, 3), (1, 2))))
def test_zero_padding_multiplicity_formula(k: int, s: int, d: int) -> None:
    expected = math.ceil(k * math.gcd(d, s) / s)
    assert patch_multiplicity_1d(k, s, d, 0, 0, "zeros") == expected


def test_padding_modes_read_border_pixels_again() -> None:
    # reflect, k=3, pad=1: on a long input x_1 is read 4 times (output 0 reads it and its mirror);
    # on an input of size 3 it is the mirror at both ends: 5 reads
    assert patch_multiplicity_1d(3, 1, 1, 1, 1, "reflect") == 5
    assert patch_multiplicity((3, 3), (1, 1), (1, 1), 1, "reflect") == 25
    assert patch_multiplicity((3, 3), (1, 1), (1, 1), 1, "zeros") == 9
    assert patch_multiplicity_1d(3, 1, 1, 2, 2, "replicate") > 3


CONFIGS = [
    dict(kernel_size=3, padding=1, padding_mode=mode, stride=stride)
    for mode in ("zeros", "reflect", "replicate", "circular")
    for stride in (1, 2)
] + [
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding=2, dilation=2, padding_mode="circular", groups=2),
    dict(kernel_size=3, padding=2, padding_mode="replicate", stride=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("size", [3, 6])
def test_bjorck_conv_is_1_lipschitz_as_configured(config: dict[str, object], size: int) -> None:
    torch.manual_seed(size)
    conv = BjorckConv2d(4, 6, **config).double().eval()  # type: ignore[arg-type]
    exact = dense_operator_norm(lambda z: conv(z) - conv(torch.zeros_like(z)), (4, size, size))
    assert exact <= 1 + 1e-9
    assert conv.lipschitz_bound((4, size, size)) >= exact * (1 - 1e-9)


def test_reflect_padding_needs_the_larger_scale() -> None:
    # The stride-1 RKO scale 1/k is not enough under reflect padding (deel-torchlip's claim of 1):
    # a constant kernel on a constant image reads the border pixels 4/3 times as often.
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect", bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1 / 9)  # ||reshaped kernel|| = 1/3 = the stride-1 zero-padding RKO scale
    assert dense_operator_norm(conv, (1, 3, 3)) > 1.2


# --- eval cache ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: BjorckLinear(6, 4),
        lambda: AOLLinear(6, 4),
        lambda: OrthogonalLinear(6, 4),
        lambda: BjorckConv2d(2, 4, 3, padding=1),
        lambda: AOLConv2d(2, 4, 3, padding=1),
    ],
)
def test_eval_cache_is_exact_and_invalidated_by_an_optimizer_step(make: object) -> None:
    torch.manual_seed(0)
    layer: nn.Module = make()  # type: ignore[operator]
    layer.eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # served from the cache
        assert torch.equal(layer.weight, first)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    x = torch.randn((3, 6) if isinstance(layer, nn.Linear) else (3, 2, 5, 5))
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        second = layer.weight
    assert not torch.equal(first, second)
    # grad mode with trainable weights: recomputed with a graph (never a stale or detached cache)
    out = layer(x).square().sum()
    grads = torch.autograd.grad(out, [p for p in layer.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[:1])
    with torch.no_grad():
        assert torch.equal(layer.weight, second)


def test_train_mode_is_recomputed_every_call() -> None:
    layer = BjorckLinear(5, 5).train()
    assert layer.weight is not layer.weight


def test_cache_follows_load_state_dict() -> None:
    a, b = BjorckLinear(5, 3).eval(), BjorckLinear(5, 3).eval()
    with torch.no_grad():
        before = b.weight.clone()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert not torch.equal(before, b.weight)
        assert torch.equal(a.weight, b.weight)


# --- export -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: BjorckLinear(6, 4), (6,)),
        (lambda: AOLLinear(6, 4), (6,)),
        (lambda: OrthogonalLinear(6, 4), (6,)),
        (lambda: BjorckConv2d(2, 4, 3, padding=1, padding_mode="reflect"), (2, 5, 5)),
        (lambda: AOLConv2d(2, 4, 3, stride=2), (2, 5, 5)),
    ],
)
def test_remove_parametrizations_keeps_outputs_and_bounds(make: object, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer: nn.Module = make()  # type: ignore[operator]
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        before = model(x)
    bound_before = lipschitz_bound(model, shape)
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert lipschitz_bound(model, shape) == pytest.approx(bound_before, rel=1e-12)
    assert lipschitz_bound(model, shape) <= 1 + 1e-5


# --- AOL ----------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 10), n=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_aol_linear_is_1_lipschitz(m: int, n: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = AOLLinear(n, m).double()
    with torch.no_grad():
        layer.parametrizations.weight.original.normal_()
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) <= 1 + 1e-12


def test_aol_zero_columns_give_no_nan() -> None:
    layer = AOLLinear(4, 3)
    with torch.no_grad():
        layer.parametrizations.weight.original[:, 1] = 0
    layer(torch.randn(2, 4)).sum().backward()
    assert torch.isfinite(layer.weight).all()
    assert torch.isfinite(layer.parametrizations.weight.original.grad).all()
    assert torch.all(layer.weight[:, 1] == 0)


def test_aol_conv_scales_match_the_dense_gram() -> None:
    # for a 1x1 kernel the autocorrelation is W^T W itself
    w = torch.randn(5, 3, 1, 1, dtype=torch.float64)
    m = w[:, :, 0, 0]
    torch.testing.assert_close(aol_conv_scales(w)[0], (m.T @ m).abs().sum(1).rsqrt())


@pytest.mark.parametrize(
    "config",
    [
        dict(padding=1),
        dict(padding=0, stride=2),
        dict(padding=3, dilation=2, groups=2),
        dict(padding=1, padding_mode="circular"),
        dict(padding="same", padding_mode="circular"),
    ],
)
def test_aol_conv_is_1_lipschitz(config: dict[str, object]) -> None:
    torch.manual_seed(0)
    conv = AOLConv2d(4, 6, 3, **config).double()  # type: ignore[arg-type]
    with torch.no_grad():
        conv.parametrizations.weight.original.normal_()
    for size in (3, 7):
        exact = dense_operator_norm(lambda z, c=conv: c(z) - c(torch.zeros_like(z)), (4, size, size))
        assert exact <= 1 + 1e-9


def test_aol_conv_refuses_padding_that_breaks_the_theorem() -> None:
    with pytest.raises(ValueError, match="reflect"):
        AOLConv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="circular"):
        AOLConv2d(2, 2, 3, padding=2, padding_mode="circular")


# --- BatchCentering -----------------------------------------------------------------------


def test_batch_centering_train_and_eval() -> None:
    layer = BatchCentering(3, momentum=0.5)
    x = torch.randn(8, 3, 4, 4) + torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    y = layer(x)
    # float32, n = 128 entries a channel summed in any order: |fl(mean x) - mean x| <= gamma_n mean|x|,
    # x - fl(mean x) rounds by u |x - mean|, the mean of y adds gamma_n mean|y| (the zero bias nothing):
    # |fl(mean y)| <= (3 n + 2) u mean|x| to first order (Higham 2002, section 3.1); 1.01 covers the rest
    n, u = x[:, 0].numel(), 2.0**-24
    assert bool((y.mean(dim=(0, 2, 3)).abs() <= (3 * n + 2) * u * x.abs().mean(dim=(0, 2, 3)) * 1.01).all())
    torch.testing.assert_close(layer.running_mean, 0.5 * x.mean(dim=(0, 2, 3)))
    layer.eval()
    torch.testing.assert_close(layer(x), x - layer.running_mean.view(1, 3, 1, 1))
    assert layer.lipschitz_bound() == 1.0


def test_batch_centering_training_map_is_1_lipschitz_on_batches() -> None:
    layer = BatchCentering(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
        assert (layer(a) - layer(b)).norm() <= (a - b).norm() * (1 + 1e-6)


def test_batch_centering_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="expects input"):
        BatchCentering(3)(torch.randn(2, 4))


def test_layers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BjorckLinear(3, 3, train_iterations=0)
    with pytest.raises(ValueError):
        BjorckLinear(3, 3, order=0)
    with pytest.raises(ValueError):
        BjorckConv2d(2, 2, 3, padding_mode="mirror")


# --- small_cnn ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (3, 32, 32)),
        (dict(in_channels=1, input_size=28, conv="aol"), (1, 28, 28)),
        (dict(in_channels=1, input_size=28, pool="invertible", width=4), (1, 28, 28)),
    ],
)
def test_small_cnn_shapes_head_and_bound(kwargs: dict[str, object], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create("small_cnn", **kwargs).eval()
    assert isinstance(model[-1], nn.Linear) and model[-1].out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)
    body, head = split_head(model)
    assert head is model[-1] and len(body) == len(model) - 1
    bound = model.lipschitz_bound(shape)
    product = math.prod(
        m.lipschitz_bound(s) if hasattr(m, "lipschitz_bound") else 1.0 for m, s in _child_shapes(model, shape)
    )
    assert bound == pytest.approx(product, rel=1e-12)
    assert bound <= 1 + 1e-5
    assert lipschitz_bound(model, shape) == pytest.approx(bound, rel=1e-12)


def _child_shapes(model: nn.Sequential, shape: tuple[int, ...]) -> list[tuple[nn.Module, tuple[int, ...]]]:
    out, x = [], torch.zeros(1, *shape)
    with torch.no_grad():
        for child in model:
            out.append((child, tuple(x.shape[1:])))
            x = child(x)
    return out


def test_small_cnn_rejects_bad_arguments() -> None:
    bad = (dict(conv="spectral"), dict(pool="max"), dict(input_size=30), dict(width=3), dict(num_classes=1))
    for kwargs in bad:
        with pytest.raises(ValueError):
            create("small_cnn", **kwargs)


def _reference_bjorck(w: torch.Tensor, iterations: int, order: int) -> torch.Tensor:
    """The Björck iteration written out on the matrix, from the same Gram-iteration pre-scaling."""
    wide = w.shape[-2] <= w.shape[-1]
    gram = w @ w.mT if wide else w.mT @ w
    w = w / gram_norm_bound(gram, 2).sqrt()[..., None, None]
    eye = torch.eye(gram.shape[-1], dtype=w.dtype)
    for _ in range(iterations):
        residual = eye - (w @ w.mT if wide else w.mT @ w)
        powers = [torch.linalg.matrix_power(residual, i) for i in range(order + 1)]
        terms = [math.comb(2 * i, i) / 4**i * p for i, p in enumerate(powers)]
        poly = sum(terms[1:], terms[0])
        w = poly @ w if wide else w @ poly
    return w


# (8, 8), (7, 9), (9, 7) and (2, 6, 8) take the iteration on the matrix, (4, 9) and (9, 4) the Gram-space one
@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (9, 7), (2, 6, 8), (4, 9), (9, 4)])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_bjorck_both_schedules_are_the_bjorck_iteration(shape: tuple[int, ...], order: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for iterations in (1, 2, 4):
        got = bjorck_orthonormalize(w, iterations, order=order)
        torch.testing.assert_close(got, _reference_bjorck(w, iterations, order), atol=1e-11, rtol=0)


@pytest.mark.parametrize("shape", [(12, 12), (10, 14), (14, 10)])
def test_bjorck_direct_schedule_stops_at_the_tolerance(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s = _svd(bjorck_orthonormalize(w, 200, order=2, tol=1e-12))
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-12, rtol=0)


# --- functional attach --------------------------------------------------------------------


def _attached_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    return [
        ("aol-linear", aol(nn.Linear(6, 4)), (6,)),
        ("aol-conv", aol(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)), (4, 6, 6)),
        ("bjorck-linear", bjorck(nn.Linear(5, 7)), (5,)),
        ("bjorck-conv", bjorck(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")), (2, 5, 5)),
        ("orthogonal-linear", orthogonal(nn.Linear(6, 3)), (6,)),
    ]


def test_attach_constrains_the_given_module_and_keeps_its_raw_weight() -> None:
    torch.manual_seed(0)
    linear, conv = nn.Linear(6, 4), nn.Conv2d(4, 6, 3, padding=1, groups=2)
    raw_linear, raw_conv = linear.weight.detach().clone(), conv.weight.detach().clone()
    assert aol(linear) is linear and bjorck(conv) is conv
    assert type(linear).__mro__[1] is nn.Linear and type(conv).__mro__[1] is nn.Conv2d
    assert torch.equal(linear.parametrizations.weight.original, raw_linear)
    assert torch.equal(conv.parametrizations.weight.original, raw_conv)
    assert isinstance(linear.parametrizations.weight[0], AOLRescaling)
    orthonormal = conv.parametrizations.weight[0]
    assert isinstance(orthonormal, BjorckOrthonormal) and orthonormal.groups == 2
    # the scale 1 / sqrt(C) of the patch multiplicity, as BjorckConv2d's
    assert orthonormal.scale == 1.0 / math.sqrt(patch_multiplicity((3, 3), (1, 1), (1, 1), (1, 1), "zeros"))
    conv.eval()
    with torch.no_grad():
        # in eval mode each group's reshaped kernel is the scaled polar factor: singular values sqrt(1/9)
        groups = conv.weight.reshape(2, 3, -1).double()
        torch.testing.assert_close(
            torch.linalg.svdvals(groups), torch.full((2, 3), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-6
        )
    dense = orthogonal(nn.Linear(6, 3))
    assert isinstance(dense.parametrizations.weight[-1], EvalCache)
    with torch.no_grad():
        torch.testing.assert_close(dense.weight @ dense.weight.T, torch.eye(3), rtol=0, atol=1e-6)
    # removable, like torch's own parametrizations
    parametrize.remove_parametrizations(linear, "weight")
    assert not parametrize.is_parametrized(linear)


@pytest.mark.parametrize(
    ("make", "attach"),
    [
        (lambda: AOLLinear(6, 4), lambda m: aol(m)),
        (lambda: AOLConv2d(4, 6, 3, stride=2, padding=1, groups=2), lambda m: aol(m)),
        (lambda: BjorckLinear(7, 5), lambda m: bjorck(m)),
        (lambda: BjorckConv2d(2, 4, 3, padding=1, padding_mode="circular"), lambda m: bjorck(m)),
        (lambda: OrthogonalLinear(6, 3), lambda m: orthogonal(m)),
    ],
)
def test_layer_classes_are_the_attach_on_their_base(make: object, attach: object) -> None:
    torch.manual_seed(0)
    layer: nn.Module = make()  # type: ignore[operator]
    # a plain torch layer of the same geometry, constrained by the attach, then given the same raw weight
    plain = frozen_conv2d(layer) if isinstance(layer, nn.Conv2d) else frozen_linear(layer)  # type: ignore[arg-type]
    attached: nn.Module = attach(plain)  # type: ignore[operator]
    attached.load_state_dict(layer.state_dict())
    chain, own = attached.parametrizations.weight, layer.parametrizations.weight
    assert [type(p) for p in chain] == [type(p) for p in own]
    for mode in (True, False):
        layer.train(mode)
        attached.train(mode)
        with torch.no_grad():
            assert torch.equal(attached.weight, layer.weight)


def test_attach_refuses_what_it_cannot_constrain() -> None:
    with pytest.raises(ValueError, match="reflect"):
        aol(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="circular"):
        aol(nn.Conv2d(2, 2, 3, padding=2, padding_mode="circular"))
    with pytest.raises(TypeError, match="Conv1d"):
        aol(nn.Conv1d(2, 2, 3))  # type: ignore[type-var]
    with pytest.raises(TypeError, match="Conv1d"):
        bjorck(nn.Conv1d(2, 2, 3))  # type: ignore[type-var]
    with pytest.raises(TypeError, match="Conv2d"):
        orthogonal(nn.Conv2d(2, 2, 3))  # type: ignore[arg-type]

    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    for attach in (aol, bjorck, orthogonal):
        with pytest.raises(TypeError, match="redefines"):
            attach(Doubled(3, 3))


@pytest.mark.parametrize("index", range(5))
def test_attached_modules_are_bounded_and_export_to_plain_layers(index: int) -> None:
    torch.manual_seed(index)
    name, module, shape = _attached_cases()[index]
    model = nn.Sequential(module).eval()
    # certify's rule for nn.Conv2d / nn.Linear reads the parametrized weight: the guarantee holds
    bound = min(lipschitz_bound(model, shape), lipschitz_bound(model))
    assert bound <= 1 + 1e-6, name
    exported = lipnet.export(model)
    frozen = exported[0]
    assert type(frozen) is type(module).__mro__[1] and not parametrize.is_parametrized(frozen), name
    with torch.no_grad():
        assert torch.equal(frozen.weight, module.weight)
        x = torch.randn((4, *shape))
        assert torch.equal(exported(x), model(x))
    assert lipschitz_bound(exported, shape) == pytest.approx(lipschitz_bound(model, shape), rel=1e-12)


def test_layer_export_gives_the_eval_form_and_keeps_the_mode() -> None:
    torch.manual_seed(0)
    layer = BjorckLinear(6, 4).train()
    frozen = layer.export()
    assert layer.training and type(frozen) is nn.Linear
    layer.eval()
    with torch.no_grad():
        assert torch.equal(frozen.weight, layer.weight)  # the converged eval weight, not 3 train steps
        assert torch.equal(frozen.bias, layer.bias)
    conv = AOLConv2d(2, 4, 3, stride=2, padding=1, dilation=1, padding_mode="circular")
    plain = conv.export()
    assert type(plain) is nn.Conv2d
    for key in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(plain, key) == getattr(conv, key), key
    assert isinstance(conv.parametrizations.weight[0], AOLConvRescaling)


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4])
def test_gram_norm_bound_gradient_is_that_of_the_formula(steps: int) -> None:
    # the normalisations are constants of the graph (the bound is homogeneous of degree 1 in each
    # rescaled power): value and gradient are those of ||G^(2^t)||_F^(1/2^t) computed directly
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    w.requires_grad_(True)
    (grad,) = torch.autograd.grad(gram_norm_bound(w @ w.T, steps), w)
    direct = torch.linalg.matrix_norm(torch.linalg.matrix_power(w @ w.T, 2**steps)) ** (1 / 2**steps)
    (expected,) = torch.autograd.grad(direct, w)
    torch.testing.assert_close(gram_norm_bound(w @ w.T, steps), direct, atol=0, rtol=1e-13)
    torch.testing.assert_close(grad, expected, atol=0, rtol=1e-11)


@pytest.mark.parametrize("shape", [(4, 8), (8, 4), (4, 4), (3, 20), (20, 3)])
@pytest.mark.parametrize("fill", ["equal_rows", "zero_row"])
def test_bjorck_eval_weight_of_a_rank_deficient_raw_weight_is_finite(
    shape: tuple[int, int], fill: str
) -> None:
    # The eval iteration runs up to 100 float64 steps that never reach the tolerance for a rank-deficient
    # matrix; a Gram-space recursion amplifies the rounding on the null space by 1.875 per step (NaN
    # after 100 steps), the direct iteration stays in the row space: a partial isometry, bounded by 1.
    from lipnet.layers import BjorckLinear

    layer = BjorckLinear(shape[1], shape[0])
    with torch.no_grad():
        raw = layer.parametrizations.weight.original
        if fill == "equal_rows":
            raw.fill_(1.0)
        else:
            raw[0].zero_()
    layer.eval()
    weight = layer.weight.double()
    assert torch.isfinite(weight).all()
    singular = torch.linalg.svdvals(weight)
    assert singular.max() <= 1 + 1e-6
    assert singular.max() >= 1 - 1e-6  # the range of the raw weight is orthonormalised
    bound = layer.lipschitz_bound()
    assert float(singular.max()) <= bound <= 1 + 1e-6
