"""Sound float64 Lipschitz bounds of torch's pooling layers, from per-axis operators torch computes.

On import this registers bounds for ``nn.AvgPool1d/2d``, ``nn.AdaptiveAvgPool1d/2d``,
``nn.MaxPool1d/2d``, ``nn.AdaptiveMaxPool1d/2d`` and ``nn.LPPool1d/2d`` (p = 2 or inf); a subclass
that overrides ``forward`` (deel-torchlip's ``ScaledAvgPool2d``) is refused with
:class:`~certify.contract.UnboundableModuleError`, and a module with forward hooks with a ``ValueError``.

Pooling is separable: a 2-D window is a product of 1-D windows, and torch's divisor is a product of
per-axis lengths, so the 2-D operator is the Kronecker product of two 1-D operators and its norm
the product of theirs; per-axis matrices are taken from torch itself, never re-derived.

* average pooling: exact per-axis norms for a known size. For every size, an axis whose windows
  all carry the same weight (``divisor_override``, or ``count_include_pad`` or no padding, and no
  partial ``ceil_mode`` window) is a zero-padded 1-D convolution with a uniform kernel (item 2 of
  :mod:`certify.rules.conv`); otherwise the axis norm is bounded by the Collatz-Wielandt inequality
  ``rho(M) <= max_j (M q)_j / q_j`` for ``M = A^T A >= 0`` and ``q = M^t 1 > 0``, evaluated for every
  size up to a limit beyond which the per-pixel value repeats (see :func:`_sup_over_sizes`);
* max pooling and LP pooling with p = inf: each output is 1-Lipschitz in the window's pixels for
  the max norm, so ``||f(x) - f(y)||^2 <= sum_w ||x_w - y_w||^2 <= c ||x - y||^2`` with c the max
  number of windows containing a pixel (attained by moving that pixel alone): bound ``sqrt(c)``;
* LP pooling with p = 2: ``f_w(x) = sqrt(k_w / len_w) ||x_w||`` (torch rescales partial ceil_mode
  windows), so the same argument gives ``sqrt(max_i sum_{w ni i} k_w / len_w)``, attained at 0.

Proofs: ``docs/proofs/activations-pooling.md`` (``#lemma-avg-pool``, ``#lemma-max-pool``,
``#lemma-lp-pool``, ``#lemma-sup-over-sizes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK, Shape, matrix_spectral_norm, register_bound, require_plain
from certify.rules.conv_symbol import continuum_sup, infinite_grid_kernel
from certify.rules.shapes import per_axis, positive, spatial_sizes

__all__ = [
    "adaptive_avg_pool_bound",
    "adaptive_max_pool_bound",
    "avg_pool_bound",
    "lp_pool_bound",
    "max_pool_bound",
]

#: Power iterations behind the Collatz-Wielandt vector of average pooling.
_COLLATZ_STEPS = 24


# ---------------------------------------------------------------------------------------------
# Per-axis operators taken from torch itself


@dataclass(frozen=True)
class _Window:
    """One axis of a pooling window, laid out as torch lays it out."""

    kernel: int
    stride: int
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        # torch's pooling_output_shape: a ceil_mode window must start inside the input or left padding.
        extra = self.stride - 1 if self.ceil_mode else 0
        out = (n + 2 * self.padding - self.span + extra) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1
        return out


def _windows(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
) -> tuple[_Window, ...]:
    kernel = positive(tuple(int(k) for k in kernel_size), "kernel_size")
    nd = len(kernel)
    if nd not in (1, 2):
        raise ValueError(f"kernel_size must have 1 or 2 entries (one per spatial axis), got {kernel_size!r}")
    strides = positive(per_axis(kernel if stride is None else stride, nd, "stride"), "stride")
    pads = per_axis(padding, nd, "padding")
    dilations = positive(per_axis(dilation, nd, "dilation"), "dilation")
    windows = tuple(
        _Window(*axis, ceil_mode=ceil_mode) for axis in zip(kernel, strides, pads, dilations, strict=True)
    )
    for w in windows:
        if w.padding < 0 or 2 * w.padding > w.kernel:
            raise ValueError(f"pooling padding {pads} must be >= 0 and at most half the kernel size {kernel}")
    return windows


def _basis(n: int) -> Tensor:
    """The n one-hot inputs of one axis, as a batch of (1, n, 1) images."""
    return torch.eye(n, dtype=torch.float64).reshape(n, 1, n, 1)


def _avg_axis(n: int, w: _Window, count_include_pad: bool, summed: bool) -> Tensor:
    """torch's 1-D average pooling on size n as an ``(out, n)`` matrix (window sums if ``summed``)."""
    y = F.avg_pool2d(
        _basis(n),
        (w.kernel, 1),
        (w.stride, 1),
        (w.padding, 0),
        w.ceil_mode,
        count_include_pad,
        1 if summed else None,
    )
    return y.reshape(n, -1).T


