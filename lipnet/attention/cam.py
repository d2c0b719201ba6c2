"""Class activation maps with a fixed normalisation, online attention accumulation and OAA+.

* CAM (Zhou, Khosla, Lapedriza, Oliva & Torralba, CVPR 2016): ``M_c(j) = w_c . F(j)`` at every
  pixel ``j``, logits from the pooled maps. The map is linear in the features, but the usual
  normalisation ``relu(M_c) / max relu(M_c)`` divides by an input-dependent maximum and is not
  Lipschitz (it blows up as the maximum tends to 0); here it is replaced by a fixed, running
  ``kappa_c`` (a buffer, updated outside the gradient), so the attention map is
  ``clamp(M_c / kappa_c, 0, 1)``.
* Online attention accumulation, OAA (Jiang, Hou, Cao, Cheng, Wei & Xiong, "Integral Object Mining
  via Online Attention Accumulation", ICCV 2019): per image and positive class, the elementwise
  maximum of the attention maps seen during training. It is training-time state, never part of a
  forward pass, so it changes no Lipschitz constant.
* OAA+: an integral attention model trained on the accumulated maps with the hybrid loss
  :class:`lipnet.losses.OAAHybrid`; here a 1-Lipschitz per-pixel head certified per pixel.

Proofs: ``docs/proofs/attention.md#lemma-cam`` and ``#lemma-integral-attention``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from certify.radius import binary_radius
from lipnet.activations import MaxMin
from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    check_int,
    check_maxmin_channels,
    check_odd_kernel,
    check_positive,
    spectral_norm,
)
from lipnet.layers import BjorckConv2d

__all__ = ["CAMHead", "IntegralAttention", "OnlineAttentionAccumulator"]


def _check_image(x: Tensor, channels: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{who} expects (N, {channels}, H, W), got {tuple(x.shape)}")


def _pixel_certificates(
    scores: Tensor,
    threshold: Tensor,
    lipschitz: Tensor,
    backbone_lipschitz: float,
    input_norms: Tensor | float,
    *,
    foreground_at_threshold: bool,
) -> tuple[Tensor, Tensor]:
    """Foreground decisions and their radii (:func:`certify.radius.binary_radius`), both ``(N, K, H, W)``.

    ``scores (N, K, H, W)``; ``threshold`` and ``lipschitz`` ``(K,)``, the latter the Lipschitz bound
    of one pixel of class ``k`` w.r.t. the head's input; ``backbone_lipschitz`` a bound from the network
    input to the head's input, so one pixel of class ``k`` is ``lipschitz_k * backbone_lipschitz``-
    Lipschitz in the network input, whose norms are ``input_norms``. A pixel is foreground when its score
    is above its threshold, or at it when ``foreground_at_threshold`` (the rule ``>=``); a pixel exactly at
    its threshold has radius 0 either way.
    """
    lb = float(backbone_lipschitz)
    if isinstance(backbone_lipschitz, bool) or not math.isfinite(lb) or lb <= 0:
        raise ValueError(f"backbone_lipschitz must be a positive finite number, got {backbone_lipschitz!r}")
    s = scores.detach()
    t = threshold.detach().to(device=s.device, dtype=torch.float64)
    # SLACK covers the float64 rounding of the product of the two bounds
    bound = lipschitz.detach().to(device=s.device, dtype=torch.float64) * lb * SLACK
    above = s.to(torch.float64) - t[None, :, None, None]
    decisions = above >= 0 if foreground_at_threshold else above > 0
    return decisions, binary_radius(s, decisions, bound, input_norms=input_norms, threshold=t)


class CAMHead(NormalizedModule):
    """CAM classifier head with a fixed normalisation of its class activation maps.

    For features ``F`` of shape ``(N, C, H, W)`` and a linear map ``W`` (``num_classes x C``, any
    weights, bounded by its exact float64 spectral norm):

    * maps ``M_c(j) = w_c . F(j) / d`` at every pixel ``j`` (:meth:`maps`, no bias);
    * logits ``f = (W sqrt(HW) GAP(F) + b) / d`` (:meth:`forward`), i.e. the maps summed over the
      pixels over ``sqrt(HW)`` (plus the bias): ``sqrt(HW) GAP`` is 1-Lipschitz per channel;
    * attention maps ``A_c = clamp(M_c / kappa_c, 0, 1)`` (:meth:`attention`) with ``kappa`` a
      buffer: the running mean (momentum ``momentum``; the first update sets it) of the spatial
      maximum of ``M_c`` over the images labelled positive for ``c``, floored at ``kappa_min``,
      updated by :meth:`update_kappa` outside the gradient and frozen between updates;

    with ``d = ||W||`` if ``normalize`` else 1.

    Bounds, w.r.t. the head's input ``F`` (``M = (I_HW (x) W) F``, the same matrix at every pixel):
    the logits are ``||W|| / d``-Lipschitz (:meth:`lipschitz_bound`; at most 1 with ``normalize``, up
    to the rounding of ``d``), logit ``c`` and map ``M_c`` (as a whole and at each pixel) are
    ``||w_c|| / d``-Lipschitz (:meth:`map_lipschitz_bounds`), and ``A_c`` is ``||w_c|| / (d kappa_c)``-
    Lipschitz (the clamp is 1-Lipschitz) while ``kappa`` is not updated
    (:meth:`attention_lipschitz_bounds`). All for every input size.

    Certified localisation (:meth:`pixel_certificates`): pixel ``j`` is foreground for ``c`` when
    ``A_cj >= theta``, i.e. ``M_cj >= theta kappa_c`` (``0 < theta < 1``), and that decision cannot
    change under an input perturbation of norm ``eps`` if
    ``|M_cj(x) - theta kappa_c| > (||w_c|| / d) L_F eps``, where ``L_F`` is a sound Lipschitz bound
    from the network input to the features ``F`` (to the whole map, or to pixel ``j``'s feature
    vector, which can be smaller). ``L_F`` is the caller's responsibility: it is passed in as
    ``backbone_lipschitz`` (e.g. ``certify.bounds.lipschitz_bound(backbone, input_shape)``; 1.0 when
    the head reads the input itself).
    """

    kappa: Tensor
    kappa_seen: Tensor

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        momentum: float = 0.1,
        kappa_min: float = 1e-3,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        momentum = check_positive("momentum", momentum)
        if momentum > 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.momentum = momentum
        self.kappa_min = check_positive("kappa_min", kappa_min)
        self.normalize = bool(normalize)
        self.fc = nn.Linear(in_channels, num_classes)
        self.register_buffer("kappa", torch.ones(num_classes))
        self.register_buffer("kappa_seen", torch.zeros(num_classes, dtype=torch.bool))

    def _divisor_like(self, ref: Tensor) -> Tensor:
        if not self.normalize:
            return ref.new_tensor(1.0)
        return self._divisor(None).to(device=ref.device, dtype=ref.dtype)

    def maps(self, x: Tensor) -> Tensor:
        """Class activation maps ``M (N, K, H, W)``, divided by ``||W||`` when normalising."""
        _check_image(x, self.in_channels, type(self).__name__)
        return torch.einsum("kc,nchw->nkhw", self.fc.weight, x) / self._divisor_like(x)

    def attention(self, x: Tensor) -> Tensor:
        """Attention maps ``clamp(M_c / kappa_c, 0, 1)``, shape ``(N, K, H, W)``."""
        return self.attention_from_maps(self.maps(x))

    def attention_from_maps(self, maps: Tensor) -> Tensor:
        """:meth:`attention` from maps already computed by :meth:`maps` (no second pass)."""
        kappa = self.kappa.to(device=maps.device, dtype=maps.dtype)
        return (maps / kappa[None, :, None, None]).clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.in_channels, type(self).__name__)
        pooled = x.sum(dim=(2, 3)) / math.sqrt(x.shape[2] * x.shape[3])
        # the bound holds for every size: one cache entry (None) serves forward, maps and logits
        return self._normalized(self.fc(pooled), None)

    def logits_from_maps(self, maps: Tensor) -> Tensor:
        """The logits of :meth:`forward` from the maps of :meth:`maps` (one pass gives both)."""
        pooled = maps.sum(dim=(2, 3)) / math.sqrt(maps.shape[2] * maps.shape[3])
        return pooled + self.fc.bias / self._divisor_like(maps)

    @torch.no_grad()
    def update_kappa(self, maps: Tensor, target: Tensor) -> None:
        """Move ``kappa_c`` towards the batch mean of ``max_j M_cj`` over the images positive for ``c``.

        ``maps (N, K, H, W)`` from :meth:`maps`; ``target (N, K)`` multi-hot (float, int or bool).
        Classes without a positive image in the batch keep their ``kappa``. Call it once per
        training step; the certificates use the ``kappa`` of the moment they are computed.
        """
        if maps.ndim != 4 or maps.shape[1] != self.num_classes:
            raise ValueError(f"maps must be (N, {self.num_classes}, H, W), got {tuple(maps.shape)}")
        if target.shape != maps.shape[:2]:
            raise ValueError(f"target must be (N, K) = {tuple(maps.shape[:2])}, got {tuple(target.shape)}")
        positive = target.to(device=maps.device) > 0
        peaks = maps.detach().amax(dim=(2, 3)).to(self.kappa.dtype)
        count = positive.sum(dim=0)
        present = (count > 0).to(self.kappa.device)
        mean_peak = (
            torch.where(positive, peaks, torch.zeros_like(peaks)).sum(dim=0) / count.clamp_min(1)
        ).to(self.kappa.device)
        mean_peak = mean_peak.clamp_min(self.kappa_min)
        blended = torch.where(
            self.kappa_seen, (1 - self.momentum) * self.kappa + self.momentum * mean_peak, mean_peak
        )
        self.kappa.copy_(torch.where(present, blended, self.kappa))
        self.kappa_seen |= present

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        return spectral_norm(self.fc.weight)

    def map_lipschitz_bounds(self) -> Tensor:
        """Float64 ``(K,)``: bound of ``M_c`` (whole map or one pixel) and of logit ``c`` w.r.t. ``F``."""
        with torch.no_grad():
            rows = self.fc.weight.to(torch.float64).norm(dim=1).cpu() * SLACK
            if not self.normalize:
                return rows
            return rows / float(self._raw_bound(None).to(self._dtype()).to(torch.float64)) * SLACK

    def attention_lipschitz_bounds(self) -> Tensor:
        """Float64 ``(K,)``: bound of the attention map ``A_c`` w.r.t. ``F`` for the current ``kappa``."""
        return self.map_lipschitz_bounds() / self.kappa.detach().to(device="cpu", dtype=torch.float64) * SLACK

    def pixel_certificates(
        self, x: Tensor, *, backbone_lipschitz: float, input_norms: Tensor | float, theta: float = 0.5
    ) -> tuple[Tensor, Tensor]:
        """Foreground decisions ``A_cj >= theta`` and their certified radii, both ``(N, K, H, W)``.

        ``x`` are the head's input features; ``backbone_lipschitz`` a sound bound of the
        Lipschitz constant from the network input to ``x`` (see the class docstring);
        ``input_norms`` the L2 norms of the network inputs (the images, shape ``(N,)``; ``x``'s own
        norms when the head reads the image itself), the scale of the forward pass's rounding.
        Radius ``(|M_cj - theta kappa_c| - a) / (L_c L_F)``, float64, 0 where ``M_cj = theta kappa_c``
        (:func:`certify.radius.binary_radius`, ``a`` its rounding allowance). The decision at a pixel is
        certified at ``eps`` when its radius is ``> eps`` (strict).
        """
        if not 0.0 < theta < 1.0:
            raise ValueError(f"theta must be in (0, 1), got {theta!r}")
        with torch.no_grad():
            maps = self.maps(x)
            lip = self.map_lipschitz_bounds()
        threshold = theta * self.kappa.detach().to(torch.float64)
        return _pixel_certificates(
            maps, threshold, lip, backbone_lipschitz, input_norms, foreground_at_threshold=True
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, momentum={self.momentum}, "
            f"kappa_min={self.kappa_min}, normalize={self.normalize}"
        )


class OnlineAttentionAccumulator(nn.Module):
    """Online attention accumulation (OAA, Jiang et al., ICCV 2019): training-time state, not a layer.

    Keeps one map per training image and class, ``maps (num_images, K, H, W)``, initially 0. At
    every :meth:`update`, for each image ``i`` of the batch, let ``k_i = |y_i|`` be its number of
    positive labels; for every class ``c`` with ``y_ic = 1`` that is among the ``k_i`` highest
    logits of the image, ``maps[i, c] <- max(maps[i, c], A_ic)`` elementwise, with ``A`` the fixed-
    ``kappa`` attention maps of :class:`CAMHead` (values in [0, 1], comparable across epochs because
    ``kappa`` is not per image). The result, :meth:`targets`, is the target ``q`` of the OAA+ model
    (:class:`IntegralAttention`, loss :class:`lipnet.losses.OAAHybrid`).

    The maps are a persistent buffer: they move with ``.to(device)`` and are saved and restored
    by ``state_dict`` / ``load_state_dict``, so training resumes with its accumulated state.
    Nothing here enters a forward pass, so no Lipschitz constant depends on it.
    """

    maps: Tensor

    def __init__(self, num_images: int, num_classes: int, size: tuple[int, int]) -> None:
        super().__init__()
        check_int("num_images", num_images)
        check_int("num_classes", num_classes)
        dims = tuple(size)  # a list is accepted too
        if len(dims) != 2:
            raise ValueError(f"size must be (H, W), got {dims!r}")
        h, w = (check_int("size entry", s) for s in dims)
        self.num_images, self.num_classes, self.size = num_images, num_classes, (h, w)
        self.register_buffer("maps", torch.zeros(num_images, num_classes, h, w))

    def _check_index(self, index: Tensor, n: int) -> None:
        if not isinstance(index, Tensor) or index.shape != (n,) or index.dtype != torch.int64:
            got = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"index must be an int64 tensor of shape ({n},), got {got}")
        if index.device != self.maps.device:
            raise ValueError(f"index is on {index.device} but the maps are on {self.maps.device}")
        if n and (int(index.min()) < 0 or int(index.max()) >= self.num_images):
            raise ValueError(f"image indices must lie in [0, {self.num_images}), got {index.tolist()}")

    @torch.no_grad()
    def update(self, index: Tensor, attention: Tensor, logits: Tensor, target: Tensor) -> None:
        """Accumulate one batch: ``index (N,)`` int64 dataset indices, ``attention (N, K, H, W)`` in
        [0, 1], ``logits (N, K)``, ``target (N, K)`` multi-hot. Repeated indices are merged by max."""
        k, (h, w) = self.num_classes, self.size
        n = attention.shape[0] if attention.ndim == 4 else -1
        if attention.shape != (n, k, h, w):
            raise ValueError(f"attention must be (N, {k}, {h}, {w}), got {tuple(attention.shape)}")
        if logits.shape != (n, k) or target.shape != (n, k):
            raise ValueError(
                f"logits and target must be ({n}, {k}), got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        self._check_index(index, n)
        for name, t in (("attention", attention), ("logits", logits), ("target", target)):
            if t.device != self.maps.device:
                raise ValueError(f"{name} is on {t.device} but the maps are on {self.maps.device}")
        a = attention.detach().to(self.maps.dtype)
        if not torch.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError("attention maps must be finite and in [0, 1] (use CAMHead.attention)")
        positive = target > 0
        # rank[i, c]: position of class c when image i's logits are sorted in decreasing order
        rank = logits.detach().argsort(dim=1, descending=True).argsort(dim=1)
        eligible = positive & (rank < positive.sum(dim=1, keepdim=True))
        # maps >= 0, so a 0 for ineligible entries leaves them unchanged under the max
        source = torch.where(eligible[:, :, None, None], a, torch.zeros_like(a))
        flat = source.reshape(n, -1)
        self.maps.view(self.num_images, -1).scatter_reduce_(
            0, index[:, None].expand_as(flat), flat, "amax", include_self=True
        )

    def targets(self, index: Tensor) -> Tensor:
        """The accumulated maps ``(N, K, H, W)`` of the listed images (a copy): OAA+ targets ``q``."""
        self._check_index(index, index.shape[0] if isinstance(index, Tensor) and index.ndim == 1 else -1)
        return self.maps[index]

    def reset(self) -> None:
        """Forget every accumulated map."""
        self.maps.zero_()

    def extra_repr(self) -> str:
        return f"num_images={self.num_images}, num_classes={self.num_classes}, size={self.size}"


class IntegralAttention(NormalizedModule):
    """OAA+ integral attention model: a 1-Lipschitz per-pixel head ``p = conv2(MaxMin(conv1(F)))``.

    ``conv1``: ``k x k`` zero-padded :class:`~lipnet.layers.BjorckConv2d` ``C -> hidden``; ``conv2``:
    1x1 :class:`~lipnet.layers.BjorckConv2d` ``hidden -> K``; the output ``p (N, K, H, W)`` are
    per-pixel logits, trained on :class:`OnlineAttentionAccumulator` maps with
    :class:`lipnet.losses.OAAHybrid` (pixel ``j`` is foreground for ``c`` when ``p_cj > 0``).

    Bounds w.r.t. the head's input ``F``, from the actual kernels:

    * whole output (:meth:`lipschitz_bound`): ``L = ||conv1|| ||conv2||`` (sound operator-norm bounds,
      for the given input size or for every size);
    * one pixel of class ``c`` (:meth:`pixel_lipschitz_bounds`): ``p_cj = w_c . MaxMin(K1 patch_j(F)
      + b1) + b2_c`` with ``w_c`` row ``c`` of the 1x1 kernel and ``K1`` the ``hidden x (C k k)``
      reshaped kernel of ``conv1``; ``patch_j`` selects distinct entries of ``F`` (zero padding adds
      constants) and MaxMin acts within the pixel, so ``Lip(p_cj) <= ||w_c|| ||K1||``. For the
      Björck (RKO) kernel ``||K1|| = 1 / k`` (it is scaled by ``1 / sqrt(k^2)``): a pixel is about
      ``k`` times more stable than the whole map's constant says. Every pixel of class ``c`` is
      also ``||w_c|| ||conv1||``-Lipschitz; the smaller of the two is used.

    With ``normalize=True`` the output is divided by ``L`` (for the actual input size): at most
    1-Lipschitz up to the rounding of ``L``, and the pixel bounds are divided by the same ``fl(L)``.
    Per-pixel certificate (:meth:`pixel_certificates`): ``|p_cj(x)| / (Lip(p_cj) L_F)``, with
    ``L_F`` the caller's sound bound from the network input to ``F`` (see :class:`CAMHead`).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 16,
        kernel_size: int = 3,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("num_classes", num_classes)
        check_maxmin_channels("hidden", hidden)
        check_odd_kernel(kernel_size)
        self.in_channels, self.num_classes, self.hidden = in_channels, num_classes, hidden
        self.normalize = bool(normalize)
        self.conv1 = BjorckConv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2)
        self.act = MaxMin()
        self.conv2 = BjorckConv2d(hidden, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.in_channels, type(self).__name__)
        return self._normalized(self.conv2(self.act(self.conv1(x))), tuple(x.shape[1:]))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        inner = None if input_shape is None else (self.hidden, *input_shape[1:])
        value = self.conv1.lipschitz_bound(input_shape) * self.conv2.lipschitz_bound(inner)
        return torch.tensor(value, dtype=torch.float64)

    def pixel_lipschitz_bounds(self, input_shape: tuple[int, ...] | None = None) -> Tensor:
        """Float64 ``(K,)``: bound of one output pixel ``p_cj`` w.r.t. ``F``, the same at every pixel.

        ``min(||w_c|| ||K1||, ||w_c|| ||conv1||)`` (the second for the given size: one pixel of
        ``MaxMin(conv1 F)`` moves no more than the whole map). With ``normalize=True`` divided by
        the divisor ``fl(L)`` of the given size; without a size, the bound of the whole output,
        which dominates every size's ratio (``||w_c|| ||conv1|| <= ||conv2|| ||conv1|| = L``).
        """
        shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        with torch.no_grad():
            rows = self.conv2.weight.to(torch.float64).flatten(1).norm(dim=1).cpu() * SLACK
            per_pixel = rows * float(spectral_norm(self.conv1.weight))
            if shape is not None:
                per_pixel = torch.minimum(per_pixel, rows * self.conv1.lipschitz_bound(shape))
            if not self.normalize:
                return per_pixel
            if shape is None:
                return torch.full_like(per_pixel, self.lipschitz_bound() * SLACK)
            divisor = float(self._raw_bound(shape).to(self._dtype()).to(torch.float64))
            return per_pixel / divisor * SLACK

    def pixel_certificates(
        self, x: Tensor, *, backbone_lipschitz: float, input_norms: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """Foreground decisions ``p > 0`` and their certified radii (float64), both ``(N, K, H, W)``.

        ``x`` are the head's input features, ``backbone_lipschitz`` a sound Lipschitz bound from the
        network input to them (1.0 when the head reads the input itself), ``input_norms`` the L2 norms
        of the network inputs (the images; see :meth:`CAMHead.pixel_certificates`). Radius
        ``(|p_cj| - a) / (Lip(p_cj) L_F)`` (:func:`certify.radius.binary_radius`), 0 where ``p_cj = 0``.
        """
        with torch.no_grad():
            scores = self(x)
            lip = self.pixel_lipschitz_bounds(tuple(x.shape[1:]))
        threshold = torch.zeros(self.num_classes, dtype=torch.float64)
        return _pixel_certificates(
            scores, threshold, lip, backbone_lipschitz, input_norms, foreground_at_threshold=False
        )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, hidden={self.hidden}, "
            f"normalize={self.normalize}"
        )
