"""Exactly orthogonal convolutions: CayleyConv2d and the orthogonium AOC wrapper AOCConv2d.

The exact-operator checks push the identity basis through the layer and take the singular
values of the resulting matrix in float64: a float64 layer (via ``certify.exact.dense_matrix``)
must be orthogonal to rounding, and the float32 layer as it runs must be within 1e-5 of it.
"""

from __future__ import annotations

import math
import sys
from importlib.util import find_spec

import pytest
import torch
from torch import Tensor, nn

from certify.exact import dense_matrix, dense_operator_norm
from lipnet.layers import AOCConv2d, CayleyConv2d
from lipnet.layers.cayley import cayley_transform
from lipnet.layers.kinds import get_layer_kind


def _float32_matrix(layer: nn.Module, shape: tuple[int, ...]) -> Tensor:
    """The float64 copy of the matrix the float32 layer applies, column by column (no bias)."""
    n = math.prod(shape)
    with torch.no_grad():
        columns = layer(torch.eye(n).reshape(n, *shape))
    return columns.reshape(n, -1).T.double()


# (in, out, kernel, stride, H): square, in < out, in > out, 5x5, odd size, stride 2 both ways
CAYLEY_CASES = [
    (4, 4, 3, 1, 8),
    (3, 6, 3, 1, 6),
    (6, 3, 3, 1, 6),
    (4, 4, 5, 1, 7),
    (2, 8, 3, 2, 8),
    (3, 8, 3, 2, 6),
]