def _max_axis(n: int, w: _Window) -> Tensor:
    """Window membership of torch's 1-D max pooling on size n as a 0/1 ``(out, n)`` matrix."""
    y = F.max_pool2d(_basis(n), (w.kernel, 1), (w.stride, 1), (w.padding, 0), (w.dilation, 1), w.ceil_mode)
    return (y.reshape(n, -1).T > 0.5).to(torch.float64)


def _sup_over_sizes(value: Callable[[int], float], reach: int, w: _Window) -> float:
    """``max over every size n >= 1 of value(n)``, for a per-pixel quantity of reach ``reach``.

    ``value(n)`` must be the max over pixels j of a quantity that depends only on the windows
    (positions and weights) meeting ``[j - reach, j + reach]``; sizes with no output are skipped.
    With ``R = reach + span + padding``: a pixel at least R from both ends sees full windows whose
    layout repeats with period ``stride``; once ``n >= 2 R + stride``, a pixel within R of the left
    end sees the same windows as for every larger n, and one within R of the right end the same
    as for ``n - stride`` relative to that end (torch's window count, ceil_mode included, grows
    by one when n grows by the stride). So every value is already taken for some
    ``n <= 2 R + 2 stride + 2``.
    """
    radius = reach + w.span + w.padding
    values = [value(n) for n in range(1, 2 * radius + 2 * w.stride + 3) if w.out_size(n) >= 1]
    return max(values)


def _axis_value(value: Callable[[int], float], w: _Window, size: int | None, reach: int) -> float:
    """``value(size)``, or its sup over every size when ``size`` is None."""
    if size is None:
        return _sup_over_sizes(value, reach, w)
    if w.out_size(size) < 1:
        raise ValueError(
            f"input size {size} is too small for a pooling window of {w.kernel} with padding {w.padding}"
        )
    return value(size)


def _collatz(matrix: Tensor) -> float:
    """Collatz-Wielandt bound of ``||matrix||^2``: ``max_j (M q)_j / q_j``, ``M = A^T A``, ``q = M^t 1``.

    Sound for any ``q > 0`` on the pixels some window covers (``M`` is zero elsewhere); the local
    vector ``M^t 1`` keeps the value a per-pixel quantity of reach ``(t + 1)`` windows.
    """
    gram = matrix.T @ matrix
    q = torch.ones(gram.shape[0], dtype=torch.float64)
    for _ in range(_COLLATZ_STEPS):
        q = gram @ q
        q = q / q.max()
    covered = q > 0
    return ((gram @ q)[covered] / q[covered]).max().item()


