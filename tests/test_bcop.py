"""BCOPConv2d: orthogonal with circular padding once converged, 1-Lipschitz in every mode.

The exact checks build the operator's matrix in float64 (``certify.exact.dense_matrix``) and take
its singular values; the unconverged checks give the layer raw frames far from orthonormal and a
single Björck step, where the layer is no longer orthogonal but must stay a contraction.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from certify.exact import dense_matrix
from lipnet.layers import BCOPConv2d, bcop_kernel, get_layer_kind
from lipnet.layers.bjorck import BjorckLinear, bjorck_orthonormalize


def _norm(layer: nn.Module, shape: tuple[int, int, int]) -> float:
    """The float64 layer's operator norm on ``shape`` (largest singular value of its dense matrix)."""
    return torch.linalg.matrix_norm(dense_matrix(layer, shape), 2).item()


def _symbol_singular_values(kernel: Tensor, size: int) -> Tensor:
    """Singular values of the kernel's frequency matrices on a ``size x size`` grid (circular operator)."""
    spectrum = torch.fft.fft2(kernel.double(), s=(size, size))
    return torch.linalg.svdvals(spectrum.permute(2, 3, 0, 1))


# (in, out, kernel): square, in < out (1 -> 16 is the first layer of the Fashion-MNIST nets), in > out,
# 5x5, a non-square kernel, 1x1
CASES = [(4, 4, 3), (1, 6, 3), (3, 6, 3), (6, 3, 3), (4, 4, 5), (4, 5, (3, 5)), (5, 5, 1)]


@pytest.mark.parametrize(("c_in", "c_out", "k"), CASES)
def test_circular_eval_layer_is_orthogonal(c_in: int, c_out: int, k: int | tuple[int, int]) -> None:
    torch.manual_seed(0)
    size = 7
    layer = BCOPConv2d(c_in, c_out, k, padding="same", padding_mode="circular", bias=False).double().eval()
    kh, kw = layer.kernel_size
    assert layer.weight.shape == (c_out, c_in, kh, kw)
    shape = (c_in, size, size)
    matrix = dense_matrix(layer, shape)
    rows, cols = matrix.shape
    if rows >= cols:  # isometry
        assert torch.allclose(matrix.T @ matrix, torch.eye(cols, dtype=torch.float64), atol=1e-12)
    else:  # orthonormal rows
        assert torch.allclose(matrix @ matrix.T, torch.eye(rows, dtype=torch.float64), atol=1e-12)
    assert 1.0 <= layer.lipschitz_bound(shape) <= 1.0 + 1e-8
    assert 1.0 <= layer.lipschitz_bound() <= 1.0 + 1e-8


@pytest.mark.parametrize(("c_in", "c_out", "k"), CASES)
def test_unconverged_kernel_is_a_contraction(c_in: int, c_out: int, k: int | tuple[int, int]) -> None:
    # Raw frames far from orthonormal and one Björck step: singular values of the frames in (0, 1), the
    # projectors not idempotent; every frequency matrix must still have norm <= 1.
    torch.manual_seed(1)
    layer = BCOPConv2d(c_in, c_out, k, padding="same", train_iterations=1).double()
    with torch.no_grad():
        layer.frames.copy_(torch.randn_like(layer.frames) * torch.linspace(0.1, 3.0, layer.frames.shape[-1]))
    frames = bjorck_orthonormalize(layer.frames.detach(), 1, layer.parametrizations.weight[0].order)
    sv_frames = torch.linalg.svdvals(frames)
    assert sv_frames.max() <= 1 + 1e-12 and sv_frames.min() < 0.999  # really unconverged
    kernel = layer.weight.detach()
    symbol = _symbol_singular_values(kernel, 16)
    assert symbol.max() <= 1 + 1e-12
    assert symbol.min() < 0.99  # and not orthogonal
    shape = (c_in, 6, 6)
    assert _norm(layer, shape) <= layer.lipschitz_bound(shape) <= 1 + 1e-8


