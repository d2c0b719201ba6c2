"""Gradient-norm-preserving 1-Lipschitz activations, acting along the channel dimension 1.

Each works on ``(N, C)`` and ``(N, C, *)`` inputs. Every one is piecewise orthogonal and
continuous (a permutation, or a reflection that fixes its mirror hyperplane), hence 1-Lipschitz,
and its Jacobian is orthogonal almost everywhere, hence gradient-norm preserving.

Proof: ``docs/proofs/activations-pooling.md#lemma-piecewise-isometry``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["FullSort", "GroupSort", "HouseholderActivation", "MaxMin", "sort_pairs"]


def _check_channels(x: Tensor, multiple: int, who: str) -> int:
    # Shapes are printed as lists: TorchScript cannot build a tuple of unknown length.
    if x.ndim < 2:
        raise ValueError(f"{who} expects input of shape (N, C) or (N, C, ...), got {list(x.shape)}")
    channels = x.shape[1]
    if channels % multiple:
        raise ValueError(f"{who} needs the number of channels ({channels}) to be a multiple of {multiple}")
    return channels


def sort_pairs(x: Tensor) -> Tensor:
    """Each channel pair ``(x_2k, x_2k+1)`` becomes ``(min, max)``: GroupSort with groups of 2.

    The pair is swapped where its first entry is the larger one: ``where(x_2k > x_2k+1, flip(pair),
    pair)``, in plain tensor operations that TorchScript, ``torch.export`` and ONNX (opset 17: Gather,
    Greater, Unsqueeze, Slice, Where, Reshape) all carry, and that ``certify.graph`` recognises (a
    swap conditioned on the order of the pair's own two entries is a continuous piecewise
    permutation, 1-Lipschitz). The condition is a constant of the autograd graph (a comparison has
    no gradient), so the derivative of every order is the swap itself: a permutation, which sends
    each gradient entry to exactly one input also at ties (``minimum`` / ``maximum`` would split it
    in halves there); pairs with equal entries are left in place. Of the exact forms measured in
    ``lipnet bench layers``' network (CPU, one thread), it is the fastest training step: within a
    few percent of the former custom autograd Function, where a gather with the swap as index took
    25% longer and ``stack(minimum, maximum)`` 38% longer.
    """
    pairs = x.unflatten(1, [x.shape[1] // 2, 2])
    swap = (pairs.select(2, 0) > pairs.select(2, 1)).unsqueeze(2)
    return torch.where(swap, pairs.flip([2]), pairs).flatten(1, 2)


class GroupSort(nn.Module):
    """Sort the channels within consecutive groups of ``group_size`` (Anil, Lucas & Grosse, ICML 2019).

    Channels ``[g*k, (g+1)*k)`` are sorted in ascending order at every position. A permutation
    of the input that depends continuously on it: 1-Lipschitz and gradient-norm preserving.
    ``group_size=2`` is MaxMin (each pair becomes ``(min, max)``).
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        channels = _check_channels(x, self.group_size, "GroupSort")
        if self.group_size == 2:
            return sort_pairs(x)
        grouped = x.unflatten(1, [channels // self.group_size, self.group_size])
        return grouped.sort(dim=2).values.flatten(1, 2)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a continuous, piecewise permutation of the input."""
        return 1.0

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(GroupSort):
    """GroupSort with groups of 2: each channel pair ``(a, b)`` becomes ``(min(a, b), max(a, b))``.

    This is the MaxMin of Anil, Lucas & Grosse (ICML 2019), which keeps the channel count; it
    is not deel-torchlip's ``MaxMin``, which doubles it as ``(relu(x), relu(-x))``.
    """

    def __init__(self) -> None:
        super().__init__(group_size=2)

    def extra_repr(self) -> str:
        return ""


class FullSort(nn.Module):
    """Sort all channels at every position (GroupSort with one group).

    A continuous, piecewise permutation: 1-Lipschitz and gradient-norm preserving.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_channels(x, 1, "FullSort")
        return x.sort(dim=1).values

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a continuous, piecewise permutation of the input."""
        return 1.0


class HouseholderActivation(nn.Module):
    """Householder activation of order 1 (Singla, Singla & Feizi, ICLR 2022).

    The channels are split into halves ``x = z[:, :C/2]``, ``y = z[:, C/2:]``; on each pair
    ``v = (x_k, y_k)``, with the learned unit vector ``theta_k = (cos phi_k, sin phi_k)``,

        v -> v                              if theta_k^T v > 0,
        v -> (I - 2 theta_k theta_k^T) v    otherwise.

    The reflection fixes the hyperplane ``theta_k^T v = 0``, so the map is continuous and
    orthogonal on each half-space: 1-Lipschitz for every angle (a theorem about unit vectors,
    not about the weights' values) and gradient-norm preserving. ``phi = 3 pi / 4`` (the
    initialisation) gives ``(x, y) -> (min, max)``, i.e. MaxMin on the pairs ``(x_k, y_k)``.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be even and >= 2, got {num_channels}")
        self.num_channels = num_channels
        angle = torch.full((num_channels // 2,), 0.75 * math.pi, device=device, dtype=dtype)
        self.angle = nn.Parameter(angle)

    def forward(self, z: Tensor) -> Tensor:
        channels = _check_channels(z, 2, "HouseholderActivation")
        if channels != self.num_channels:
            raise ValueError(f"HouseholderActivation({self.num_channels}) got {channels} channels")
        half = channels // 2
        # the pairs (x_k, y_k) along a new axis of size 2, theta broadcast against it: one product, one
        # sum and one fused update instead of per-half wheres and a concatenation (half the time)
        pairs = z.reshape([z.shape[0], 2, half] + list(z.shape[2:]))
        view = [1, 2, half] + [1] * (z.ndim - 2)  # a list: TorchScript cannot repeat a tuple
        theta = torch.stack((self.angle.cos(), self.angle.sin())).view(view)
        projection = (pairs * theta).sum(dim=1, keepdim=True)
        # v - 2 min(theta^T v, 0) theta: the reflection where theta^T v <= 0, v itself elsewhere
        return (pairs - 2 * projection.clamp(max=0) * theta).reshape(z.shape)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0 for every finite angle (``theta = (cos, sin)`` is a unit vector)."""
        if not torch.isfinite(self.angle).all():
            raise ValueError("HouseholderActivation has a non-finite angle: no Lipschitz bound exists")
        return 1.0

    def extra_repr(self) -> str:
        return f"{self.num_channels}"
