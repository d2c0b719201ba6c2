"""The catalogue's networks: one small 1-Lipschitz backbone, the method's module at a fixed place.

Image tasks (classification, attributes, scale, cluttered) use

    stem = conv(3, w) GS pool2,
    tail = conv(w, 2w) GS pool2 [late] flatten dense(2w (side / 4)^2, 128) GS dense(128, out)

(Björck-orthogonal convolutions and dense layers, GroupSort, 2x2 scaled L2-norm pooling) with the
method's module between ``stem`` and ``tail`` (feature-map attention), at ``late`` (token attention
over the ``8 x 8`` pixels of the last feature map: 64 tokens, where the 256 pixels of the first map
would cost 16 times more per attention matrix; the bounded translation and zoom, where a shift of one
pixel moves the content by four image pixels), or in front of ``stem`` (the soft glimpse acts on the
image). The baseline has nothing there.
Bags, multi-task and localisation networks are built from the same pieces (see their classes).

The hidden dense layer (:data:`HIDDEN` units, GroupSort) is what makes the backbone learn: with the
convolution features going straight into one dense layer of ``out`` rows, the classification baseline
reached 52% clean on ``shapes10`` at difficulty 0.5 (10,000 images, 5 epochs, Adam 8e-3 with warm-up,
tau 10), with the hidden layer 65% (certified at 36/255: 3.4% -> 12.6%) at about the same cost; two
convolutions per stage instead of one gave 53% at twice the cost, 5x5 kernels 58.5%.

Every class here has a ``lipschitz_bound(input_shape=None)`` composed from the sound float64 bounds of
its parts (``certify.bounds.module_bound``), so ``certify.bounds.lipschitz_bound`` of a whole network
is sound and never guessed.

Proofs of the pooling bounds: ``docs/proofs/attention.md#lemma-centred-pooling``,
``docs/proofs/composition.md#lemma-composition``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from certify.bounds import module_bound
from lipnet.activations import GroupSort, MaxMin
from lipnet.attention._bounds import SLACK, NormalizedModule
from lipnet.attention.cam import CAMHead, IntegralAttention
from lipnet.attention.mil import SoftAttentionPooling
from lipnet.attention.mtan import MultiTaskAttentionNetwork
from lipnet.layers import BjorckConv2d, BjorckLinear
from lipnet.pooling import ScaledAvgPool2d, ScaledL2NormPool2d

__all__ = [
    "HIDDEN",
    "BagNetwork",
    "CAMNetwork",
    "CentredPooling",
    "InstanceMean",
    "MultiTaskBaseline",
    "MultiTaskNetwork",
    "PixelTokens",
    "dense_head",
    "image_network",
    "stem",
    "tail",
]


#: Units of the hidden dense layer before every image network's output layer (module docstring).
HIDDEN = 128


def dense_head(in_features: int, num_outputs: int, hidden: int = HIDDEN) -> list[nn.Module]:
    """``dense(in, hidden) GS dense(hidden, out)``, or ``dense(in, out)`` when ``hidden`` is 0; the output
    layer is an ``nn.Linear``, so the last-layer certificate applies to it."""
    if hidden < 0 or hidden % 2:
        raise ValueError(f"hidden must be 0 or an even number (GroupSort pairs units), got {hidden}")
    if hidden == 0:
        return [BjorckLinear(in_features, num_outputs)]
    return [BjorckLinear(in_features, hidden), GroupSort(2), BjorckLinear(hidden, num_outputs)]


def stem(width: int, in_channels: int = 3) -> list[nn.Module]:
    """``conv(in, w) GS pool2``: halves the side."""
    return [BjorckConv2d(in_channels, width, 3, padding=1), GroupSort(2), ScaledL2NormPool2d(2)]


def tail(
    width: int, side: int, num_outputs: int, late: nn.Module | None = None, hidden: int = HIDDEN
) -> list[nn.Module]:
    """``conv(w, 2w) GS pool2 [late] flatten`` and :func:`dense_head`: ``side`` is the side of the tail's
    input."""
    block: list[nn.Module] = [
        BjorckConv2d(width, 2 * width, 3, padding=1),
        GroupSort(2),
        ScaledL2NormPool2d(2),
    ]
    if late is not None:
        block.append(late)
    return [*block, nn.Flatten(), *dense_head(2 * width * (side // 2) ** 2, num_outputs, hidden)]


def image_network(
    num_outputs: int,
    width: int,
    *,
    side: int = 32,
    middle: nn.Module | None = None,
    late: nn.Module | None = None,
    front: nn.Module | None = None,
    front_side: int | None = None,
    hidden: int = HIDDEN,
) -> nn.Sequential:
    """``[front] stem [middle] tail`` with ``late`` before the dense layers (on ``(2w, side / 4, side / 4)``);
    ``front_side`` is the side of ``front``'s output (default ``side``), ``hidden`` the units of the hidden
    dense layer (0: none)."""
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even number >= 2 (GroupSort pairs channels), got {width}")
    s = side if front_side is None else front_side
    if s % 4:
        raise ValueError(f"the backbone's input side must be a multiple of 4, got {s}")
    layers: list[nn.Module] = [] if front is None else [front]
    layers += stem(width)
    if middle is not None:
        layers.append(middle)
    layers += tail(width, s // 2, num_outputs, late, hidden)
    return nn.Sequential(*layers)


class PixelTokens(nn.Module):
    """A token attention module applied to the pixels of a feature map, optionally as a residual average.

    ``(N, C, H, W) -> tokens (N, HW, C) -> A -> (N, C, H, W)``; with ``residual=True`` the output is
    ``(x + A(x)) / 2``. The reshapes are permutations of coordinates (isometries), so the map is
    ``Lip(A)``-Lipschitz, resp. ``(1 + Lip(A)) / 2``-Lipschitz with ``Lip(A)`` the module's bound for
    ``HW`` tokens of dimension ``C``.
    """

    def __init__(self, attention: nn.Module, residual: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.residual = bool(residual)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        y = self.attention(tokens).transpose(1, 2).reshape(n, c, h, w)
        return (x + y) / 2 if self.residual else y

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        if input_shape is None:
            inner = module_bound(self.attention, None)
        else:
            c, h, w = (int(s) for s in input_shape)
            inner = module_bound(self.attention, (h * w, c))
        return (1.0 + inner) / 2.0 if self.residual else inner

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class InstanceMean(nn.Module):
    """Mean over the instances of a bag, ``(N, K, F) -> (N, F)``: the plain MIL pooling.

    A linear map with ``K`` equal entries ``1 / K`` per output coordinate: exactly ``1 / sqrt(K)``-
    Lipschitz for bags of ``K`` instances (at most 1 for every ``K >= 1`` when ``K`` is unknown).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        return 1.0 if input_shape is None else 1.0 / math.sqrt(int(input_shape[0]))


