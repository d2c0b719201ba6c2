"""How many times a convolution reads each input pixel: the scale of a reshaped-kernel layer.

A convolution computes, at every output position ``p``, ``y_p = M x_p`` where ``M`` is the
``c_out x (c_in k_h k_w)`` reshaped kernel and ``x_p`` the (padded) input patch at ``p``. Hence

    ||y||^2 = sum_p ||M x_p||^2 <= ||M||_2^2 sum_p ||x_p||^2 <= ||M||_2^2 * C * ||x||^2,

where ``C`` is the largest number of (patch, tap) pairs that read the same input pixel (zero
padding reads nothing; reflect, replicate and circular padding read pixels again). With
``||M||_2 <= 1`` (reshaped-kernel orthogonality, RKO) the convolution is therefore
``sqrt(C)``-Lipschitz, and ``M / sqrt(C)`` makes it 1-Lipschitz (for each group separately when
the convolution is grouped, since the groups act on disjoint channels).

The taps of a 2-D kernel are the product of its row and column taps, so ``C = C_h * C_w``
with one count per spatial dimension. For stride 1 and zero padding ``C_h = k_h``; for stride
``s`` and dilation ``d`` it is ``ceil(k * gcd(d, s) / s)``; other padding modes are counted
below by enumeration.

Proof: ``docs/proofs/convolutions.md#lemma-rko-multiplicity``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PADDING_MODES", "padding_sides", "patch_multiplicity", "patch_multiplicity_1d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def padding_sides(
    padding: str | int | Sequence[int], kernel_size: int, dilation: int, dim: int
) -> tuple[int, int]:
    """(left, right) padding of spatial dimension ``dim`` as ``nn.Conv2d`` applies it."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            total = dilation * (kernel_size - 1)
            return (total // 2, total - total // 2)
        raise ValueError(f"padding must be 'valid', 'same', an int or a tuple of ints, got {padding!r}")
    pad = padding if isinstance(padding, int) else padding[dim]
    if pad < 0:
        raise ValueError(f"padding must be >= 0, got {pad}")
    return (pad, pad)


def _source(q: int, length: int, left: int, mode: str) -> int | None:
    """The input index that padded position ``q`` holds (None for a zero)."""
    i = q - left
    if 0 <= i < length:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -i if i < 0 else 2 * (length - 1) - i
    if mode == "replicate":
        return min(max(i, 0), length - 1)
    return i % length


def _count(length: int, kernel: int, stride: int, dilation: int, left: int, right: int, mode: str) -> int:
    span = dilation * (kernel - 1) + 1
    n_out = (length + left + right - span) // stride + 1
    counts = [0] * length
    for o in range(n_out):
        for a in range(kernel):
            src = _source(o * stride + a * dilation, length, left, mode)
            if src is not None:
                counts[src] += 1
    return max(counts)


def patch_multiplicity_1d(kernel: int, stride: int, dilation: int, left: int, right: int, mode: str) -> int:
    """Largest number of (output, tap) pairs reading one input index, over every input length.

    Enumerates every valid input length up to a bound past which the counts repeat: pixels
    near the left end depend only on the left padding, pixels near the right end only on the
    length modulo the stride, once the two ends are more than ``left + right + span + stride``
    apart.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    if kernel < 1 or stride < 1 or dilation < 1 or left < 0 or right < 0:
        raise ValueError(
            f"invalid convolution: kernel={kernel}, stride={stride}, dilation={dilation}, "
            f"padding=({left}, {right})"
        )
    span = dilation * (kernel - 1) + 1
    smallest = max(1, span - left - right)
    if mode == "reflect":
        smallest = max(smallest, left + 1, right + 1)  # torch: reflect padding < input size
    elif mode == "circular":
        smallest = max(smallest, left, right)  # torch: circular padding <= input size
    largest = smallest + 2 * (left + right + span + stride) + stride
    return max(_count(n, kernel, stride, dilation, left, right, mode) for n in range(smallest, largest + 1))


def patch_multiplicity(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: str | int | Sequence[int],
    padding_mode: str,
) -> int:
    """``C = C_h * C_w``: the most times a 2-D convolution reads one input pixel, any input size."""
    total = 1
    for dim in range(2):
        left, right = padding_sides(padding, kernel_size[dim], dilation[dim], dim)
        total *= patch_multiplicity_1d(
            kernel_size[dim], stride[dim], dilation[dim], left, right, padding_mode
        )
    return total
