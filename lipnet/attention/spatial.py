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

Proofs: ``docs/proofs/attention.md`` (``#lemma-sampling``, ``#lemma-bounded-translation``,
``#lemma-bounded-zoom``, ``#lemma-soft-glimpse``).
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
    """Shared parts: fixed input size, localisation MLP ``g``, image projection onto a ball.

    With ``transform_bound`` the two layers of ``g`` are spectrally normalised (Miyato et al., ICLR
    2018), the second times the gain ``transform_bound / c`` where ``c`` is the subclass's coefficient
    in ``L = Phi(s_min) + c Lip(g)``; otherwise ``g`` uses its weights as trained.
    """

    def __init__(
        self,
        channels: int,
        input_size: int | tuple[int, int],
        hidden: int,
        outputs: int,
        radius: float,
        transform_bound: float | None,
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
        self.transform_bound = (
            None if transform_bound is None else check_positive("transform_bound", transform_bound)
        )
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

    def _transform_coefficient(self) -> float:
        """``c`` in ``L = Phi(s_min) + c Lip(g)``: what one unit of ``Lip(g)`` costs."""
        raise NotImplementedError

    def _loc_weights(self) -> tuple[Tensor, Tensor]:
        """The weights of ``g`` that the forward uses (and that the bound is computed from)."""
        w1, w2 = self.loc1.weight, self.loc2.weight
        if self.transform_bound is None:
            return w1, w2
        # Left free, Adam's per-coordinate steps grow ||W1|| ||W2||, and the bound with it, about
        # fourfold within the first epoch of the catalogue's task: normalising fixes Lip(g).
        gain = self.transform_bound / self._transform_coefficient()
        return w1 / spectral_norm(w1).to(w1.dtype), w2 * (gain / spectral_norm(w2).to(w2.dtype))

    def _localise(self, x: Tensor) -> Tensor:
        w1, w2 = self._loc_weights()
        return F.linear(F.linear(x.flatten(1), w1, self.loc1.bias).relu(), w2, self.loc2.bias)

    def _loc_lipschitz(self) -> Tensor:
        w1, w2 = self._loc_weights()
        return spectral_norm(w1) * spectral_norm(w2)


class BoundedTranslation(_LocalisedSampler):
    """Spatial transformer restricted to a bounded translation, on an image projected to radius ``R``.

    ``t = t_max tanh(g(U))`` (pixels, ``g = W2 relu(W1 vec(U) + b1) + b2``), ``U~ = Pi_R(U)``,
    ``V = S(t) U~`` (bilinear, zero padding). Lemma 1 style split,
    ``V - V' = S(t) (U~ - U~') + (S(t) - S(t')) U~'``: ``||S(t)|| <= 1`` (``Phi(1) = 1``), and
    ``||dV / dt_x|| <= ||D_x U~'|| <= 2R`` (a convex combination of forward differences), the
    same for ``t_y``, with ``||dt|| <= t_max ||W1|| ||W2|| ||dU||``. Hence

        L = 1 + 2 sqrt(2) R t_max ||W1|| ||W2||

    (exact float64 spectral norms). The image-gradient term is why the projection is needed:
    a one-pixel shift moves an image by up to ``2 ||U||``. With ``transform_bound=b`` both layers are
    spectrally normalised and ``W2`` scaled so that the second term is ``b``: ``L = 1 + b`` (from the
    normalised weights, up to rounding). The price of that is inherent, not a slack of the proof:
    for two inputs in the ball, ``|t - t'| <= b ||U - U'|| / (2 sqrt 2 R) <= b / sqrt 2`` pixels, so
    a cheap transform is an almost input-independent one (the bias ``b2`` still sets a fixed shift).
    Guarantee: ``L``-Lipschitz on all of R^{C x H x W}; with ``normalize=True`` at most 1-Lipschitz
    (up to the rounding of ``L``).
    """

    def __init__(
        self,
        channels: int,
        input_size: int | tuple[int, int],
        hidden: int = 16,
        max_shift: float = 2.0,
        radius: float = 1.0,
        normalize: bool = True,
        transform_bound: float | None = None,
    ) -> None:
        super().__init__(channels, input_size, hidden, 2, radius, transform_bound)
        self.max_shift = check_positive("max_shift", max_shift)
        self.normalize = bool(normalize)

    def shift(self, x: Tensor) -> Tensor:
        """The predicted translation ``(t_x, t_y)`` in pixels, shape ``(N, 2)``."""
        self._check(x)
        return self.max_shift * torch.tanh(self._localise(x))

    def forward(self, x: Tensor) -> Tensor:
        y = _sample(_project_image(x, self.radius), self.shift(x), None)
        return self._normalized(y, tuple(x.shape[1:]))

    def _transform_coefficient(self) -> float:
        return 2.0 * math.sqrt(2.0) * self.radius * self.max_shift

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        self._shape(input_shape)
        moving = self._transform_coefficient() * self._loc_lipschitz() * SLACK
        return (sampling_column_sum(1.0) + moving) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, input_size={self.input_size}, max_shift={self.max_shift}, "
            f"radius={self.radius}, normalize={self.normalize}, transform_bound={self.transform_bound}"
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
    scale term growing with the image side. With ``transform_bound=b`` the localisation net is
    spectrally normalised with the gain that makes the second term ``b``: ``L = Phi(s_min) + b``
    (from the normalised weights, up to rounding), the first term being what even a constant zoom
    costs. Guarantee: ``L``-Lipschitz on all of R^{C x H x W}; with ``normalize=True`` at most
    1-Lipschitz (up to the rounding of ``L``).
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
        transform_bound: float | None = None,
    ) -> None:
        super().__init__(channels, input_size, hidden, 3, radius, transform_bound)
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

    def _transform_coefficient(self) -> float:
        h, w = self.input_size
        k = math.sqrt(sampling_column_sum(self.min_scale) * 2.0 * math.ceil(2.0 / self.min_scale))
        params = math.sqrt(2.0 * self.max_shift**2 + ((1.0 - self.min_scale) * (h + w - 2) / 8.0) ** 2)
        return k * self.radius * params

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        self._shape(input_shape)
        moving = self._transform_coefficient() * self._loc_lipschitz() * SLACK
        return (sampling_column_sum(self.min_scale) + moving) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, input_size={self.input_size}, max_shift={self.max_shift}, "
            f"min_scale={self.min_scale}, radius={self.radius}, normalize={self.normalize}, "
            f"transform_bound={self.transform_bound}"
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

    Bound (Lemma 2 with centre 0, re-derived). ``z - z' = sum_k p_k (G_k - G'_k) + sum_k (p_k - p'_k)
    G'_k``. The first part is a convex combination of crops (coordinate restrictions, norm 1) of
    ``U~ - U~'``: at most ``||dU||``. For the second, along the score segment,
    ``sum_k q_k (dh_k - mean_q dh) G'_k`` has norm ``<= R sqrt(Var_q dh) <= R min(1 / sqrt 2,
    sqrt(max q)) ||dh||`` (``||G'_k|| <= R``; Popoviciu; ``Var_q <= max q ||dh||^2``), and
    ``||dh|| <= ||w|| sqrt(m) ||dU||``: the stacked crops are ``sqrt(m)``-Lipschitz in Frobenius norm,
    ``m`` the largest number of windows covering one pixel (exact for the input size,
    ``ceil(glimpse / stride)^2`` for every size). The scores lie in ``[-R ||w||, R ||w||]``, so
    ``max q <= 1 / (1 + (K - 1) e^{-2 R ||w||})``. Hence

        L = 1 + sqrt(m) R ||w|| min(1 / sqrt 2, (1 + (K - 1) e^{-2 R ||w||})^{-1/2})

    (``1 / sqrt 2`` when the size, hence ``K``, is unknown). With ``attention_bound=b`` the score
    vector is normalised, ``w = gain v / ||v||`` with ``gain = sqrt 2 b / (sqrt(m) R)`` for the input's
    size, so that ``L <= 1 + b`` for every size: the scores then differ by at most
    ``2 R gain = 2 sqrt 2 b / sqrt(m)`` between locations, a soft choice that sharpens only as fast
    as its price. Guarantee: ``L``-Lipschitz on all of R^{C x H x W}; with ``normalize=True`` at most
    1-Lipschitz (up to the rounding of ``L``). Its hard counterpart (argmax or sampled location) is
    not Lipschitz at all (module docstring).
    """

    def __init__(
        self,
        channels: int,
        glimpse: int,
        stride: int = 1,
        radius: float = 1.0,
        normalize: bool = True,
        attention_bound: float | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.glimpse = check_int("glimpse", glimpse)
        self.stride = check_int("stride", stride)
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        self.attention_bound = (
            None if attention_bound is None else check_positive("attention_bound", attention_bound)
        )
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

    def _cover(self, hw: tuple[int | None, ...]) -> int:
        """``m``: the largest number of windows covering one pixel, for ``(H, W)`` or every size."""
        return math.prod(_cover_count(n, self.glimpse, self.stride) for n in hw)

    def _score_weight(self, hw: tuple[int | None, ...]) -> Tensor:
        """The score vector the forward uses on inputs of size ``hw`` (and the bound is computed from)."""
        v = self.score.weight
        if self.attention_bound is None:
            return v
        # As for the spatial transformers' localisation net: left free, Adam's steps grow ||w|| (and the
        # bound) many times over. The gain depends on the size only through m, and sqrt(m) * gain is the
        # same for every size, so the every-size bound 1 + attention_bound holds for each size too.
        gain = math.sqrt(2.0) * self.attention_bound / (math.sqrt(self._cover(hw)) * self.radius)
        return v * (gain / spectral_norm(v).to(v.dtype))

    def _weights(self, glimpses: Tensor, hw: tuple[int, ...]) -> Tensor:
        return F.linear(glimpses, self._score_weight(hw)).squeeze(-1).softmax(dim=-1)

    def attention(self, x: Tensor) -> Tensor:
        """The location weights, shape ``(N, K)`` (windows in row-major order)."""
        return self._weights(self._glimpses(x), tuple(x.shape[2:]))

    def forward(self, x: Tensor) -> Tensor:
        g = self._glimpses(x)
        p = self._weights(g, tuple(x.shape[2:]))
        z = (p.unsqueeze(-1) * g).sum(dim=1).unflatten(1, (self.channels, self.glimpse, self.glimpse))
        return self._normalized(z, tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        hw: tuple[int | None, ...] = (
            (None, None) if input_shape is None else tuple(int(n) for n in input_shape[1:])
        )
        m = self._cover(hw)
        w = spectral_norm(self._score_weight(hw))
        spread = w.new_tensor(1.0 / math.sqrt(2.0))
        if input_shape is not None:
            k = math.prod((int(n) - self.glimpse) // self.stride + 1 for n in input_shape[1:])
            peak = (1.0 + (k - 1) * torch.exp(-2.0 * self.radius * w)).rsqrt() * SLACK
            spread = torch.minimum(spread, peak)
        return (1.0 + math.sqrt(m) * self.radius * w * spread * SLACK) * SLACK

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, glimpse={self.glimpse}, stride={self.stride}, "
            f"radius={self.radius}, normalize={self.normalize}, attention_bound={self.attention_bound}"
        )
