"""lipnet.pooling: exact guarantees (norm preservation, orthogonality) and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from certify.exact import dense_matrix
from lipnet.pooling import GlobalL2NormPool2d, InvertibleDownsampling, ScaledAvgPool2d, ScaledL2NormPool2d


def test_l2_norm_pool_is_the_window_norm_and_norm_preserving() -> None:
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    y = ScaledL2NormPool2d((2, 3))(x)
    windows = x.unfold(2, 2, 2).unfold(3, 3, 3)
    torch.testing.assert_close(y, windows.square().sum(dim=(-2, -1)).sqrt())
    assert y.norm().item() == pytest.approx(x.norm().item(), rel=1e-12)


def test_l2_norm_pool_drops_the_remainder_when_windows_do_not_tile() -> None:
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    y = ScaledL2NormPool2d(2)(x)
    assert y.shape == (1, 1, 2, 2)
    assert y.norm().item() == pytest.approx(x[..., :4, :4].norm().item(), rel=1e-12)


def test_norm_pools_have_finite_gradients_at_zero() -> None:
    for pool in (ScaledL2NormPool2d(2), GlobalL2NormPool2d()):
        x = torch.zeros(1, 2, 4, 4, requires_grad=True)
        pool(x).sum().backward()
        assert torch.isfinite(x.grad).all()


def test_global_l2_norm_pool() -> None:
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = GlobalL2NormPool2d()(x)
    assert y.shape == (3, 4)
    torch.testing.assert_close(y, x.flatten(2).norm(dim=2))


def test_scaled_avg_pool_has_orthonormal_rows() -> None:
    a = dense_matrix(ScaledAvgPool2d((2, 3)), (1, 4, 6))  # (4 outputs, 24 inputs)
    assert a.shape == (4, 24)
    torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=a.dtype))
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(ScaledAvgPool2d(2)(x), x.unfold(2, 2, 2).unfold(3, 2, 2).sum((-2, -1)) / 2)


def test_invertible_downsampling_is_orthogonal() -> None:
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    y = InvertibleDownsampling(2)(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    assert torch.equal(torch.nn.functional.pixel_shuffle(y, 2), x)


@pytest.mark.parametrize("cls", [ScaledL2NormPool2d, ScaledAvgPool2d])
def test_refusals(cls: type) -> None:
    with pytest.raises(ValueError, match="stride"):
        cls(2, stride=1)
    with pytest.raises(ValueError, match="padding"):
        cls(2, padding=1)
    with pytest.raises(ValueError, match="ceil_mode"):
        cls(2, ceil_mode=True)
    with pytest.raises(ValueError, match="kernel_size"):
        cls(0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        cls(2)(torch.randn(4, 4))
    cls(2, stride=2, padding=0)  # the explicit non-overlapping form is accepted


def test_avg_pool_refuses_divisor_override() -> None:
    with pytest.raises(ValueError, match="divisor_override"):
        ScaledAvgPool2d(2, divisor_override=1)


def test_invertible_downsampling_refuses_bad_factor() -> None:
    with pytest.raises(ValueError, match="downscale_factor"):
        InvertibleDownsampling(0)


def test_bounds_are_one() -> None:
    for pool in (ScaledL2NormPool2d(2), ScaledAvgPool2d(3), InvertibleDownsampling(2), GlobalL2NormPool2d()):
        assert pool.lipschitz_bound() == 1.0
    assert math.isclose(ScaledAvgPool2d(3)(torch.ones(1, 1, 3, 3)).item(), 3.0)


def test_l2_norm_pool_sums_windows_without_divisor_override_bit_for_bit() -> None:
    """The window sums are ``avg_pool2d * k_h k_w`` (ONNX has no divisor override): for power-of-two
    windows the same floats as the former ``divisor_override=1``, and every format carries them."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for kernel in (2, (2, 4), 4):
        x = torch.randn(3, 5, 8, 8, generator=gen) * 10.0 ** torch.randint(-3, 4, (3, 5, 8, 8), generator=gen)
        old = F.avg_pool2d(x * x, kernel, divisor_override=1).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
        pool = ScaledL2NormPool2d(kernel)
        assert torch.equal(pool(x), old)
        assert torch.equal(torch.jit.script(pool)(x), old)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=gen)
    old = F.avg_pool2d(x * x, 3, divisor_override=1).sqrt()
    torch.testing.assert_close(ScaledL2NormPool2d(3)(x), old, rtol=2**-50, atol=0)  # two roundings
