"""Tests of the convolution, pooling and BatchNorm rules (certify.rules.conv, .conv_symbol, .pooling,
.folding): the bounds hold against exact dense norms, and are tight where claimed."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import certify.rules.conv as conv_rules
import certify.rules.conv_symbol as conv_symbol
from certify.bounds import module_bound
from certify.contract import FLOAT64_SLACK, UnboundableModuleError
from certify.exact import dense_matrix, jacobian_spectral_norm
from certify.rules.conv import conv_module_bound, conv_operator_bound
from certify.rules.folding import batch_norm_bound
from certify.rules.pooling import (
    adaptive_avg_pool_bound,
    adaptive_max_pool_bound,
    avg_pool_bound,
    lp_pool_bound,
    max_pool_bound,
)

MODES = ("zeros", "reflect", "replicate", "circular")


def exact_norm(fn: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> float:
    """sigma_max of the linear part of ``fn`` by SVD, without any slack."""
    return torch.linalg.matrix_norm(dense_matrix(fn, shape), ord=2).item()


def conv_exact(conv: nn.Module, shape: tuple[int, ...]) -> float:
    layer = copy.deepcopy(conv).double()
    return exact_norm(lambda x: layer._conv_forward(x, layer.weight, None), shape)


def module_exact(module: nn.Module, shape: tuple[int, ...]) -> float:
    layer = copy.deepcopy(module).double()
    return exact_norm(layer, shape)


def single_pixel_quotient(pool: nn.Module, shape: tuple[int, ...]) -> float:
    """``max_i ||f(e_i) - f(0)||``: a lower bound of the Lipschitz constant of ``pool``."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        diff = pool(basis) - pool(torch.zeros((1, *shape), dtype=torch.float64))
    return diff.reshape(n, -1).norm(dim=1).max().item()


def seeded_conv(cls: type[nn.Module], seed: int, *args: object, **kwargs: object) -> nn.Module:
    conv = cls(*args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / math.sqrt(conv.weight[0].numel()))
    return conv