@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "size"), CAYLEY_CASES)
def test_cayley_exact_operator(c_in: int, c_out: int, k: int, stride: int, size: int) -> None:
    torch.manual_seed(0)
    shape = (c_in, size, size)
    layer = CayleyConv2d(c_in, c_out, k, stride=stride, bias=False, input_size=size).eval()
    rows, cols = c_out * (size // stride) ** 2, c_in * size * size
    sv32 = torch.linalg.svdvals(_float32_matrix(layer, shape))
    assert sv32.shape == (min(rows, cols),)
    assert (sv32 - 1).abs().max().item() <= 1e-5
    matrix = dense_matrix(layer.double(), shape)
    assert matrix.shape == (rows, cols)
    eye_rows, eye_cols = torch.eye(rows, dtype=torch.float64), torch.eye(cols, dtype=torch.float64)
    if rows >= cols:  # isometry: A^T A = I, norm-preserving
        assert torch.allclose(matrix.T @ matrix, eye_cols, atol=1e-12)
    else:  # right semi-orthogonal: A A^T = I, a nonzero kernel
        assert torch.allclose(matrix @ matrix.T, eye_rows, atol=1e-12)
        assert torch.linalg.matrix_rank(matrix).item() == rows
    assert 1.0 <= layer.lipschitz_bound() <= 1.0 + 1e-8


def test_cayley_transform_orthonormal_columns_and_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    for p, q in ((5, 5), (7, 3), (3, 7)):
        m = torch.randn(4, p, q, generator=gen, dtype=torch.complex128)
        out = cayley_transform(m)
        gram = out.mH @ out if p >= q else out @ out.mH
        assert torch.allclose(gram, torch.eye(min(p, q), dtype=torch.complex128).expand_as(gram), atol=1e-12)


def test_cayley_is_a_same_circular_convolution() -> None:
    """Translation equivariant under circular shifts, with a stride-s shift for stride s."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layer = CayleyConv2d(3, 5, 3).double()
    assert torch.allclose(
        layer(torch.roll(x, (1, 2), (2, 3))), torch.roll(layer(x), (1, 2), (2, 3)), atol=1e-12
    )
    strided = CayleyConv2d(3, 12, 3, stride=2).double()
    assert torch.allclose(
        strided(torch.roll(x, (2, 4), (2, 3))), torch.roll(strided(x), (1, 2), (2, 3)), atol=1e-12
    )


def test_cayley_bound_reads_the_actual_matrices() -> None:
    """A corrupted cached spectrum is measured, not assumed orthogonal."""
    layer = CayleyConv2d(3, 3, 3, input_size=5).eval()
    with torch.no_grad():
        q = layer.frequency_matrices()
    layer.spectrum._cache_value = 1.5 * q
    assert layer.lipschitz_bound() == pytest.approx(1.5, rel=1e-5)


def test_cayley_gradients_flow_and_eval_cache_matches_training() -> None:
    torch.manual_seed(3)
    layer = CayleyConv2d(4, 6, 3, input_size=6)
    x = torch.randn(3, 4, 6, 6)
    y_train = layer(x)
    y_train.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None and torch.isfinite(layer.weight.grad).all()
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        cached = layer.spectrum._cache_value
        second = layer(x)
    assert cached is not None and layer.spectrum._cache_value is cached
    assert torch.allclose(first, y_train.detach(), atol=1e-6)
    assert torch.equal(first, second)
    with torch.no_grad():
        layer.weight.add_(0.1)  # an in-place update invalidates the cache
    with torch.no_grad():
        assert not torch.allclose(layer(x), first, atol=1e-4)


def test_cayley_state_dict_round_trip_keeps_the_size() -> None:
    torch.manual_seed(4)
    layer = CayleyConv2d(3, 4, 3, stride=2)
    x = torch.randn(2, 3, 8, 8)
    y = layer(x)  # fixes the size lazily
    clone = CayleyConv2d(3, 4, 3, stride=2)
    clone.load_state_dict(layer.state_dict())
    assert torch.allclose(clone(x), y, atol=1e-6)
    assert clone.lipschitz_bound() == pytest.approx(layer.lipschitz_bound(), rel=1e-12)
    assert torch.equal(clone.input_size, torch.tensor([8, 8]))


def test_cayley_bad_arguments() -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        CayleyConv2d(0, 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        CayleyConv2d(3, 3, (3, 0))
    with pytest.raises(ValueError, match="divisible"):
        CayleyConv2d(3, 3, 3, stride=2, input_size=5)
    layer = CayleyConv2d(3, 3, 3, input_size=6)
    with pytest.raises(ValueError, match="built for 6x6 inputs"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expects \(N, 3, H, W\)"):
        layer(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="input size unknown"):
        CayleyConv2d(3, 3, 3).lipschitz_bound()
    with pytest.raises(ValueError, match="input_shape"):
        layer.lipschitz_bound((3, 8, 8))


# ----------------------------------------------------------------------------------------------
# AOC (orthogonium)


def test_orthogonium_reflect_padding_is_far_from_1_and_ours_refuses_it() -> None:
    layers = pytest.importorskip("orthogonium.layers")
    torch.manual_seed(0)
    for mode in ("reflect", "replicate"):
        raw = layers.AdaptiveOrthoConv2d(4, 4, 3, padding_mode=mode).eval()
        weight = raw.weight.detach().double()

        def padded_conv(x: Tensor, weight: Tensor = weight, mode: str = mode) -> Tensor:
            return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode=mode), weight)

        # the raw orthogonium layer, as it computes, in float64
        assert dense_operator_norm(padded_conv, (4, 6, 6)) > 1.6
        with pytest.raises(ValueError, match="read border pixels twice"):
            AOCConv2d(4, 4, 3, padding_mode=mode)


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "padding"), [(4, 4, 3, 1, "same"), (4, 8, 3, 1, "same"), (4, 8, 3, 2, 1)]
)
def test_aoc_exact_operator_and_bound(c_in: int, c_out: int, k: int, stride: int, padding: str | int) -> None:
    pytest.importorskip("orthogonium")
    torch.manual_seed(0)
    layer = AOCConv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False).double().eval()
    shape = (c_in, 8, 8)
    sv = torch.linalg.svdvals(dense_matrix(layer, shape))
    assert sv.max().item() <= 1 + 1e-6
    if c_out * stride * stride >= c_in * 1:  # AOC's orthogonal case: every singular value is 1
        assert sv[: min(c_in * 64, c_out * 64 // stride**2)].min().item() >= 1 - 1e-6
    sized = layer.lipschitz_bound(shape)
    assert sv.max().item() <= sized <= sv.max().item() * (1 + 1e-6)
    assert layer.lipschitz_bound() >= sized * (1 - 1e-9)


def test_aoc_eval_cache_is_one_conv_and_matches_training() -> None:
    pytest.importorskip("orthogonium")
    torch.manual_seed(1)
    layer = AOCConv2d(4, 4, 3)
    x = torch.randn(2, 4, 6, 6)
    y_train = layer(x)
    y_train.sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        kernel = layer._cache_value
        second = layer(x)
    assert kernel is not None and layer._cache_value is kernel
    assert torch.equal(first, second)
    assert torch.allclose(first, y_train.detach(), atol=1e-5)
    plain = nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular")
    plain.load_state_dict({"weight": kernel, "bias": layer.conv.bias.detach()})
    with torch.no_grad():
        assert torch.allclose(plain(x), first, atol=1e-6)


def test_aoc_state_dict_round_trip() -> None:
    pytest.importorskip("orthogonium")
    torch.manual_seed(2)
    layer = AOCConv2d(4, 8, 3).eval()
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(3)
    clone = AOCConv2d(4, 8, 3).eval()
    clone.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.allclose(clone(x), layer(x), atol=1e-6)


def test_aoc_bad_arguments() -> None:
    pytest.importorskip("orthogonium")
    with pytest.raises(ValueError, match="kernel_size >= stride"):
        AOCConv2d(4, 4, 2, stride=3, padding=0)
    with pytest.raises(ValueError, match="kernel_size must be a positive int"):
        AOCConv2d(4, 4, (3, 3))  # type: ignore[arg-type]


def test_aoc_without_orthogonium_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "orthogonium.layers", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install orthogonium"):
        AOCConv2d(4, 4, 3)
    with pytest.raises(ImportError, match="pip install orthogonium"):
        get_layer_kind("aoc").block(4, 3)


def test_layer_kinds_build_bounded_layers() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 4, 8, 8)
    kind = get_layer_kind("cayley")
    assert "circular" in kind.description
    block, conv = kind.block(4, 3), kind.conv(4, 8, 1)
    assert isinstance(block, CayleyConv2d) and isinstance(conv, CayleyConv2d)
    assert block(x).shape == (2, 4, 8, 8) and conv(x).shape == (2, 8, 8, 8)
    assert block.lipschitz_bound() == pytest.approx(1.0, abs=1e-5)
    assert kind.dense(5, 3).lipschitz_bound() == pytest.approx(1.0, abs=1e-5)
    if find_spec("orthogonium"):
        aoc = get_layer_kind("aoc").block(4, 3)
        assert isinstance(aoc, AOCConv2d) and aoc(x).shape == (2, 4, 8, 8)
