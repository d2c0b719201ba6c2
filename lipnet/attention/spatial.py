"""Lipschitz-bounded spatial attention: bounded translation, bounded zoom, soft glimpses.

A spatial transformer (Jaderberg et al., NeurIPS 2015) outputs ``V = S(theta(U)) U``: linear in
``U`` for a fixed transform, but ``theta`` depends on ``U``, and ``dV / dtheta`` is a sampled image
gradient, proportional to ``||U||``. So ``V`` is not Lipschitz on R^n, and a zoom-in
(RA-CNN, Fu, Zheng & Mei, CVPR 2017) also has ``||S(theta)||`` close to ``1 / scale``. The bounded
variants project the image onto an L2 ball of radius ``R`` (non-expansive), which bounds the image
gradient as well (``||D_x U|| <= 2 ||U|| <= 2R`` for the forward difference with zero padding), and
bound the transform: ``|shift| <= t_max`` pixels, ``scale >= s_min``.

Sampling bounds (bilinear, zero padding, ``align_corners=False``, axis-aligned grids). The
sampling matrix of one channel is ``M_y (x) M_x``. Along one axis the sample points are
``x_j = c + s j`` (pixels, spacing ``s``), and row ``j`` holds the hat weights
``max(0, 1 - |x_j - m|)``: non-negative, summing to at most 1. Column ``m`` sums to at most
``sum_j hat(a + j s)`` over a full lattice; by Poisson summation this periodic function has the
non-negative Fourier coefficients ``sinc^2(k / s) / s``, so its maximum is at ``a = 0``:
``Phi(s) = 1 + 2 sum_{k >= 1} max(0, 1 - k s)``, decreasing in ``s``, ``Phi(1) = 1``,
``Phi(1/2) = 2``. Hence ``||M_x|| <= sqrt(Phi(s_min))`` (``||A|| <= sqrt(||A||_1 ||A||_inf)``) and
``||S|| <= Phi(s_min)``. Almost everywhere the derivative of ``M_x`` in the shift has rows
``-1`` at ``floor(x_j)`` and ``+1`` at ``floor(x_j) + 1``: row sums 2, column sums at most the
number of sample points in a half-open interval of length 2, ``ceil(2 / s)``. So
``||dM_x / dc|| <= sqrt(2 ceil(2 / s_min))``; in the scale, row ``j`` is further multiplied by the
offset of output ``j`` from the centre, at most ``(W - 1) / 2``. ``S(theta) U'`` is continuous and
piecewise smooth in ``theta`` along a segment of the (convex) parameter box, so its change is at
most the supremum of these derivative norms times ``||U'||`` times the parameter change.

Hard attention is not Lipschitz. RAM / DRAM (Mnih et al., NeurIPS 2014; Ba et al., ICLR 2015)
take a glimpse at a location chosen by a policy, sampled or by argmax. Take two locations with
different content, ``G_1(x) != G_2(x)``, and scores ``h_1(x) - h_2(x)`` that change sign along a
segment: at the switching point ``x*``, points ``x* +- delta v`` glimpse different locations, so
``||f(x* + delta v) - f(x* - delta v)|| -> ||G_1(x*) - G_2(x*)|| > 0`` while their distance
``2 delta -> 0``: the ratio is unbounded (for sampling, the same holds for the realised glimpse;
only its expectation can be Lipschitz). :class:`SoftGlimpse` is the soft relaxation: the expected
glimpse under a softmax over locations, bounded by Lemma 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    ball_projection,
    check_int,
    check_positive,
    spectral_norm,
)

__all__ = ["BoundedTranslation", "BoundedZoom", "SoftGlimpse", "sampling_column_sum"]


def sampling_column_sum(min_scale: float) -> float:
    """``Phi(s) = 1 + 2 sum_{k >= 1} max(0, 1 - k s)``: the largest column sum of 1-D bilinear sampling.

    Valid for every sample spacing ``s >= min_scale`` and every offset (see the module docstring);
    multiplied by ``1 + FLOAT64_SLACK``.
    """
    s = check_positive("min_scale", min_scale)
    total = 1.0 + 2.0 * sum(max(0.0, 1.0 - k * s) for k in range(1, math.ceil(1.0 / s) + 1))
    return total * SLACK


def _project_image(u: Tensor, radius: float) -> Tensor:
    """Each sample (all channels and pixels) onto the L2 ball of ``radius``: non-expansive."""
    return ball_projection(u.flatten(1), radius, dim=1).view_as(u)


def _axis_weights(positions: Tensor, size: int) -> Tensor:
    """1-D bilinear weights ``max(0, 1 - |x_j - m|)``, shape ``(N, outputs, size)``; zero outside."""
    pixels = torch.arange(size, dtype=positions.dtype, device=positions.device)
    return (1.0 - (positions.unsqueeze(-1) - pixels).abs()).clamp_min(0.0)


def _sample(u: Tensor, shift: Tensor, scale: Tensor | None) -> Tensor:
    """Bilinear, zero-padded sampling at ``x_j = (W - 1) / 2 + c_x + s (j - (W - 1) / 2)`` (pixels).

    ``shift``: ``(N, 2)`` as ``(c_x, c_y)`` in pixels; ``scale``: ``(N,)`` or ``None`` (``s = 1``).
    The grid is axis-aligned, so the sampling is separable, ``V_c = M_y U_c M_x^T``: the same
    values as ``F.grid_sample(..., align_corners=False, padding_mode="zeros")``, written with the
    weights explicitly so that forward-mode differentiation works too.
    """
    n, _, h, w = u.shape
    rel_y = torch.arange(h, dtype=u.dtype, device=u.device) - (h - 1) / 2
    rel_x = torch.arange(w, dtype=u.dtype, device=u.device) - (w - 1) / 2
    s = u.new_ones(n) if scale is None else scale
    pos_y = (h - 1) / 2 + shift[:, 1:2] + s[:, None] * rel_y
    pos_x = (w - 1) / 2 + shift[:, 0:1] + s[:, None] * rel_x
    return torch.einsum("nih,nchw,njw->ncij", _axis_weights(pos_y, h), u, _axis_weights(pos_x, w))


class _LocalisedSampler(NormalizedModule):
    """Shared parts: fixed input size, localisation MLP ``g``, image projection onto a ball."""

    def __init__(
        self, channels: int, input_size: int | tuple[int, int], hidden: int, outputs: int, radius: float
    ) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("hidden", hidden)
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2:
            raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
        self.input_size = (check_int("input height", size[0]), check_int("input width", size[1]))
        self.channels = channels
        self.radius = check_positive("radius", radius)
        self.loc1 = nn.Linear(channels * self.input_size[0] * self.input_size[1], hidden)
        self.loc2 = nn.Linear(hidden, outputs)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.channels, *self.input_size):
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.channels}, {self.input_size[0]}, "
                f"{self.input_size[1]}), got {tuple(x.shape)}"
            )

    def _shape(self, input_shape: tuple[int, ...] | None) -> None:
        if input_shape is not None and tuple(input_shape) != (self.channels, *self.input_size):
            raise ValueError(
                f"{type(self).__name__} is built for {(self.channels, *self.input_size)}, got {input_shape}"
            )

    def _localise(self, x: Tensor) -> Tensor:
        return self.loc2(self.loc1(x.flatten(1)).relu())

    def _loc_lipschitz(self) -> Tensor:
        return spectral_norm(self.loc1.weight) * spectral_norm(self.loc2.weight)


class BoundedTranslation(_LocalisedSampler):
    """Spatial transformer restricted to a bounded translation, on an image projected to radius ``R``.

    ``t = t_max tanh(g(U))`` (pixels, ``g = W2 relu(W1 vec(U) + b1) + b2``), ``U~ = Pi_R(U)``,
    ``V = S(t) U~`` (bilinear, zero padding). Lemma 1 style split,
    ``V - V' = S(t) (U~ - U~') + (S(t) - S(t')) U~'``: ``||S(t)|| <= 1`` (``Phi(1) = 1``), and
    ``||dV / dt_x|| <= ||D_x U~'|| <= 2R`` (a convex combination of forward differences), the
    same for ``t_y``, with ``||dt|| <= t_max ||W1|| ||W2|| ||dU||``. Hence

        L = 1 + 2 sqrt(2) R t_max ||W1|| ||W2||

    (exact float64 spectral norms). The image-gradient term is why the projection is needed:
    a one-pixel shift moves an image by up to ``2 ||U||``. Guarantee: ``L``-Lipschitz on all of
    R^{C x H x W}; with ``normalize=True`` at most 1-Lipschitz (up to the rounding of ``L``).
    """

    def __init__(
        self,
        channels: int,
        input_size: int | tuple[int, int],
        hidden: int = 16,
        max_shift: float = 2.0,
        radius: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__(channels, input_size, hidden, 2, radius)
        self.max_shift = check_positive("max_shift", max_shift)
        self.normalize = bool(normalize)

    def shift(self, x: Tensor) -> Tensor:
        """The predicted translation ``(t_x, t_y)`` in pixels, shape ``(N, 2)``."""
        self._check(x)
        return self.max_shift * torch.tanh(self._localise(x))

    def forward(self, x: Tensor) -> Tensor:
        y = _sample(_project_image(x, self.radius), self.shift(x), None)
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        self._shape(input_shape)
        moving = 2.0 * math.sqrt(2.0) * self.radius * self.max_shift * self._loc_lipschitz()
        return (sampling_column_sum(1.0) + moving) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, input_size={self.input_size}, max_shift={self.max_shift}, "
            f"radius={self.radius}, normalize={self.normalize}"
        )


class BoundedZoom(_LocalisedSampler):
    """RA-CNN-style zoom (attention proposal: centre and scale) with a bounded scale and shift.

    ``g(U) = W2 relu(W1 vec(U) + b1) + b2`` in R^3; centre ``c = t_max tanh(g_{0,1})`` pixels from
    the image centre, scale ``s = s_min + (1 - s_min) sigmoid(g_2)`` in ``[s_min, 1]`` (the zoomed
    region's side over the image's), ``V = S(c, s) Pi_R(U)`` sampled at the output size.

    Bound (module docstring's sampling lemmas, with ``K = sqrt(Phi(s_min) 2 ceil(2 / s_min))``):
    ``||S|| <= Phi(s_min)``; ``||dV / dc_x||, ||dV / dc_y|| <= K R``;
    ``||dV / ds|| <= K R ((H - 1) + (W - 1)) / 2``; ``|dc_k| <= t_max |dg_k|``,
    ``|ds| <= (1 - s_min) |dg_2| / 4``. By Cauchy-Schwarz over the three parameters,

        L = Phi(s_min) + K R sqrt(2 t_max^2 + ((1 - s_min) (H + W - 2) / 8)^2) ||W1|| ||W2||,

    which is ``1 + 2 sqrt 2 R t_max ||W1|| ||W2||`` (:class:`BoundedTranslation`) at ``s_min = 1``.
    Zooming in costs ``Phi(s_min) ~ 1 / s_min`` (the sampling reads pixels several times) and a
    scale term growing with the image side. Guarantee: ``L``-Lipschitz on all of R^{C x H x W};
    with ``normalize=True`` at most 1-Lipschitz (up to the rounding of ``L``).
    """

    def __init__(
        self,
        channels: int,
        input_size: int | tuple[int, int],
        hidden: int = 16,
        max_shift: float = 2.0,
        min_scale: float = 0.5,
        radius: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__(channels, input_size, hidden, 3, radius)
        self.max_shift = check_positive("max_shift", max_shift)
        self.min_scale = check_positive("min_scale", min_scale)
        if self.min_scale > 1.0:
            raise ValueError(f"min_scale must be in (0, 1] (a zoom in), got {min_scale!r}")
        self.normalize = bool(normalize)

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(centre (N, 2) in pixels, scale (N,) in [s_min, 1])``."""
        self._check(x)
        g = self._localise(x)
        centre = self.max_shift * torch.tanh(g[:, :2])
        scale = self.min_scale + (1.0 - self.min_scale) * torch.sigmoid(g[:, 2])
        return centre, scale

    def forward(self, x: Tensor) -> Tensor:
        centre, scale = self.transform(x)
        y = _sample(_project_image(x, self.radius), centre, scale)
        return self._normalized(y, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        self._shape(input_shape)
        h, w = self.input_size
        phi = sampling_column_sum(self.min_scale)
        k = math.sqrt(phi * 2.0 * math.ceil(2.0 / self.min_scale))
        params = math.sqrt(2.0 * self.max_shift**2 + ((1.0 - self.min_scale) * (h + w - 2) / 8.0) ** 2)
        return (phi + k * self.radius * params * self._loc_lipschitz() * SLACK) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, input_size={self.input_size}, max_shift={self.max_shift}, "
            f"min_scale={self.min_scale}, radius={self.radius}, normalize={self.normalize}"
        )


def _cover_count(size: int | None, window: int, stride: int) -> int:
    """Largest number of windows (``window``, ``stride``, no padding) covering one index."""
    if size is None:
        return math.ceil(window / stride)
    starts = range(0, size - window + 1, stride)
    return max(sum(1 for s in starts if s <= i < s + window) for i in range(size))


class SoftGlimpse(NormalizedModule):
    """Soft relaxation of hard glimpse attention: the expected glimpse under a softmax over locations.

    ``U~ = Pi_R(U)`` (whole sample onto the ball of radius ``R``); locations are the ``K`` windows
    of ``glimpse x glimpse`` pixels at stride ``stride``; glimpse ``k`` is ``G_k = crop_k(U~)``;
    scores ``h_k = w^T vec(G_k)``; output ``z = sum_k softmax(h)_k G_k`` (``(C, glimpse, glimpse)``).

    Bound (Lemma 2 with centre 0): every glimpse has ``||G_k|| <= ||U~|| <= R``; the stacked crops
    are ``sqrt(m)``-Lipschitz in Frobenius norm, ``m`` the largest number of windows covering
    one pixel (exact for the input size, ``ceil(glimpse / stride)^2`` for every size), so the values
    move by ``<= sqrt(m) ||dU||`` and the scores by ``<= ||w|| sqrt(m) ||dU||``. Hence

        L = sqrt(m) (1 + R ||w|| / sqrt 2).

    Guarantee: ``L``-Lipschitz on all of R^{C x H x W}; with ``normalize=True`` at most
    1-Lipschitz (up to the rounding of ``L``). Its hard counterpart (argmax or sampled location)
    is not Lipschitz at all (module docstring).
    """

    def __init__(
        self, channels: int, glimpse: int, stride: int = 1, radius: float = 1.0, normalize: bool = True
    ) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.glimpse = check_int("glimpse", glimpse)
        self.stride = check_int("stride", stride)
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        # no bias: a score offset common to all locations cancels in the softmax
        self.score = nn.Linear(channels * glimpse * glimpse, 1, bias=False)

    def _glimpses(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels or min(x.shape[2:]) < self.glimpse:
            raise ValueError(
                f"SoftGlimpse expects (N, {self.channels}, H, W) with H, W >= {self.glimpse}, "
                f"got {tuple(x.shape)}"
            )
        patches = F.unfold(_project_image(x, self.radius), self.glimpse, stride=self.stride)
        return patches.transpose(1, 2)  # (N, K, C g g)

    def attention(self, x: Tensor) -> Tensor:
        """The location weights, shape ``(N, K)`` (windows in row-major order)."""
        return self.score(self._glimpses(x)).squeeze(-1).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        g = self._glimpses(x)
        p = self.score(g).squeeze(-1).softmax(dim=-1)
        z = (p.unsqueeze(-1) * g).sum(dim=1).unflatten(1, (self.channels, self.glimpse, self.glimpse))
        return self._normalized(z, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        hw = (None, None) if input_shape is None else input_shape[1:]
        m = math.prod(_cover_count(n, self.glimpse, self.stride) for n in hw)
        return math.sqrt(m) * (1.0 + self.radius * spectral_norm(self.score.weight) / math.sqrt(2.0)) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, glimpse={self.glimpse}, stride={self.stride}, "
            f"radius={self.radius}, normalize={self.normalize}"
        )
