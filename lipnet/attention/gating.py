"""Lipschitz-bounded gating: feedback gating of convolution filters and attention to scale.

* dasNet (Stollenga, Masci, Gomez & Schmidhuber, NeurIPS 2014) lets a policy that observes the
  network's own top-level features re-weight the filters of a lower layer in a second pass. The
  published gate multiplies unbounded filter responses, so the second pass is a product of two
  input-dependent maps and is not Lipschitz (the squeeze-and-excitation counterexample applies).
* Attention to scale (Chen, Yang, Wang, Xu & Yuille, CVPR 2016) fuses the score maps of one
  shared network run at several input scales with per-pixel softmax weights over the scales: a
  softmax-weighted sum of unbounded maps, not Lipschitz either, and the resize operators are not
  norm-1.

Both are bounded here by Lemma 1 (gated product, ``docs/proofs/attention.md#lemma-gated-product``)
and Lemma 2 (softmax aggregation, ``docs/proofs/attention.md#lemma-softmax-aggregation``), applied in
the class docstrings (``#lemma-feedback-gating``, ``#lemma-attention-to-scale`` there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.activations import MaxMin
from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    ball_projection,
    check_int,
    check_maxmin_channels,
    check_positive,
    sigmoid_gate_bound_tensor,
    soft_clamp,
    spectral_norm,
)
from lipnet.layers import BjorckConv2d

__all__ = ["AttentionToScale", "FeedbackGating", "bilinear_resize_norm"]


def _check_image(x: Tensor, channels: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{who} expects (N, {channels}, H, W), got {tuple(x.shape)}")


@functools.lru_cache(maxsize=1024)
def _axis_resize_norm(n_in: int, n_out: int) -> float:
    """Exact float64 spectral norm of 1-D linear resizing ``n_in -> n_out`` (``align_corners=False``).

    The matrix is read off torch's own bilinear interpolation applied to the identity along one
    axis (the other axis of size 1 is resized to size 1, which torch does with weight exactly 1).
    """
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    matrix = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False).reshape(n_in, n_out)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def bilinear_resize_norm(size_in: tuple[int, int], size_out: tuple[int, int]) -> float:
    """Sound float64 bound of ``||F.interpolate(., size_out, mode="bilinear", align_corners=False)||``.

    Bilinear resizing of one channel is separable, ``R = R_h (x) R_w``, so ``||R|| = ||R_h|| ||R_w||``
    (singular values of a Kronecker product multiply); every channel uses the same ``R``. Each
    factor is a small matrix whose norm is computed exactly by float64 SVD; the product is
    multiplied by ``1 + FLOAT64_SLACK``. Downsampling by 2 gives 0.5, upsampling by 2 gives 2.
    """
    (h_in, w_in), (h_out, w_out) = size_in, size_out
    return _axis_resize_norm(h_in, h_out) * _axis_resize_norm(w_in, w_out) * SLACK


class FeedbackGating(NormalizedModule):
    """dasNet-style feedback gating of the filters of ``conv1``, with a soft-clamped multiplicand.

    First pass: ``h = MaxMin(conv2(MaxMin(conv1(x))))`` (the top-level features the policy
    observes). Policy: one gate per filter of ``conv1``,
    ``g = sigmoid(W2 relu(W1 mean_hw(h) + b1) + b2)``. Second pass with gated filters:
    ``y = MaxMin(conv2(g * B tanh(MaxMin(conv1(x)) / B)))`` (``g`` broadcast over positions).
    ``conv1`` (3x3, ``in_channels -> channels``) and ``conv2`` (3x3, ``channels -> channels``) are
    zero-padded :class:`~lipnet.layers.BjorckConv2d`, bounded from their actual kernels.

    Bound (Lemma 1, blocks = the ``channels`` filter responses): the gated multiplicand
    ``u = B tanh(MaxMin(conv1 x) / B)`` has ``Lip(u) <= ||conv1||`` and block norms
    ``<= B sqrt(HW)``; the spatial mean is ``1 / sqrt(HW)``-Lipschitz per channel, so the gate
    logits are ``||W1|| ||W2|| ||conv1|| ||conv2|| / sqrt(HW)``-Lipschitz and the ``sqrt(HW)``
    factors cancel. With ``|g| <= 1`` and the final ``MaxMin(conv2 .)``:

        L = ||conv2|| * min(||conv1|| + B ||W1|| ||W2|| ||conv1|| ||conv2|| / 4, sigmoid-refined value)

    (refinement of :mod:`lipnet.attention._bounds`), with exact float64 spectral norms of ``W1``,
    ``W2``. Guarantee: ``L``-Lipschitz on all of R^n, for the given input size (convolution norms
    for that size) or for every size (``input_shape=None``); with ``normalize=True`` the output
    is divided by ``L`` and the module is at most 1-Lipschitz (up to the rounding of ``L``).
    One feedback pass is used; further passes compose the same bound.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        reduction: int = 2,
        clamp: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_maxmin_channels("channels", channels)
        check_int("reduction", reduction)
        if channels % reduction:
            raise ValueError(f"channels ({channels}) must be divisible by reduction ({reduction})")
        self.in_channels, self.channels = in_channels, channels
        self.clamp = check_positive("clamp", clamp)
        self.normalize = bool(normalize)
        self.conv1 = BjorckConv2d(in_channels, channels, 3, padding=1)
        self.conv2 = BjorckConv2d(channels, channels, 3, padding=1)
        self.act = MaxMin()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def _gate_from(self, responses: Tensor) -> Tensor:
        top = self.act(self.conv2(responses))
        return self.fc2(self.fc1(top.mean(dim=(2, 3))).relu()).sigmoid()

    def gate(self, x: Tensor) -> Tensor:
        """The filter gates ``g(x)`` in [0, 1], shape ``(N, channels)``."""
        _check_image(x, self.in_channels, type(self).__name__)
        return self._gate_from(self.act(self.conv1(x)))

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.in_channels, type(self).__name__)
        responses = self.act(self.conv1(x))
        gated = self._gate_from(responses)[:, :, None, None] * soft_clamp(responses, self.clamp)
        y = self.act(self.conv2(gated))
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        inner = None if input_shape is None else (self.channels, *input_shape[1:])
        conv1 = self.conv1.lipschitz_bound(input_shape)
        conv2 = self.conv2.lipschitz_bound(inner)
        c = self.clamp * spectral_norm(self.fc1.weight) * spectral_norm(self.fc2.weight) * (conv1 * conv2)
        return conv2 * sigmoid_gate_bound_tensor(c.new_tensor(conv1), c)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, clamp={self.clamp}, "
            f"normalize={self.normalize}"
        )


