"""1-Lipschitz pooling and downsampling.

Every window-based layer here uses non-overlapping windows (stride = kernel size), no padding and
floor mode: overlapping windows read pixels several times, padding and ``ceil_mode`` change the
window sizes, and ``divisor_override`` changes the scale, each of which breaks the stated bound,
so they are refused with a ``ValueError`` rather than silently accepted.

Proofs: ``docs/proofs/activations-pooling.md`` (``#lemma-lp-pool``, ``#lemma-avg-pool``,
``#lemma-pixel-unshuffle``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GlobalL2NormPool2d",
    "InvertibleDownsampling",
    "ScaledAvgPool2d",
    "ScaledL2NormPool2d",
    "window_sums",
]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _window(
    who: str,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    ceil_mode: bool,
) -> tuple[int, int]:
    kernel = _pair(kernel_size, "kernel_size")
    if stride is not None and _pair(stride, "stride") != kernel:
        raise ValueError(
            f"{who} needs stride == kernel_size (non-overlapping windows), got stride={stride!r}, "
            f"kernel_size={kernel_size!r}: overlapping windows read pixels several times"
        )
    pads = (padding,) if isinstance(padding, int) else tuple(padding)
    if any(p != 0 for p in pads):
        raise ValueError(f"{who} does not support padding (got {padding!r}): padded windows change the scale")
    if ceil_mode:
        raise ValueError(f"{who} does not support ceil_mode=True: partial windows change the scale")
    return kernel


def _check_4d(x: Tensor, who: str) -> None:
    # The shape is printed as a list: TorchScript cannot build a tuple of unknown length.
    if x.ndim != 4:
        raise ValueError(f"{who} expects input of shape (N, C, H, W), got {list(x.shape)}")


def window_sums(x: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """Sums of ``x`` over non-overlapping ``k_h x k_w`` windows, as ``avg_pool2d(x, k) * (k_h k_w)``.

    ``avg_pool2d`` with ``divisor_override=1`` computes the same sums, but ONNX's AveragePool has no
    such setting and ``torch.onnx.export`` drops it (the exported model then divides by ``k_h k_w``);
    the mean times the window size is carried by every format. For a window of ``2^j`` entries
    (2x2, 4x4, ...) the division and the product are by powers of two, hence exact in binary
    floating point (below the overflow and subnormal ranges), so the result equals the window sum
    bit for bit; for other windows it differs from it by two roundings (a relative error below 2^-23).
    """
    return F.avg_pool2d(x, kernel_size) * (kernel_size[0] * kernel_size[1])


def _tiny(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).tiny`` (the smallest normal number), written out: TorchScript has no finfo."""
    if dtype == torch.float64:
        return 2.2250738585072014e-308
    if dtype == torch.float16:
        return 6.103515625e-05
    return 1.1754943508222875e-38  # float32 and bfloat16


def _safe_sqrt(sum_of_squares: Tensor) -> Tensor:
    # sqrt(max(s, tiny)) = max(||window||, sqrt(tiny)): still 1-Lipschitz (a max with a constant),
    # equal to the norm above 1e-19 (float32), with a zero instead of an infinite gradient at 0.
    return sum_of_squares.clamp_min(_tiny(sum_of_squares.dtype)).sqrt()


class ScaledL2NormPool2d(nn.Module):
    """L2-norm pooling: ``y = ||x_window||_2`` over non-overlapping ``k_h x k_w`` windows, per channel.

    Guarantee: 1-Lipschitz (``| ||a|| - ||b|| | <= ||a - b||`` per window, and the windows are
    disjoint), gradient-norm preserving, and norm-preserving (``||y|| = ||x||``) when the windows
    tile the input (H, W divisible by the kernel; otherwise the last rows/columns are dropped
    and ``||y|| <= ||x||``). Outputs are clamped below at ``sqrt(finfo.tiny)`` (about 1e-19 in
    float32) so the gradient at a zero window is 0, not NaN.
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = _window(type(self).__name__, kernel_size, stride, padding, ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "ScaledL2NormPool2d")
        return _safe_sqrt(window_sums(x * x, self.kernel_size))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: norms of disjoint windows."""
        return 1.0

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class ScaledAvgPool2d(nn.Module):
    """Scaled average pooling ``y = sum(x_window) / sqrt(k_h k_w)`` over non-overlapping windows.

    That is average pooling times ``sqrt(k_h k_w)`` (times ``k`` for ``k x k`` windows).

    Guarantee: a linear map with orthonormal rows (each row is ``1 / sqrt(k_h k_w)`` on one
    window), so 1-Lipschitz with norm exactly 1; it keeps the window means and drops the rest.
    ``count_include_pad`` is accepted for signature compatibility and has no effect without
    padding; ``divisor_override`` is refused.
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = _window(type(self).__name__, kernel_size, stride, padding, ceil_mode)
        if divisor_override is not None:
            raise ValueError(
                f"ScaledAvgPool2d does not support divisor_override (got {divisor_override!r}): the scale "
                "sqrt(k_h k_w) is what makes the layer 1-Lipschitz"
            )
        self.count_include_pad = count_include_pad

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "ScaledAvgPool2d")
        return F.avg_pool2d(x, self.kernel_size) * math.sqrt(self.kernel_size[0] * self.kernel_size[1])

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a linear map with orthonormal rows."""
        return 1.0

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class InvertibleDownsampling(nn.PixelUnshuffle):
    """Space-to-depth downsampling ``(N, C, H, W) -> (N, C r^2, H / r, W / r)`` (``nn.PixelUnshuffle``).

    Guarantee: orthogonal (a permutation of the entries; H and W must be divisible by ``r``),
    hence 1-Lipschitz and norm-preserving; used for striding by Prach & Lampert (ECCV 2022).
    """

    def __init__(self, downscale_factor: int) -> None:
        if not isinstance(downscale_factor, int) or downscale_factor < 1:
            raise ValueError(f"downscale_factor must be a positive int, got {downscale_factor!r}")
        super().__init__(downscale_factor)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a permutation."""
        return 1.0


class GlobalL2NormPool2d(nn.Module):
    """Global L2-norm pooling ``(N, C, H, W) -> (N, C)``: ``y_c = ||x_c||_2`` over all positions.

    Guarantee: 1-Lipschitz, norm-preserving (``||y|| = ||x||``) and gradient-norm preserving;
    outputs are clamped below at ``sqrt(finfo.tiny)`` like :class:`ScaledL2NormPool2d`.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(x, "GlobalL2NormPool2d")
        return _safe_sqrt((x * x).sum(dim=(2, 3)))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: one norm per channel."""
        return 1.0