# ---------------------------------------------------------------------------------------------
# (a) soundness against exact norms, every configuration


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    choices = [st.integers(0, 3), st.just("valid")] + ([st.just("same")] if max(stride) == 1 else [])
    padding = draw(st.one_of(*choices))
    mode = draw(st.sampled_from(MODES))
    size = tuple(draw(st.integers(2, 9)) for _ in range(nd))
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    conv = seeded_conv(
        cls,
        draw(st.integers(0, 2**16)),
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        dilation,
        groups,
        padding_mode=mode,
    )
    shape = (c_in, *size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conv(torch.zeros((1, *shape)))
    except RuntimeError:
        assume(False)
    return conv, shape


@settings(max_examples=100, deadline=None)
@given(case=conv_cases())
def test_conv_bounds_hold_against_the_exact_norm(case: tuple[nn.Module, tuple[int, ...]]) -> None:
    conv, shape = case
    exact = conv_exact(conv, shape)
    sized = conv_module_bound(conv, shape)
    assert exact <= sized <= exact * (1 + 1e-8)  # small layers: the exact dense norm
    assert conv_module_bound(conv) >= exact
    with pytest.MonkeyPatch.context() as patch:  # the structured (grid / product) path
        patch.setattr(conv_rules, "_DENSE_ENTRIES", 0)
        assert conv_module_bound(conv, shape) >= exact


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_all_sizes_bound_holds_at_every_size_tried(mode: str, stride: int) -> None:
    conv = seeded_conv(
        nn.Conv2d, 7, 2, 3, 3, stride=stride, padding=2 if mode == "circular" else 1, padding_mode=mode
    )
    bound = conv_module_bound(conv)
    for n in (2, 3, 4, 5, 7, 10, 13):
        assert conv_exact(conv, (2, n, n)) <= bound


def test_circular_convolution_is_exact_on_the_dft_grid() -> None:
    for stride, n in ((1, 8), (2, 8), (2, 12)):
        conv = seeded_conv(nn.Conv2d, stride + n, 2, 3, 3, stride=stride, padding=1, padding_mode="circular")
        exact = conv_exact(conv, (2, n, n))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(conv_rules, "_DENSE_ENTRIES", 0)
            assert exact <= conv_module_bound(conv, (2, n, n)) <= exact * (1 + 2e-6)


# ---------------------------------------------------------------------------------------------
# The certified sup over the continuous torus


@settings(max_examples=25, deadline=None)
@given(c_out=st.integers(1, 3), c_in=st.integers(1, 3), taps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_continuum_bound_brackets_a_fine_frequency_grid(c_out: int, c_in: int, taps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn((c_out, c_in, taps), generator=gen, dtype=torch.float64)
    freqs = 2 * math.pi * torch.arange(4096, dtype=torch.float64) / 4096
    phases = torch.exp(-1j * freqs[:, None] * torch.arange(taps, dtype=torch.float64))
    symbol = torch.einsum("pq,ocq->poc", phases, weight.to(torch.complex128))
    grid_max = torch.linalg.matrix_norm(symbol, ord=2).max().item()
    # Between grid points the sup exceeds the grid max by at most 1/sqrt(1 - (taps pi / 4096)^2 / 4).
    assert grid_max <= conv_operator_bound(weight) <= grid_max * (1 + conv_symbol._RTOL) * (1 + 1e-5)


def test_continuum_bound_in_two_dimensions_brackets_a_fine_grid() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn((2, 2, 3, 3), generator=gen, dtype=torch.float64)
    symbol = torch.fft.fft2(weight, s=(256, 256)).permute(2, 3, 0, 1)
    grid_max = torch.linalg.matrix_norm(symbol, ord=2).max().item()
    assert grid_max <= conv_operator_bound(weight, padding=1) <= grid_max * (1 + conv_symbol._RTOL) * 1.001


def _orthogonal_conv_kernel(channels: int, seed: int) -> Tensor:
    """2x2 kernel of ``(P + (I - P) z1)(Q + (I - Q) z2)``: a unitary symbol at every frequency."""
    gen = torch.Generator().manual_seed(seed)
    projections = []
    for _ in range(2):
        basis = torch.linalg.qr(torch.randn((channels, channels // 2), generator=gen, dtype=torch.float64))[0]
        projections.append(basis @ basis.T)
    p, q = projections
    eye = torch.eye(channels, dtype=torch.float64)
    taps = [[p @ q, p @ (eye - q)], [(eye - p) @ q, (eye - p) @ (eye - q)]]
    return torch.stack([torch.stack(row, dim=-1) for row in taps], dim=-2)


def test_an_orthogonal_convolution_is_bounded_by_one() -> None:
    kernel = _orthogonal_conv_kernel(6, 0)
    assert 1.0 <= conv_operator_bound(kernel, padding=1) <= 1 + 1e-8
    noisy = kernel + 1e-6 * torch.randn(
        kernel.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    bound = conv_operator_bound(noisy, padding=1)
    assert conv_exact(_conv_with(noisy, padding=1), (6, 8, 8)) <= bound <= 1 + 1e-4


def _conv_with(weight: Tensor, groups: int = 1, **kwargs: object) -> nn.Conv2d:
    out, per_group = weight.shape[:2]
    conv = nn.Conv2d(per_group * groups, out, tuple(weight.shape[2:]), groups=groups, bias=False, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def _flat_topped_kernel(channels: int, noise: float, seed: int) -> Tensor:
    """3x3 kernel of ``diag(s) Q(w)`` plus noise: a symbol whose top eigenvalue is nearly flat.

    ``Q`` is the product of two 2x2 orthogonal convolutions (unitary at every frequency), so the
    Gram symbol ``Q^H diag(s^2) Q`` has the eigenvalues ``s^2`` at every frequency while its
    Fourier coefficients are large (the global and curvature bounds are loose), and the top
    eigenvalues are nearly equal (a power iteration ranks frequencies badly): the shape of a
    trained CPL kernel, whose norm is pushed up at every frequency.
    """
    first, second = _orthogonal_conv_kernel(channels, seed), _orthogonal_conv_kernel(channels, seed + 100)
    product = torch.zeros((channels, channels, 3, 3), dtype=torch.float64)
    for i, j, k, m in itertools.product(range(2), repeat=4):
        product[:, :, i + k, j + m] += first[:, :, i, j] @ second[:, :, k, m]
    scale = 1 - 0.01 * torch.arange(channels, dtype=torch.float64) / channels
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = noise * torch.randn(product.shape, generator=gen, dtype=torch.float64)
    return scale[:, None, None, None] * product + noisy


def test_a_flat_topped_symbol_is_certified_within_three_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _flat_topped_kernel(16, 0.005, 0)
    # A 3x3 kernel starts from half of a 13 x 13 grid (85 cells) and, with the reference at the
    # largest computed eigenvalue, every cell of the third level (sigma^2 / 4 < 2 _RTOL) retires:
    # at most 85 (1 + 9 + 81) cells are tested. Before, a stale reference (a power-iteration guess)
    # had 4 million cells tested (two minutes).
    limit, tested = 85 * 91, 0
    below = conv_symbol._Frequencies.below

    def counted(self: conv_symbol._Frequencies, mu: Tensor) -> Tensor:
        nonlocal tested
        tested += len(self)
        if tested > limit:
            raise AssertionError(f"more than {limit} cells tested")
        return below(self, mu)

    with monkeypatch.context() as patch:
        patch.setattr(conv_symbol._Frequencies, "below", counted)
        bound = conv_operator_bound(kernel, padding=1)
    symbol = torch.fft.fft2(kernel, s=(128, 128)).permute(2, 3, 0, 1)
    grid_max = torch.linalg.matrix_norm(symbol, ord=2).max().item()
    # Between grid points the sup exceeds the grid max by at most 1/sqrt(1 - (4 pi / 128)^2 / 4).
    assert grid_max <= bound <= grid_max * (1 + conv_symbol._RTOL) * 1.0013
    conv = _conv_with(kernel, padding=1)
    for n in (3, 5, 7):
        assert conv_exact(conv, (16, n, n)) <= bound


def test_the_refinement_stops_at_its_budget_with_a_sound_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = _flat_topped_kernel(16, 0.005, 0)
    symbol = torch.fft.fft2(kernel, s=(128, 128)).permute(2, 3, 0, 1)
    grid_max = torch.linalg.matrix_norm(symbol, ord=2).max().item()
    monkeypatch.setattr(conv_symbol, "_MIN_REFINED", 700)
    monkeypatch.setattr(conv_symbol, "_CONTINUUM_WORK", 0)  # room for the first level only
    bound = conv_operator_bound(kernel, padding=1)
    # The open cells of the second level (sigma = 4 pi / 39) keep their own bound: at most
    # 1 / (1 - sigma^2 / 4) = 1.026 times the largest eigenvalue computed, on sigma_max^2.
    assert grid_max <= bound <= grid_max * math.sqrt(1 / (1 - (4 * math.pi / 39) ** 2 / 4)) * (1 + 1e-4)


# ---------------------------------------------------------------------------------------------
# (c) regression traps: tight where a cruder bound (or a library's claim) is wrong


def _reshaped_kernel_conv(k: int, padding: int, mode: str) -> nn.Conv2d:
    """deel-torchlip's SpectralConv2d with an orthogonal reshaped kernel, exported to nn.Conv2d."""
    from deel.torchlip import SpectralConv2d

    torch.manual_seed(0)
    return SpectralConv2d(1, k * k, k, padding=padding, padding_mode=mode).vanilla_export()


@pytest.mark.parametrize(
    ("k", "padding", "mode", "true_norm"),
    [(3, 1, "reflect", 4 / 3), (5, 2, "reflect", 1.2), (5, 2, "replicate", 1.2), (3, 2, "circular", 5 / 3)],
)
def test_reshaped_kernel_traps_are_bounded_tightly(k: int, padding: int, mode: str, true_norm: float) -> None:
    conv = _reshaped_kernel_conv(k, padding, mode)
    shape = (1, 8, 8)
    exact = conv_exact(conv, shape)
    assert exact == pytest.approx(true_norm, rel=1e-4)  # the layer claims 1
    assert exact <= conv_module_bound(conv, shape) <= 1.01 * exact
    assert conv_module_bound(conv) >= exact
    zero_padded = _conv_with(conv.weight.detach(), padding=padding)
    assert conv_exact(zero_padded, shape) <= conv_module_bound(zero_padded) <= 1 + 1e-5


def test_the_reflect_trap_is_exact_on_a_large_input() -> None:
    # 1024 x 9216: past the dense path, so the banded Gram certificate (item 7); the product of
    # item 5 gave 2.0 here.
    conv = _reshaped_kernel_conv(3, 1, "reflect")
    shape = (1, 32, 32)
    exact = conv_exact(conv, shape)
    assert exact == pytest.approx(4 / 3, rel=1e-4)
    assert exact <= conv_module_bound(conv, shape) <= exact * (1 + 1e-8)


def _gram_exact(module: nn.Module, shape: tuple[int, ...]) -> float:
    """sigma_max of the layer's dense matrix, from the Gram matrix on its smaller side (faster than SVD)."""
    layer = copy.deepcopy(module).double()
    matrix = dense_matrix(lambda x: layer._conv_forward(x, layer.weight, None), shape)
    gram = matrix.T @ matrix if matrix.shape[1] <= matrix.shape[0] else matrix @ matrix.T
    return math.sqrt(torch.linalg.eigvalsh(gram)[-1].item())


def test_a_reflect_padded_network_is_bounded_within_one_percent_of_its_exact_layers() -> None:
    from certify.bounds import lipschitz_bound

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"),
    ).eval()
    shapes = [(3, 24, 24), (8, 24, 24), (8, 12, 12)]
    product = math.prod(_gram_exact(conv, shape) for conv, shape in zip(model[::2], shapes, strict=True))
    # The first two layers are past the dense path (8 M and 5 M entries); each bound is within
    # 1e-8 of its exact norm, so the product is too (items 4-5 gave 5.7 times the product).
    assert product <= lipschitz_bound(model, shapes[0]) <= product * (1 + 1e-7)


def test_circular_padding_of_a_one_by_one_kernel() -> None:
    conv = _conv_with(torch.ones((1, 1, 1, 1)), padding=1, padding_mode="circular")
    shape = (1, 6, 6)
    exact = conv_exact(conv, shape)
    assert exact == pytest.approx(2.0, rel=1e-12)  # a corner pixel is copied into 4 places
    assert exact <= conv_module_bound(conv, shape) <= 1.01 * exact
    # Over every size the worst is a 1 x 1 input, copied into all 9 pixels: norm 3.
    single = conv_exact(conv, (1, 1, 1))
    assert single == pytest.approx(3.0, rel=1e-12)
    assert single <= conv_module_bound(conv) <= 1.01 * single


def test_scaled_average_pooling_with_ceil_mode_reaches_two() -> None:
    from deel.torchlip import ScaledAvgPool2d

    pool = ScaledAvgPool2d(2, ceil_mode=True)
    shape = (1, 5, 5)
    exact = module_exact(pool, shape)
    assert exact == pytest.approx(2.0, rel=1e-12)  # the 1-pixel corner window, scaled by 2
    scale = float(pool.scalingFactor)
    sized = scale * avg_pool_bound((2, 2), 2, 0, ceil_mode=True, spatial_shape=(5, 5))
    every = scale * avg_pool_bound((2, 2), 2, 0, ceil_mode=True)
    assert exact <= sized <= 1.01 * exact
    assert exact <= every <= 1.01 * exact
    assert avg_pool_bound((2, 2), 2, 0, spatial_shape=(4, 4)) == pytest.approx(0.5, rel=1e-8)


def test_a_grouped_conv_is_bounded_by_its_largest_group() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.zeros((4, 2, 3, 3), dtype=torch.float64)
    weight[:2, :, 1, 1] = 2 * torch.linalg.qr(torch.randn((2, 2), generator=gen, dtype=torch.float64))[0]
    weight[2:] = 0.1 * torch.randn((2, 2, 3, 3), generator=gen, dtype=torch.float64)
    conv = _conv_with(weight, padding=1, groups=2)
    exact = conv_exact(conv, (4, 6, 6))
    assert exact == pytest.approx(2.0, rel=1e-6)  # 2 Q rounded to float32
    assert exact <= conv_module_bound(conv, (4, 6, 6)) <= 1.01 * exact
    assert exact <= conv_module_bound(conv) <= 1.01 * exact
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_rules, "_DENSE_ENTRIES", 0)
        assert exact <= conv_module_bound(conv, (4, 6, 6)) <= 1.01 * exact


def test_all_sizes_zero_padding_bound_is_within_one_percent_at_a_large_size() -> None:
    conv = seeded_conv(nn.Conv2d, 11, 1, 1, 3, padding=1)
    exact = conv_exact(conv, (1, 28, 28))
    assert exact <= conv_module_bound(conv) <= 1.01 * exact


def test_strided_bound_uses_the_polyphase_kernel() -> None:
    conv = seeded_conv(nn.Conv2d, 13, 2, 4, 3, stride=2, padding=1)
    exact = conv_exact(conv, (2, 32, 32))
    bound = conv_module_bound(conv)
    assert exact <= bound <= 1.01 * exact
    stride_one = conv_operator_bound(conv.weight, padding=1)
    assert bound < 0.9 * stride_one  # bounding by the stride-1 convolution would be much looser


# ---------------------------------------------------------------------------------------------
# (d) pooling and BatchNorm

AVG_CASES = [
    # kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
    (2, 2, 0, False, True, None),
    (3, 2, 1, False, True, None),
    (3, 2, 1, False, False, None),
    (3, 1, 1, False, False, None),
    (3, 2, 1, True, True, None),
    (3, 2, 0, True, False, None),
    (4, 3, 2, True, False, None),
    (2, 2, 1, True, True, 3),
    (3, 1, 1, False, True, 2),
]


@pytest.mark.parametrize(("k", "s", "p", "ceil", "cip", "override"), AVG_CASES)
def test_average_pooling_is_exact_per_size_and_holds_for_every_size(k, s, p, ceil, cip, override) -> None:
    every = avg_pool_bound((k, k), s, p, ceil_mode=ceil, count_include_pad=cip, divisor_override=override)
    for n in range(max(1, k - 2 * p), 12):
        pool = nn.AvgPool2d(k, s, p, ceil, cip, override)
        shape = (1, n, n)
        exact = module_exact(pool, shape)
        sized = avg_pool_bound(
            (k, k),
            s,
            p,
            ceil_mode=ceil,
            count_include_pad=cip,
            divisor_override=override,
            spatial_shape=(n, n),
        )
        assert exact <= sized <= exact * (1 + 1e-8)
        assert exact <= every
        assert module_bound(pool, shape) == pytest.approx(sized, rel=1e-12)


def test_average_pooling_over_every_size_is_close_to_the_largest_exact_norm() -> None:
    # count_include_pad=False re-weights the border windows: bounded by the Collatz-Wielandt route.
    every = avg_pool_bound((3,), 2, 1, ceil_mode=True, count_include_pad=False)
    worst = max(module_exact(nn.AvgPool1d(3, 2, 1, True, False), (1, n)) for n in range(1, 60))
    assert worst <= every <= 1.005 * worst


@pytest.mark.parametrize(
    ("k", "s", "p", "d", "ceil"),
    [(2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False), (2, 1, 0, 1, False), (4, 3, 2, 1, True)],
)
def test_max_pooling_bound_is_the_root_of_the_window_overlap(
    k: int, s: int, p: int, d: int, ceil: bool
) -> None:
    every = max_pool_bound((k, k), s, p, d, ceil_mode=ceil)
    gen = torch.Generator().manual_seed(0)
    for n in (4, 5, 7):
        pool = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
        shape = (1, n, n)
        sized = module_bound(pool, shape)
        lower = single_pixel_quotient(pool, shape)
        assert lower <= sized <= lower * (1 + 1e-8)
        assert sized <= every
        for _ in range(3):
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            assert jacobian_spectral_norm(pool, x) <= sized


def max_overlap(k: int, s: int, d: int) -> int:
    counts = [0] * s
    for j in range(k):
        counts[(j * d) % s] += 1
    return max(counts)


def test_max_pooling_over_every_size_matches_the_infinite_grid_overlap() -> None:
    for k, s, d in ((3, 2, 1), (3, 2, 2), (4, 3, 1), (2, 1, 2)):
        want = float(max_overlap(k, s, d))  # sqrt of the product of the two axes' overlaps
        assert max_pool_bound((k, k), s, 0, d) == pytest.approx(want, rel=1e-8)


def test_lp_pooling_with_partial_windows_is_rescaled_and_bounded() -> None:
    pool = nn.LPPool2d(2, 2, 2, ceil_mode=True)
    shape = (1, 5, 5)
    lower = single_pixel_quotient(pool.double(), shape)
    assert lower == pytest.approx(2.0, rel=1e-12)  # torch scales a 1-pixel window by sqrt(4 / 1)
    assert lower <= module_bound(pool, shape) <= lower * (1 + 1e-8)
    assert lp_pool_bound(2, (2, 2), 2, ceil_mode=True) >= lower
    full = nn.LPPool2d(2, 3, 2)
    assert module_bound(full, (1, 7, 7)) == pytest.approx(2.0, rel=1e-8)  # 4 windows share a pixel
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        assert jacobian_spectral_norm(pool, x) <= module_bound(pool, shape)


def test_lp_pooling_with_other_norms() -> None:
    assert lp_pool_bound(math.inf, (3, 3), 2) == pytest.approx(max_pool_bound((3, 3), 2), rel=1e-12)
    with pytest.raises(ValueError, match="norm_type"):
        lp_pool_bound(3, (2, 2), 2)


def test_adaptive_pooling_needs_the_input_size() -> None:
    for n, out in ((7, 3), (6, 4), (3, 7)):
        shape = (2, n, n + 1)
        avg = nn.AdaptiveAvgPool2d((out, None))
        exact = module_exact(avg, shape)
        assert exact <= module_bound(avg, shape) <= exact * (1 + 1e-8)
        maxpool = nn.AdaptiveMaxPool2d(out)
        lower = single_pixel_quotient(maxpool, shape)
        assert lower <= adaptive_max_pool_bound((out, out), shape) <= lower * (1 + 1e-8)
    assert adaptive_avg_pool_bound((1, 1), (4, 4)) == pytest.approx(0.25, rel=1e-8)
    with pytest.raises(ValueError, match="input_shape"):
        module_bound(nn.AdaptiveAvgPool2d(1))


def test_batch_norm_in_eval_mode_is_the_largest_channel_scale() -> None:
    bn = nn.BatchNorm2d(3, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([1.0, 3.0, 0.01]))
        bn.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
    bn.eval()
    gamma, var = bn.weight.detach().double(), bn.running_var.double()
    want = (gamma.abs() / torch.sqrt(var + 1e-3)).max().item()  # channel 2: 1 / sqrt(0.011)
    assert want == pytest.approx(1.0 / math.sqrt(0.011), rel=1e-6)
    assert batch_norm_bound(bn) == pytest.approx(want * (1 + FLOAT64_SLACK), rel=1e-14)
    exact = module_exact(bn, (3, 2, 2))
    assert exact <= module_bound(bn, (3, 2, 2)) <= exact * (1 + 1e-8)
    bn1 = nn.BatchNorm1d(4, affine=False).eval()
    assert batch_norm_bound(bn1) == pytest.approx(1 / math.sqrt(1 + 1e-5), rel=1e-8)


def test_batch_norm_without_fixed_statistics_is_refused() -> None:
    with pytest.raises(ValueError, match="eval"):
        batch_norm_bound(nn.BatchNorm2d(3).train())
    with pytest.raises(ValueError, match="track_running_stats"):
        batch_norm_bound(nn.BatchNorm2d(3, track_running_stats=False).eval())
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_var.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        batch_norm_bound(bn)


# ---------------------------------------------------------------------------------------------
# Registration and refusals


def test_plain_modules_use_these_bounds() -> None:
    conv = seeded_conv(nn.Conv1d, 3, 2, 3, 3, stride=2, padding=1)
    assert module_bound(conv, (2, 9)) == conv_module_bound(conv, (2, 9))
    pool = nn.AvgPool1d(3, 2, 1, count_include_pad=False)
    assert module_bound(pool) == pytest.approx(avg_pool_bound((3,), 2, 1, count_include_pad=False), rel=1e-12)


def test_a_subclass_that_changes_forward_is_refused() -> None:
    class Doubled(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    with pytest.raises(UnboundableModuleError, match="redefines forward"):
        conv_module_bound(Doubled(1, 1, 3))


def test_parametrized_weights_are_read_through_the_parametrization() -> None:
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return 3 * w

    conv = seeded_conv(nn.Conv2d, 4, 2, 2, 3, padding=1)
    before = conv_module_bound(conv, (2, 5, 5))
    parametrize.register_parametrization(conv, "weight", Scale())
    # 3 * w is rounded to float32 (relative 6e-8 per entry), hence the tolerance.
    assert conv_module_bound(conv, (2, 5, 5)) == pytest.approx(3 * before, rel=1e-6)


def test_forward_hooks_are_refused() -> None:
    conv = nn.Conv2d(1, 1, 3)
    conv.register_forward_hook(lambda module, args, out: 2 * out)
    with pytest.raises(ValueError, match="hooks"):
        conv_module_bound(conv)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stride": 2, "padding": "same"}, "same"),
        ({"padding": "full"}, "padding"),
        ({"padding_mode": "mirror"}, "padding_mode"),
        ({"groups": 3}, "groups"),
        ({"input_shape": (3, 8, 8)}, "channels"),
        ({"input_shape": (2, 1, 1)}, "smaller"),
        ({"input_shape": (2, 8)}, "input_shape"),
        ({"padding": 2, "padding_mode": "reflect", "input_shape": (2, 2, 2)}, "reflect"),
        ({"padding": 3, "padding_mode": "circular", "input_shape": (2, 2, 2)}, "circular"),
        ({"stride": 0}, "stride"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], match: str) -> None:
    weight = torch.randn((4, 2, 3, 3))
    with pytest.raises(ValueError, match=match):
        conv_operator_bound(weight, **kwargs)


def test_non_finite_weights_are_refused() -> None:
    weight = torch.randn((2, 2, 3, 3))
    weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv_operator_bound(weight)
    with pytest.raises(ValueError, match="kh, kw"):
        conv_operator_bound(torch.randn((2, 2, 3, 3, 3)))


@pytest.mark.parametrize(
    ("groups", "padding", "stride", "shape"),
    [
        (1, 0, 1, (8, 5, 6)),
        (2, 0, 1, (8, 5, 6)),
        (1, 1, 1, (8, 5, 6)),
        (2, 0, 2, (8, 5, 6)),
        (1, 2, 3, (8, 1, 1)),
    ],
)
def test_pointwise_convolutions_are_exact_without_the_dense_matrix(
    groups: int, padding: int, stride: int, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1x1 kernels skip the dense path (it cost seconds per training step in MTAN's normalisation);
    the last case reads only zero pads (norm 0)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1, stride=stride, padding=padding, groups=groups, bias=False).double()

    def refused(*args: object, **kwargs: object) -> float:
        raise AssertionError("the dense path was taken")

    monkeypatch.setattr(conv_rules, "dense_operator_norm", refused)
    bound = conv_module_bound(conv, shape)
    matrix = dense_matrix(conv, shape)
    exact = float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.abs().max() > 0 else 0.0
    assert exact <= bound <= exact * (1 + 1e-8)