class AttentionToScale(NormalizedModule):
    """Attention to scale: per-pixel softmax fusion of one shared trunk's score maps at several scales.

    Trunk ``f = conv1x1(MaxMin(conv3x3(.)))`` (zero-padded :class:`~lipnet.layers.BjorckConv2d`,
    ``in_channels -> hidden -> out_channels``). For each scale ``s``: resize the input bilinearly
    to ``(round(s H), round(s W))`` (at least 1), run ``f``, resize back to ``(H, W)`` and project
    the score vector of every pixel onto the ball of radius ``rho``: ``v_s = Pi_rho(Up_s f Down_s x)``.
    Scale scores ``h = W_h [v_1; ...; v_S]`` (a 1x1 convolution ``S out_channels -> S``), weights
    ``p = softmax_s(h)`` per pixel, output ``z_i = sum_s p_{i,s} v_{i,s}``.

    Bound (Lemma 2 per pixel, re-derived). ``z - z' = sum_s p_s (v_s - v'_s) + sum_s (p_s - p'_s) v'_s``
    at every pixel. First part: by convexity ``||sum_s p_s dv_s||^2 <= sum_s p_s ||dv_s||^2 <=
    sum_s ||dv_s||^2`` per pixel; summed over pixels it is ``<= sum_s L_s^2 ||dx||^2`` with
    ``L_s = ||Up_s|| Lip(f) ||Down_s||`` (exact resize norms, :func:`bilinear_resize_norm`, and
    the trunk's convolution norms at that scale). Different pixels may pick different scales, so
    the root of the sum of squares, not the largest ``L_s``, is needed. Second part: along the
    segment of scores, ``V'^T J(q) dh = sum_s q_s (dh_s - mean_q dh) v'_s`` has norm
    ``<= rho sqrt(Var_q(dh)) <= rho ||dh|| / sqrt 2`` (Popoviciu); summed over pixels it is
    ``<= rho ||dh|| / sqrt 2`` with ``||dh|| <= ||W_h|| sqrt(sum_s L_s^2) ||dx||``. Hence

        L = sqrt(sum_s L_s^2) (1 + rho ||W_h|| / sqrt 2).

    Guarantee: ``L``-Lipschitz on all of R^{C x H x W} for the given input size. The resize norms
    depend on the size, so without an input shape ``lipschitz_bound()`` is ``inf`` (unless
    ``normalize=True``, where the forward divides by ``L`` for the actual input size and the
    module is at most 1-Lipschitz up to the rounding of ``L``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 8,
        scales: Sequence[float] = (1.0, 0.5),
        radius: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        check_maxmin_channels("hidden", hidden)
        scales = tuple(scales)
        if len(scales) < 2:
            raise ValueError(f"attention to scale needs at least two scales, got {scales!r}")
        self.scales = tuple(check_positive("scale", s) for s in scales)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        self.conv1 = BjorckConv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = BjorckConv2d(hidden, out_channels, 1)
        self.act = MaxMin()
        self.score = nn.Conv2d(len(self.scales) * out_channels, len(self.scales), 1)

    def _size(self, scale: float, h: int, w: int) -> tuple[int, int]:
        return max(1, round(scale * h)), max(1, round(scale * w))

    def scale_maps(self, x: Tensor) -> Tensor:
        """The projected score maps ``v_s``, shape ``(N, S, out_channels, H, W)``."""
        _check_image(x, self.in_channels, type(self).__name__)
        h, w = x.shape[2:]
        maps = []
        for s in self.scales:
            small = F.interpolate(x, size=self._size(s, h, w), mode="bilinear", align_corners=False)
            scores = self.conv2(self.act(self.conv1(small)))
            back = F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
            maps.append(ball_projection(back, self.radius, dim=1))
        return torch.stack(maps, dim=1)

    def attention(self, x: Tensor) -> Tensor:
        """The per-pixel scale weights ``p``, shape ``(N, S, H, W)``."""
        return self.score(self.scale_maps(x).flatten(1, 2)).softmax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        v = self.scale_maps(x)
        p = self.score(v.flatten(1, 2)).softmax(dim=1)
        z = (p.unsqueeze(2) * v).sum(dim=1)
        return self._normalized(z, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        w_h = spectral_norm(self.score.weight)
        if input_shape is None:
            # The resize norms depend on the size: no finite constant holds for every input size.
            return w_h.new_tensor(math.inf)
        c, h, w = input_shape
        squares = 0.0
        for s in self.scales:
            hs, ws = self._size(s, h, w)
            trunk = self.conv1.lipschitz_bound((c, hs, ws)) * self.conv2.lipschitz_bound(
                (self.conv1.out_channels, hs, ws)
            )
            branch = bilinear_resize_norm((h, w), (hs, ws)) * trunk * bilinear_resize_norm((hs, ws), (h, w))
            squares += branch * branch
        return math.sqrt(squares) * (1.0 + self.radius * w_h / math.sqrt(2.0)) * SLACK

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, scales={self.scales}, "
            f"radius={self.radius}, normalize={self.normalize}"
        )