class CentredPooling(NormalizedModule):
    """The bag mean plus a pooling of the deviations from it, ``z = m + P(H - 1 m^T)``, ``m = mean_k h_k``.

    For an attention pooling ``P(D) = sum_k alpha_k(D) Pi_rho(d_k)`` (weights summing to 1) this is
    ``sum_k alpha_k h_k`` wherever the projection is inactive: the same weighted sum, with the ball
    centred on the bag mean instead of the origin and the weights computed from the deviations. An
    offset common to all instances of a bag (which the encoder's biases produce at no Lipschitz cost)
    then neither saturates the projection nor reaches the scores. Without the centring, the
    catalogue's encoder moves its features to norm ~30 in the first epoch, every instance lands on the
    sphere of radius rho and the pooled output is nearly constant.

    Bound: ``H = 1 m^T + C H`` is an orthogonal decomposition (``C`` the centring projection), so with
    ``a = ||1 dm^T||_F = sqrt(K) ||dm||`` and ``b = ||C dH||_F``, ``a^2 + b^2 = ||dH||^2`` and
    ``||dz|| <= a / sqrt(K) + Lip(P) b <= sqrt(1 / K + Lip(P)^2) ||dH||`` (Cauchy-Schwarz), with
    ``Lip(P)`` the pooling's bound on ``(K, F)`` bags (``K = 1`` in ``1 / K`` when ``K`` is unknown).
    With ``normalize=True`` the output is divided by that bound (rounded to the output's dtype), so the
    map is at most 1-Lipschitz up to that rounding, as the attention modules' normalisation.
    """

    def __init__(self, pool: SoftAttentionPooling, normalize: bool = True) -> None:
        super().__init__()
        self.pool = pool
        self.normalize = bool(normalize)

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(dim=1, keepdim=True)
        return self._normalized(m.squeeze(1) + self.pool(x - m), tuple(x.shape[1:]))

    def attention(self, x: Tensor) -> Tensor:
        """The pooling's instance weights on the centred bag, ``(N, K)``."""
        return self.pool.attention(x - x.mean(dim=1, keepdim=True))

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        k = 1 if input_shape is None else int(input_shape[0])
        pool = module_bound(self.pool, input_shape)
        return torch.tensor(math.sqrt(1.0 / k + pool * pool) * SLACK, dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class BagNetwork(nn.Module):
    """A multiple-instance network: a bag of ``K`` images stacked on channels, ``(N, K C, H, W)``.

    Each instance goes through the shared ``encoder`` (``(C, H, W) -> F`` features), the bag of
    features ``(N, K, F)`` through ``aggregator`` (a MIL pooling and a classifier) to bag logits. The
    encoder acts on each instance separately, so on the whole bag (Frobenius norm) it is as Lipschitz
    as on one instance: ``L = Lip(encoder) Lip(aggregator on (K, F))``.

    ``instance_scores(x)`` ``(N, K)`` ranks the instances for the instance AUC: the attention weights
    of an attention pooling (``attention`` or ``with_attention`` of the aggregator's pooling), else the
    positive-class margin of each instance under the bag classifier.
    """

    def __init__(
        self, encoder: nn.Module, aggregator: nn.Module, feature_dim: int, instance_channels: int = 3
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.feature_dim = feature_dim
        self.instance_channels = instance_channels

    def features(self, x: Tensor) -> Tensor:
        n, kc, h, w = x.shape
        c = self.instance_channels
        if kc % c:
            raise ValueError(f"a bag must stack instances of {c} channels, got {kc} channels")
        return self.encoder(x.reshape(n * (kc // c), c, h, w)).reshape(n, kc // c, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.aggregator(self.features(x))

    def instance_scores(self, x: Tensor) -> Tensor:
        h = self.features(x)
        # Duck-typed on purpose (any pooling with these methods); the casts say what they return,
        # which torch's Module.__getattr__ types as Tensor | Module.
        for part in self.aggregator.modules():
            if hasattr(part, "with_attention"):
                with_attention = cast("Callable[[Tensor], tuple[Tensor, ...]]", part.with_attention)
                return with_attention(h)[1]
            if hasattr(part, "attention"):
                return cast("Callable[[Tensor], Tensor]", part.attention)(h)
        # No attention: the bag classifier (the aggregator's linear layer) applied to each instance.
        head = next(m for m in self.aggregator.modules() if isinstance(m, nn.Linear))
        z = head(h)
        return z[..., 1] - z[..., 0]

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        if input_shape is None:
            return module_bound(self.encoder, None) * module_bound(self.aggregator, None)
        kc, h, w = (int(s) for s in input_shape)
        c = self.instance_channels
        enc = module_bound(self.encoder, (c, h, w))
        return enc * module_bound(self.aggregator, (kc // c, self.feature_dim))


class MultiTaskBaseline(nn.Module):
    """The plain multi-task body: a shared stack of ``MaxMin(conv3x3)`` and one 1x1 head per task.

    The same interface as :class:`lipnet.attention.MultiTaskAttentionNetwork` (``task_outputs``,
    ``lipschitz_bound(input_shape, task)``), without attention: task ``t`` is
    ``||head_t|| prod_j ||conv_j||``-Lipschitz (operator-norm bounds from the actual kernels).
    """

    def __init__(self, channels: int, task_channels: tuple[int, ...], depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [BjorckConv2d(channels, channels, 3, padding=1), MaxMin()]
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleList(BjorckConv2d(channels, t, 1) for t in task_channels)

    def task_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        p = self.shared(x)
        return tuple(head(p) for head in self.heads)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.task_outputs(x), dim=1)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None, task: int | None = None) -> float:
        shared = module_bound(self.shared, input_shape)
        heads = [shared * module_bound(h, input_shape) for h in self.heads]
        return heads[task] if task is not None else math.sqrt(sum(b * b for b in heads))


class MultiTaskNetwork(nn.Module):
    """``stem`` then a multi-task body with three task outputs: class maps, colour maps, mask logits.

    ``forward(x)`` returns the class logits (the network's main decision); ``task_logits(x)`` returns
    ``(class (N, num_classes), colour (N, C), mask (N, H', W'))``. The class maps (``class_maps``
    channels) are flattened into the dense layers of :func:`dense_head`, so the class can depend on the
    object's layout (a pooled per-pixel score could not tell the shapes apart); the colour maps are pooled,
    ``sum / sqrt(H' W')`` (one orthonormal row per channel: 1-Lipschitz); a pixel of the mask map is a
    coordinate of the body's mask output. Task ``t`` is ``Lip(stem) Lip(body, t) Lip(head_t)``-
    Lipschitz (:meth:`task_bounds`), with ``Lip(head_class)`` the dense layers' bound and 1 for the others.
    """

    TASKS = ("class", "colour", "mask")

    def __init__(
        self,
        width: int,
        body: MultiTaskBaseline | MultiTaskAttentionNetwork,
        num_classes: int,
        class_maps: int,
        feature_side: int = 16,
    ) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(*stem(width))
        self.body = body
        self.class_head = nn.Sequential(nn.Flatten(), *dense_head(class_maps * feature_side**2, num_classes))
        self.pool = ScaledAvgPool2d(feature_side)

    def task_logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls, colour, mask = self.body.task_outputs(self.stem(x))
        return self.class_head(cls), self.pool(colour).flatten(1), mask[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.task_logits(x)[0]

    def task_bounds(self, input_shape: tuple[int, ...]) -> dict[str, float]:
        c, h, w = (int(s) for s in input_shape)
        first = module_bound(self.stem, (c, h, w))
        inner = (self.width, h // 2, w // 2)
        bounds = {name: first * self.body.lipschitz_bound(inner, task=t) for t, name in enumerate(self.TASKS)}
        bounds["class"] *= module_bound(self.class_head, None)
        return bounds

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        if input_shape is None:
            body = self.body.lipschitz_bound(None, task=0)
            return module_bound(self.stem, None) * body * module_bound(self.class_head, None)
        return self.task_bounds(input_shape)["class"]


class CAMNetwork(nn.Module):
    """Features at half resolution, ``conv(3, w) GS pool2 conv(w, 2w) GS``, and a CAM head.

    ``forward`` is the classifier (the head's logits); ``integral`` (optional) is the OAA+ per-pixel
    model that reads the same features and is not part of ``forward``. Bound of the classifier:
    ``Lip(features) Lip(head)``; :meth:`feature_bound` is the first factor, which the per-pixel
    certificates of the head and of the integral model need.
    """

    def __init__(self, width: int, head: CAMHead, integral: IntegralAttention | None = None) -> None:
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            *stem(width), BjorckConv2d(width, 2 * width, 3, padding=1), GroupSort(2)
        )
        self.head = head
        self.integral = integral

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def feature_shape(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        return (2 * self.width, int(input_shape[1]) // 2, int(input_shape[2]) // 2)

    def feature_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        return module_bound(self.features, None if input_shape is None else tuple(input_shape))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        inner = None if input_shape is None else self.feature_shape(input_shape)
        return self.feature_bound(input_shape) * module_bound(self.head, inner)