def avg_pool_bound(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Sound bound of the L2 norm of torch's average pooling (``F.avg_pool1d`` / ``F.avg_pool2d``).

    ``kernel_size`` has one entry per spatial axis (1 or 2). With ``spatial_shape`` the value is
    the exact norm (product of the exact per-axis norms, times ``1 + FLOAT64_SLACK``); without it
    it holds for every input size (see the module docstring). ``ceil_mode`` partial windows are
    divided by their clipped size, so their weights exceed ``1 / k``: ``AvgPool2d(2, ceil_mode=True)``
    has norm 1 on odd sizes, not 1/2.
    """
    windows = _windows(kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and int(divisor_override) < 1:
        raise ValueError(f"divisor_override must be >= 1, got {divisor_override}")
    summed = divisor_override is not None
    total = 1.0 / int(divisor_override) if divisor_override is not None else 1.0
    sizes = None if spatial_shape is None else spatial_sizes(spatial_shape, len(windows), "average pooling")
    for axis, w in enumerate(windows):

        def exact(n: int, w: _Window = w) -> float:
            return matrix_spectral_norm(_avg_axis(n, w, count_include_pad, summed))

        def collatz(n: int, w: _Window = w) -> float:
            return _collatz(_avg_axis(n, w, count_include_pad, summed))

        if sizes is not None:
            total *= _axis_value(exact, w, sizes[axis], 0)
        elif summed or ((count_include_pad or w.padding == 0) and not (w.ceil_mode and w.stride > 1)):
            # Every window has the same weight: a zero-padded 1-D convolution with a uniform kernel.
            line = torch.full((1, 1, 1, w.kernel), 1.0 if summed else 1.0 / w.kernel, dtype=torch.float64)
            total *= continuum_sup(infinite_grid_kernel(line, (w.stride,), (1,)))
        else:
            square = _sup_over_sizes(collatz, (_COLLATZ_STEPS + 2) * w.kernel, w)
            total *= math.sqrt(square) * (1.0 + FLOAT64_SLACK)
    return total


def max_pool_bound(
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    ceil_mode: bool = False,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's max pooling.

    ``sqrt(c)`` with c the largest number of windows that contain one input pixel, for
    ``spatial_shape`` or the worst over every size. Also the constant of LP pooling with p = inf.
    """
    windows = _windows(kernel_size, stride, padding, dilation, ceil_mode)
    sizes = None if spatial_shape is None else spatial_sizes(spatial_shape, len(windows), "max pooling")
    count = 1.0
    for axis, w in enumerate(windows):

        def most_windows(n: int, w: _Window = w) -> float:
            return _max_axis(n, w).sum(0).max().item()

        count *= _axis_value(most_windows, w, None if sizes is None else sizes[axis], 0)
    return math.sqrt(count) * (1.0 + FLOAT64_SLACK)


def lp_pool_bound(
    norm_type: float,
    kernel_size: Sequence[int],
    stride: int | Sequence[int] | None = None,
    *,
    ceil_mode: bool = False,
    spatial_shape: Sequence[int] | None = None,
) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's LP pooling, p = 2 or inf.

    p = 2: torch computes ``sqrt(k / len_w * sum_{i in w} x_i^2)`` per window (``k / len_w > 1`` for a
    partial ceil_mode window), so the constant is ``sqrt(max_i sum_{w ni i} k / len_w)``. p = inf is
    max pooling of ``|x|``. Other p are refused: for odd p torch's formula is not even continuous.
    """
    p = float(norm_type)
    if p == math.inf:
        return max_pool_bound(kernel_size, stride, 0, 1, ceil_mode=ceil_mode, spatial_shape=spatial_shape)
    if p != 2.0:
        raise ValueError(f"only LP pooling with norm_type 2 or inf has a bound here, got {norm_type!r}")
    windows = _windows(kernel_size, stride, 0, 1, ceil_mode)
    sizes = None if spatial_shape is None else spatial_sizes(spatial_shape, len(windows), "LP pooling")
    total = 1.0
    for axis, w in enumerate(windows):

        def weighted_windows(n: int, w: _Window = w) -> float:
            return (w.kernel * _avg_axis(n, w, True, False).sum(0)).max().item()

        total *= _axis_value(weighted_windows, w, None if sizes is None else sizes[axis], 0)
    return math.sqrt(total) * (1.0 + FLOAT64_SLACK)


def _adaptive_sizes(
    output_size: Sequence[int | None], spatial_shape: Sequence[int] | None, what: str
) -> list[tuple[int, int]]:
    if spatial_shape is None:
        raise ValueError(
            f"{what} has no bound that holds for every input size (an output larger than the input repeats "
            "pixels); pass input_shape to lipschitz_bound"
        )
    sizes = spatial_sizes(spatial_shape, len(output_size), what)
    pairs = [(n, n if o is None else int(o)) for n, o in zip(sizes, output_size, strict=True)]
    if any(o < 1 for _, o in pairs):
        raise ValueError(f"{what}: output sizes must be >= 1, got {tuple(output_size)}")
    return pairs


def adaptive_avg_pool_bound(output_size: Sequence[int | None], spatial_shape: Sequence[int] | None) -> float:
    """Exact norm (times ``1 + FLOAT64_SLACK``) of torch's adaptive average pooling for one input size.

    ``output_size`` has one entry per spatial axis (None keeps the input size). There is no bound
    for every size, so ``spatial_shape`` is required.
    """
    total = 1.0
    for n, o in _adaptive_sizes(output_size, spatial_shape, "adaptive average pooling"):
        total *= matrix_spectral_norm(F.adaptive_avg_pool2d(_basis(n), (o, 1)).reshape(n, -1).T)
    return total


def adaptive_max_pool_bound(output_size: Sequence[int | None], spatial_shape: Sequence[int] | None) -> float:
    """Lipschitz constant (exact, times ``1 + FLOAT64_SLACK``) of torch's adaptive max pooling.

    ``sqrt(c)``, c the largest number of windows containing one pixel; ``spatial_shape`` is required.
    """
    count = 1.0
    for n, o in _adaptive_sizes(output_size, spatial_shape, "adaptive max pooling"):
        member = F.adaptive_max_pool2d(_basis(n), (o, 1)).reshape(n, -1) > 0.5
        count *= member.sum(1).max().item()
    return math.sqrt(count) * (1.0 + FLOAT64_SLACK)


# ---------------------------------------------------------------------------------------------
# Registration for plain torch modules


def _dims(module: nn.Module, one_d: type[nn.Module]) -> int:
    return 1 if isinstance(module, one_d) else 2


def _spatial_or_none(input_shape: Sequence[int] | None, nd: int, what: str) -> Shape | None:
    return None if input_shape is None else spatial_sizes(input_shape, nd, what)


def _avg_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    pool: Any = module  # torch types these attributes loosely: ints or tuples of ints
    nd = _dims(module, nn.AvgPool1d)
    require_plain(module, nn.AvgPool1d if nd == 1 else nn.AvgPool2d)
    return avg_pool_bound(
        per_axis(pool.kernel_size, nd, "kernel_size"),
        pool.stride,
        pool.padding,
        ceil_mode=bool(pool.ceil_mode),
        count_include_pad=bool(pool.count_include_pad),
        divisor_override=getattr(pool, "divisor_override", None),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _max_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    pool: Any = module  # torch types these attributes loosely: ints or tuples of ints
    nd = _dims(module, nn.MaxPool1d)
    require_plain(module, nn.MaxPool1d if nd == 1 else nn.MaxPool2d)
    return max_pool_bound(
        per_axis(pool.kernel_size, nd, "kernel_size"),
        pool.stride,
        pool.padding,
        pool.dilation,
        ceil_mode=bool(pool.ceil_mode),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _lp_pool_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    pool: Any = module  # torch types these attributes loosely: ints or tuples of ints
    nd = _dims(module, nn.LPPool1d)
    require_plain(module, nn.LPPool1d if nd == 1 else nn.LPPool2d)
    return lp_pool_bound(
        pool.norm_type,
        per_axis(pool.kernel_size, nd, "kernel_size"),
        pool.stride,
        ceil_mode=bool(pool.ceil_mode),
        spatial_shape=_spatial_or_none(input_shape, nd, type(module).__name__),
    )


def _adaptive_output(module: nn.Module, nd: int) -> tuple[int | None, ...]:
    size: Any = module.output_size
    return (size,) * nd if size is None or isinstance(size, int) else tuple(size)


def _adaptive_avg_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.AdaptiveAvgPool1d)
    require_plain(module, nn.AdaptiveAvgPool1d if nd == 1 else nn.AdaptiveAvgPool2d)
    return adaptive_avg_pool_bound(_adaptive_output(module, nd), input_shape)


def _adaptive_max_module(module: nn.Module, input_shape: Sequence[int] | None) -> float:
    nd = _dims(module, nn.AdaptiveMaxPool1d)
    require_plain(module, nn.AdaptiveMaxPool1d if nd == 1 else nn.AdaptiveMaxPool2d)
    return adaptive_max_pool_bound(_adaptive_output(module, nd), input_shape)


for _pair, _fn in (
    ((nn.AvgPool1d, nn.AvgPool2d), _avg_pool_module),
    ((nn.MaxPool1d, nn.MaxPool2d), _max_pool_module),
    ((nn.LPPool1d, nn.LPPool2d), _lp_pool_module),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), _adaptive_avg_module),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d), _adaptive_max_module),
):
    for _cls in _pair:
        register_bound(_cls, _fn)