def test_zero_padding_strides_and_dilation_are_contractions() -> None:
    torch.manual_seed(2)
    for kwargs in ({"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2}, {"padding": 0}):
        layer = BCOPConv2d(3, 5, 3, bias=False, **kwargs).double().eval()
        shape = (3, 7, 7)
        exact = _norm(layer, shape)
        assert exact <= layer.lipschitz_bound(shape) <= 1 + 1e-8
        assert exact > 0.5


def test_gradient_ascent_on_the_jacobian_stays_below_the_bound() -> None:
    # Adversarial check of the bound: maximise ||f(x + v) - f(x)|| / ||v|| over v (the layer is affine, so
    # this is the operator norm) by gradient ascent in training mode (the unconverged weights).
    torch.manual_seed(3)
    layer = BCOPConv2d(4, 6, 3, padding=1, train_iterations=1).double()
    with torch.no_grad():
        layer.frames.mul_(2.5).add_(0.3 * torch.randn_like(layer.frames))
    bound = layer.lipschitz_bound((4, 8, 8))
    v = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    optimiser = torch.optim.Adam([v], lr=0.05)
    ratio = 0.0
    for _ in range(300):
        optimiser.zero_grad()
        gain = (layer(x + v) - layer(x)).norm() / v.norm()
        ratio = max(ratio, gain.item())
        (-gain).backward()
        optimiser.step()
    assert ratio <= bound
    assert ratio >= 0.9 * bound  # the ascent found the top of the spectrum: the check is not vacuous


def test_gradients_flow_and_eval_cache_follows_the_frames() -> None:
    torch.manual_seed(4)
    layer = BCOPConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    layer(x).square().sum().backward()
    raw = layer.parametrizations.weight.original
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    assert layer.bias is not None and layer.bias.grad is not None
    layer.eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # cached while the frames are unchanged
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    with torch.no_grad():
        second = layer.weight
    assert not torch.equal(first, second)
    layer.train()
    # 3 Björck steps in float32 from frames one SGD step away from orthonormal, against the float64 polar
    # factor: close, not equal
    assert torch.allclose(layer.weight, second, atol=1e-4)


def test_export_is_a_plain_conv_with_the_eval_kernel() -> None:
    torch.manual_seed(5)
    layer = BCOPConv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular")
    with torch.no_grad():
        layer.bias.normal_()
    plain = layer.export()
    assert type(plain) is nn.Conv2d
    assert plain.padding_mode == "circular" and plain.stride == (2, 2)
    x = torch.randn(2, 3, 8, 8)
    layer.eval()
    assert torch.equal(plain(x), layer(x))


def test_initialisation_state_dict_and_reset() -> None:
    torch.manual_seed(6)
    layer = BCOPConv2d(2, 8, 3, padding=1)
    assert layer.bias is not None and torch.equal(layer.bias, torch.zeros(8))
    assert layer.frames.shape == (6, 8, 4)
    eye = torch.eye(4)
    assert torch.allclose(layer.frames.mT @ layer.frames, eye.expand(6, 4, 4), atol=1e-5)
    clone = BCOPConv2d(2, 8, 3, padding=1)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.weight, layer.weight)
    with torch.no_grad():
        layer.frames.mul_(3.0)
        layer.bias.fill_(1.0)
    layer.reset_parameters()
    assert torch.allclose(layer.frames.mT @ layer.frames, eye.expand(6, 4, 4), atol=1e-5)
    assert torch.equal(layer.bias, torch.zeros(8))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        BCOPConv2d(4, 4, 3, groups=2)
    for mode in ("reflect", "replicate"):
        with pytest.raises(ValueError, match="border pixels twice"):
            BCOPConv2d(4, 4, 3, padding=1, padding_mode=mode)
    with pytest.raises(ValueError, match="iteration counts"):
        BCOPConv2d(4, 4, 3, train_iterations=0)


def test_kernel_composition_is_the_convolution_of_its_factors() -> None:
    # bcop_kernel's chains against applying its factors as layers (valid convolutions): the rotation, then
    # vertical 1 and 2, then horizontal 1 and 2
    torch.manual_seed(7)
    c, r = 4, 2
    frames = torch.linalg.qr(torch.randn(6, c, r, dtype=torch.float64)).Q
    kernel = bcop_kernel(frames, c, c, (3, 3))
    p = frames @ frames.mT
    eye = torch.eye(c, dtype=torch.float64)

    def vertical(q: Tensor) -> Tensor:  # P at offset 0, I - P at offset 1 (cross-correlation taps)
        return torch.stack([q, eye - q], dim=-1)[:, :, :, None]

    def horizontal(q: Tensor) -> Tensor:
        return torch.stack([q, eye - q], dim=-1)[:, :, None, :]

    x = torch.randn(1, c, 6, 6, dtype=torch.float64)
    y = nn.functional.conv2d(x, ((eye - 2 * p[0]) @ (eye - 2 * p[1]))[:, :, None, None])
    for factor in (vertical(p[2]), vertical(p[3]), horizontal(p[4]), horizontal(p[5])):
        y = nn.functional.conv2d(y, factor)
    assert torch.allclose(nn.functional.conv2d(x, kernel), y, atol=1e-12)


def test_bcop_kind_builds_bounded_layers() -> None:
    kind = get_layer_kind("bcop")
    conv = kind.conv(1, 16, 3)
    assert isinstance(conv, BCOPConv2d) and conv.padding == (1, 1)
    x = torch.randn(2, 1, 9, 9)
    assert conv(x).shape == (2, 16, 9, 9)
    # training mode: a contraction in exact arithmetic, built in float32 by about ten chained products of
    # 16 x 16 matrices, each rounding by about 16 * 2^-24 = 1e-6 relative at most
    assert conv.lipschitz_bound() <= 1 + 1e-5
    # eval: built in float64, then cast: each entry moves by at most 2^-24 relative, so the operator by at
    # most 2^-24 ||K||_F = 2^-24 sqrt(c_in) (an isometry's kernel has ||K||_F^2 = c_in), plus certify's slack
    assert conv.eval().lipschitz_bound() <= 1 + 2**-24 + 1e-8


def test_bcop_kind_dense_layers_converge_in_training() -> None:
    """The kind's dense layers have a settled training weight (4 order-1 steps, settled by up to 11 more:
    bjorck_settled): on a raw weight of condition 8 (the drift of the trained 1568 -> 128 layer) it is
    orthonormal, where BjorckLinear's default 3 steps leave sigma_min near 0.65; both stay contractions."""
    torch.manual_seed(0)
    rows, cols = 32, 200
    left = torch.linalg.qr(torch.randn(rows, rows)).Q
    right = torch.linalg.qr(torch.randn(cols, rows)).Q
    raw = (left * torch.logspace(0, -torch.log10(torch.tensor(8.0)).item(), rows)) @ right.T
    dense = get_layer_kind("bcop").dense(cols, rows)
    assert isinstance(dense, BjorckLinear)
    settings = dense.parametrizations.weight[0]
    assert (settings.train_iterations, settings.order, settings.settle_iterations) == (4, 1, 11)
    default = BjorckLinear(cols, rows)
    for layer in (dense, default):
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(raw)
        layer.train()
    converged = torch.linalg.svdvals(dense.weight.detach().double())
    assert converged.max() <= 1 + 1e-5 and converged.min() >= 1 - 1e-5
    three = torch.linalg.svdvals(default.weight.detach().double())
    assert three.max() <= 1 + 1e-5 and three.min() < 0.8
