"""``small_cnn``: the demo and benchmark network (4 convolutions + 2 dense layers, 1-Lipschitz)."""

from __future__ import annotations

from torch import nn

from lipnet.activations import GroupSort
from lipnet.layers.centering import BatchCentering
from lipnet.layers.kinds import get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import HEADS, HeadName, LipschitzSequential, classifier_head
from lipnet.pooling import InvertibleDownsampling, ScaledL2NormPool2d

__all__ = ["SmallCNN", "small_cnn"]

#: The layer kinds whose ``conv`` and ``dense`` layers change channels and features (plain layers).
_KINDS = ("bjorck", "bcop", "rko_bcop", "aol")
_POOLS = ("l2", "invertible")
_NORMS = ("none", "centering")
#: ``norm`` when the constructor is given none: centring after every AOL convolution (class docstring).
_DEFAULT_NORM = {"aol": "centering"}


class SmallCNN(LipschitzSequential):
    """Four 3x3 convolutions and two dense layers, every part 1-Lipschitz.

    ``conv(c, w) GS conv(w, w) GS down conv(., 2w) GS conv(2w, 2w) GS down flatten
    dense(., 4w) GS dense(4w, num_classes)``, with GS = GroupSort of size 2 and ``down`` a 2x2
    :class:`~lipnet.pooling.ScaledL2NormPool2d` (``pool="l2"``) or
    :class:`~lipnet.pooling.InvertibleDownsampling` (``pool="invertible"``, which multiplies the
    channels by 4). With ``norm="centering"`` each convolution is followed by a
    :class:`~lipnet.layers.BatchCentering` (batch normalisation without the division: a translation in
    eval mode, bound 1), so the network's bound is unchanged. That is the default with AOL (``norm=None``
    picks ``centering`` for ``conv="aol"``, ``none`` for Björck): AOL's convolutions start as orthogonal
    1x1 maps that keep the image's large common (positive) component, the network then starts far from
    uniform predictions, and training first shrinks every layer towards a constant output. Uncentred,
    ``small_cnn`` with AOL stayed at chance on shapes10 (11.7% and 9.6% test accuracy after two epochs of
    4,000 images, width 16, Adam 1e-2, tau 5, seeds 0 and 1); centred it learns (14.6% and 15.2%; Björck
    14.5%). An orthonormal head, a row-normalised or column-rescaled one, orthogonal or kaiming
    initialisations and a centred input did not help. Convolutions and dense layers are
    Björck/RKO (``conv="bjorck"``), BCOP convolutions with Björck dense layers (``conv="bcop"``), RKO with
    BCOP where RKO would be a fixed patch embedding (``conv="rko_bcop"``) or AOL (``conv="aol"``), built by
    that
    :class:`~lipnet.layers.kinds.LayerKind` (its ``conv``, ``block`` and ``dense`` factories). The last
    child is the linear head, so ``certify``'s last-layer certificate splits it off: the kind's dense layer
    (``head="kind"``), a Björck layer (``"orthogonal"``) or a :class:`~lipnet.layers.rownorm.RowNormLinear`
    (``"rownorm"``, unit class rows). ``input_size``
    (square inputs) must be divisible by 4. ``lipschitz_bound`` is the product of the children's
    bounds (:class:`~lipnet.models.sequential.LipschitzSequential`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 32,
        conv: str = "bjorck",
        input_size: int = 32,
        pool: str = "l2",
        norm: str | None = None,
        head: HeadName = "kind",
    ) -> None:
        if conv not in _KINDS:
            raise ValueError(f"conv must be one of {sorted(_KINDS)}, got {conv!r}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {list(_POOLS)}, got {pool!r}")
        if norm is None:
            norm = _DEFAULT_NORM.get(conv, "none")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {list(_NORMS)}, got {norm!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if width % 2:
            raise ValueError(f"width must be even (GroupSort pairs channels), got {width}")
        if input_size < 4 or input_size % 4:
            raise ValueError(
                f"input_size must be a positive multiple of 4 (two 2x downsamplings), got {input_size}"
            )
        kind = get_layer_kind(conv)
        grow = 4 if pool == "invertible" else 1

        def down() -> nn.Module:
            return InvertibleDownsampling(2) if pool == "invertible" else ScaledL2NormPool2d(2)

        def centred(conv: nn.Module, channels: int) -> list[nn.Module]:
            return [conv, BatchCentering(channels)] if norm == "centering" else [conv]

        c1, c2, hidden = width, 2 * width, 4 * width
        side = input_size // 4
        super().__init__(
            *centred(kind.conv(in_channels, c1, 3), c1),
            GroupSort(2),
            *centred(kind.block(c1, 3), c1),
            GroupSort(2),
            down(),
            *centred(kind.conv(c1 * grow, c2, 3), c2),
            GroupSort(2),
            *centred(kind.block(c2, 3), c2),
            GroupSort(2),
            down(),
            nn.Flatten(),
            kind.dense(c2 * grow * side * side, hidden),
            GroupSort(2),
            classifier_head(kind, hidden, num_classes, head),
        )
        self.input_shape = (in_channels, input_size, input_size)


@register_model
def small_cnn(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 32,
    conv: str = "bjorck",
    input_size: int = 32,
    pool: str = "l2",
    norm: str | None = None,
    head: HeadName = "kind",
) -> SmallCNN:
    """The demo/benchmark network :class:`SmallCNN` (CIFAR-10 by default; ``in_channels=1, input_size=28`` for
    Fashion-MNIST; ``norm="centering"``: a BatchCentering after each convolution, the default with AOL;
    ``head``: the last layer,
    ``"kind"`` the kind's dense layer, ``"orthogonal"`` a Björck one, ``"rownorm"`` a row-normalised one)."""
    return SmallCNN(in_channels, num_classes, width, conv, input_size, pool, norm, head)
