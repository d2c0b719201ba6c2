"""Lipschitz-bounded multi-scale attention aggregation (Sarafianos, Xu & Kakadiaris, ECCV 2018).

Sarafianos et al. extract attention masks ``A_s(F_s)`` in [0, 1] at several scales ``s`` of a
backbone, pool each attended feature map ``A_s * F_s``, classify it into per-attribute logits and
aggregate the branch logits with those of the primary network (by max or mean). Each attended map
is a product of two input-dependent maps, hence not Lipschitz (the squeeze-and-excitation
counterexample applies to every branch). The bounded variant ("LipMSA") bounds the multiplicand
with a per-pixel ball projection or a soft clamp and applies Lemma 1 per scale
(``docs/proofs/attention.md#lemma-multiscale``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from certify.rules.conv import conv_operator_bound
from lipnet.activations import MaxMin
from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    ball_projection,
    check_int,
    check_maxmin_channels,
    check_odd_kernel,
    check_positive,
    rescaled,
    sigmoid_gate_bound_tensor,
    soft_clamp,
    spectral_norm,
)
from lipnet.layers import BjorckConv2d, BjorckLinear

__all__ = ["MultiScaleAttentionAggregation"]

_MASKS = ("spatial", "elementwise")
_AGGREGATES = ("mean", "max")


class MultiScaleAttentionAggregation(NormalizedModule):
    """LipMSA: attention branches at several scales of one feature map, aggregated into attribute logits.

    **Input.** One feature map ``x`` of shape ``(N, C, H, W)``; the module builds the scales itself:
    ``F_0 = x``, ``F_s = MaxMin(D_s F_{s-1})`` with ``D_s`` a 2x2, stride-2
    :class:`~lipnet.layers.BjorckConv2d` (``C -> C``, non-overlapping windows, so every pixel is read
    once), ``s = 1 .. scales-1``: the stages of a small 1-Lipschitz backbone at halving resolutions,
    as Sarafianos et al. tap the stages of a ResNet. A list of externally computed maps would need a
    per-map Lipschitz constant from the caller, a list-valued ``input_shape`` and a forward that
    ``nn.Sequential`` cannot feed; one map in, logits out composes like any other head and is
    bounded from its own weights.

    **Branches.** For every scale, with ``rho`` the ``radius``:

    * mask logits ``z_s = K_s * F_s`` (a ``k x k`` zero-padded convolution with one output channel
      for ``mask="spatial"``, ``C`` for ``mask="elementwise"``), mask ``g_s = sigmoid(z_s)``;
    * multiplicand ``u_s = Pi_rho(F_s)`` (each pixel's ``C``-vector projected onto the ball of radius
      ``rho``) for spatial masks, ``rho tanh(F_s / rho)`` for elementwise masks;
    * ``v_s = sqrt(H_s W_s) GAP(g_s * u_s)`` (the sum over pixels over ``sqrt(H_s W_s)``,
      1-Lipschitz) and logits ``y_s = W_s v_s + b_s`` (:class:`~lipnet.layers.BjorckLinear`,
      ``C -> A``);

    plus the primary branch ``y_p = W_p sqrt(HW) GAP(F_{S-1}) + b_p`` on the coarsest features.

    **Bound (Lemma 1, re-derived).** Let ``P_s = prod_{r <= s} ||D_r||`` (sound operator-norm bounds of
    the actual kernels; ``P_0 = 1``), so ``Lip(F_s) <= P_s``. Blocks are pixels (spatial masks, the
    projected pixel vector has norm ``<= rho``) or single entries (elementwise, ``|rho tanh| < rho``);
    in both cases ``|g| <= 1``, ``Lip(u_s) <= P_s`` (projection and soft clamp are 1-Lipschitz) and
    ``Lip(z_s) <= ||K_s|| P_s``, hence

        M_s = min(P_s (1 + rho ||K_s|| / 4), sigmoid-refined value)

    (:func:`~lipnet.attention._bounds.sigmoid_gate_bound`). An elementwise clamp would give
    ``P_s (1 + B sqrt(C) ||K_s|| / 4)`` for spatial masks: that is the same lemma with an elementwise
    clamp at ``B`` (pixel blocks of norm ``B sqrt(C)``); the ball projection used here removes the
    ``sqrt(C)``. Branch ``b`` has ``L_b = ||W_b|| M_b`` (``M_p = P_{S-1}``) and attribute ``c`` of
    branch ``b`` has ``L_bc = ||w_bc|| M_b`` (row norm; float64, times ``1 + FLOAT64_SLACK``).

    **Aggregation over the ``S + 1`` branches**, and what :meth:`lipschitz_bound` returns (always the
    L2 Lipschitz constant of the whole logit vector, which is what ``certify.bounds`` composes):

    * ``aggregate="mean"``: ``f = mean_b y_b``; ``L = mean_b L_b`` (triangle inequality) and, per
      attribute, ``L_c = mean_b L_bc``. For vector (multi-class style) certificates.
    * ``aggregate="max"``: ``f_c = max_b y_bc``; ``|max_b a_b - max_b a'_b| <= max_b |a_b - a'_b|``
      gives ``L_c = max_b L_bc`` per attribute, and for the vector
      ``L = min(sqrt(sum_b L_b^2), sqrt(sum_c L_c^2))`` (``max_b |d_bc| <= sqrt(sum_b d_bc^2)``
      summed over ``c``; or the per-attribute bounds squared and summed). For per-attribute
      certificates ``radius_c = |f_c| / L_c``: :meth:`attribute_lipschitz_bounds`, never larger than
      ``L`` and usually smaller (by up to ``sqrt(A)``).

    Guarantee: the logits are ``L``-Lipschitz on all of R^n and logit ``c`` is ``L_c``-Lipschitz, for
    the given input size (convolution bounds for that size) or for every size (``input_shape=None``).
    With ``normalize=True`` the output (and :meth:`branch_logits`) is divided by ``L`` for the actual
    input size: the logits are at most 1-Lipschitz (up to the rounding of ``L`` to the module dtype)
    and logit ``c`` is ``L_c / L``-Lipschitz (certified radii ``|f_c| / L_c`` are unchanged by the
    division). The per-scale normalisation ``kappa_s`` of the notes is not used: one division of the
    aggregate keeps the max-mode branches comparable (no branch is rescaled against the others) and
    makes both modes 1-Lipschitz. The losses of the paper (weighted focal on ``f``, the
    attention-variance loss on each :meth:`branch_logits` entry) do not change any constant.
    """

    def __init__(
        self,
        channels: int,
        num_attributes: int,
        scales: int = 3,
        mask: str = "spatial",
        kernel_size: int = 3,
        radius: float = 1.0,
        aggregate: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_maxmin_channels("channels", channels)
        check_int("num_attributes", num_attributes)
        check_int("scales", scales)
        check_odd_kernel(kernel_size)
        if mask not in _MASKS:
            raise ValueError(f"mask must be one of {_MASKS}, got {mask!r}")
        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
        self.channels, self.num_attributes, self.scales = channels, num_attributes, scales
        self.mask, self.aggregate = mask, aggregate
        self.radius = check_positive("radius", radius)
        self.normalize = bool(normalize)
        self.downs = nn.ModuleList(BjorckConv2d(channels, channels, 2, stride=2) for _ in range(scales - 1))
        self.act = MaxMin()
        mask_channels = 1 if mask == "spatial" else channels
        self.mask_convs = nn.ModuleList(
            nn.Conv2d(channels, mask_channels, kernel_size, padding=kernel_size // 2) for _ in range(scales)
        )
        self.heads = nn.ModuleList(BjorckLinear(channels, num_attributes) for _ in range(scales))
        self.primary = BjorckLinear(channels, num_attributes)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        self._scale_shapes(tuple(x.shape[1:]))

    def _scale_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """Per-sample ``(C, H_s, W_s)`` of every scale (each stride-2 stage floors the size)."""
        if len(input_shape) != 3 or input_shape[0] != self.channels:
            raise ValueError(f"input_shape must be ({self.channels}, H, W), got {input_shape!r}")
        smallest = 2 ** (self.scales - 1)
        if input_shape[1] < smallest or input_shape[2] < smallest:
            raise ValueError(
                f"{type(self).__name__} with {self.scales} scales needs H, W >= {smallest}, "
                f"got {input_shape!r}"
            )
        return [(self.channels, input_shape[1] >> s, input_shape[2] >> s) for s in range(self.scales)]

    def _features(self, x: Tensor) -> list[Tensor]:
        features = [x]
        for down in self.downs:
            features.append(self.act(down(features[-1])))
        return features

    def _multiplicand(self, f: Tensor) -> Tensor:
        if self.mask == "spatial":
            return ball_projection(f, self.radius, dim=1)
        return soft_clamp(f, self.radius)

    def masks(self, x: Tensor) -> list[Tensor]:
        """The attention mask of every scale: ``(N, 1 or C, H_s, W_s)`` in [0, 1], finest first."""
        self._check(x)
        return [conv(f).sigmoid() for conv, f in zip(self.mask_convs, self._features(x), strict=True)]

    def _raw_branches(self, x: Tensor) -> list[Tensor]:
        features = self._features(x)
        branches = []
        for conv, head, f in zip(self.mask_convs, self.heads, features, strict=True):
            attended = conv(f).sigmoid() * self._multiplicand(f)
            branches.append(head(attended.sum(dim=(2, 3)) / math.sqrt(f.shape[2] * f.shape[3])))
        last = features[-1]
        branches.append(self.primary(last.sum(dim=(2, 3)) / math.sqrt(last.shape[2] * last.shape[3])))
        return branches

    def _aggregated(self, branches: list[Tensor]) -> Tensor:
        stacked = torch.stack(branches, dim=1)
        return stacked.mean(dim=1) if self.aggregate == "mean" else stacked.amax(dim=1)

    def branch_logits(self, x: Tensor) -> tuple[Tensor, ...]:
        """Logits ``(N, A)`` of every branch (scales finest first, then the primary branch).

        Divided by the same ``L`` as :meth:`forward` when normalising, so that their mean (or
        per-attribute max) is exactly the output; each is what the attention-variance loss reads.
        """
        self._check(x)
        branches = self._raw_branches(x)
        if not self.normalize:
            return tuple(branches)
        divisor = self._divisor(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return tuple(b / divisor for b in branches)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self._normalized(self._aggregated(self._raw_branches(x)), tuple(x.shape[1:]))

    def _branch_bounds(self, input_shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        """``(L_b, L_bc)``: float64 ``(S + 1,)`` and ``(S + 1, A)``, differentiable in the weights."""
        shapes = None if input_shape is None else self._scale_shapes(input_shape)
        prefix = torch.tensor(1.0, dtype=torch.float64, device=self.primary.weight.device)
        gated = []
        # nn.ModuleList is typed as holding Module; these hold the classes built in __init__.
        downs = cast("list[BjorckConv2d]", list(self.downs))
        for s, conv in enumerate(cast("list[nn.Conv2d]", list(self.mask_convs))):
            shape = None if shapes is None else shapes[s]
            if s > 0:
                previous = None if shapes is None else shapes[s - 1]
                prefix = prefix * downs[s - 1].lipschitz_bound(previous)
            kernel = rescaled(
                conv_operator_bound(conv.weight.detach(), padding=conv.padding, input_shape=shape),
                conv.weight.to(torch.float64).norm(),
            )
            gated.append(sigmoid_gate_bound_tensor(prefix, self.radius * kernel * prefix))
        gated.append(prefix)
        heads = [*self.heads, self.primary]
        factors = torch.stack(gated)
        vector = factors * torch.stack([spectral_norm(h.weight) for h in heads])
        rows = torch.stack([h.weight.to(torch.float64).norm(dim=1) * SLACK for h in heads])
        return vector, rows * factors[:, None]

    def _raw_attribute_bounds(self, input_shape: tuple[int, ...] | None) -> Tensor:
        _, per_attribute = self._branch_bounds(input_shape)
        if self.aggregate == "mean":
            return per_attribute.mean(dim=0) * SLACK
        return per_attribute.amax(dim=0)

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        vector, per_attribute = self._branch_bounds(input_shape)
        if self.aggregate == "mean":
            return vector.mean() * SLACK
        by_branch = torch.sqrt((vector * vector).sum())
        by_attribute = torch.sqrt((per_attribute.amax(dim=0) ** 2).sum())
        return torch.minimum(by_branch, by_attribute) * SLACK

    def attribute_lipschitz_bounds(self, input_shape: tuple[int, ...] | None = None) -> Tensor:
        """Sound float64 bounds ``(A,)`` of each output logit's Lipschitz constant (on CPU).

        Certify attribute ``c`` with ``|f_c(x)| / bound_c`` (no ``sqrt 2``). With ``normalize=True``
        they are ``L_c / fl(L)`` for the given size, and without a size the bound of the whole
        output (each ``L_c <= L``, so ``L_c / fl(L) <= L / fl(L)``).
        """
        shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        with torch.no_grad():
            raw = self._raw_attribute_bounds(shape).cpu()
            if not self.normalize:
                return raw
            if shape is None:
                return torch.full_like(raw, self.lipschitz_bound())
            divisor = self._raw_bound(shape)
            return raw / float(divisor.to(self._dtype()).to(torch.float64))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_attributes={self.num_attributes}, scales={self.scales}, "
            f"mask={self.mask!r}, radius={self.radius}, aggregate={self.aggregate!r}, "
            f"normalize={self.normalize}"
        )
