"""``liresnet``: a LiResNet-like deep stack of linear residual convolutions (Hu et al., NeurIPS 2023)."""

from __future__ import annotations

from torch import nn

from lipnet.activations import MaxMin
from lipnet.layers import LinearResidualConv2d
from lipnet.layers.kinds import get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import HEADS, HeadName, LipschitzSequential, classifier_head
from lipnet.pooling import InvertibleDownsampling, ScaledAvgPool2d

__all__ = ["LiResNet", "liresnet"]


class LiResNet(LipschitzSequential):
    """LiResNet-like network after Hu, Zou, Wang, Leino & Fredrikson, "Unlocking Deterministic
    Robustness Certification on ImageNet" (NeurIPS 2023): a deep stack of linear residual blocks.

    Layout: a 2x2 :class:`~lipnet.pooling.InvertibleDownsampling` stem (``4 in_channels`` channels
    at half resolution) and the kind's ``conv(4 in_channels, width, 3)``, MaxMin; ``depth`` x
    [:class:`~lipnet.layers.LinearResidualConv2d` ``x + conv(x)`` normalised by its sound
    operator-norm bound, MaxMin]; a 4x4 :class:`~lipnet.pooling.ScaledAvgPool2d` neck; flatten;
    ``dense(F, hidden)``, MaxMin, and the linear head ``dense(hidden, num_classes)`` (the last
    child). The residual blocks are bounded as the single convolution they are, not as
    ``1 + ||conv||``, which is what lets the stack be deep. This is not the paper's exact network
    (its stem, neck and EMMA loss are not reproduced; the paper's own models have more dense
    layers). The paper's last-layer normalisation (unit-norm class rows) is ``head="rownorm"``
    (:class:`~lipnet.layers.rownorm.RowNormLinear`); ``head="kind"`` (default) is the kind's dense layer.

    Guarantee: 1-Lipschitz when the kind's layers are (each normalised residual block is a
    contraction); ``lipschitz_bound`` is the product of the children's sound bounds.

    Reported on CIFAR-10 for the paper's LiResNet (clean / certified at 36/255): 81.0 / 69.8 (from
    memory; not verified here). Config: ``experiments/configs/cifar10_large.yaml``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str = "aol",
        width: int = 128,
        depth: int = 12,
        hidden: int = 512,
        head: HeadName = "kind",
    ) -> None:
        kind = get_layer_kind(conv)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if input_size < 8 or input_size % 8:
            raise ValueError(
                f"input_size must be a positive multiple of 8 (2x stem, 4x4 neck), got {input_size}"
            )
        if width < 2 or width % 2 or hidden < 2 or hidden % 2:
            raise ValueError(f"width and hidden must be even and >= 2 (MaxMin pairs), got {width}, {hidden}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks += [LinearResidualConv2d(width, 3, normalize=True), MaxMin()]
        features = width * (input_size // 8) ** 2
        super().__init__(
            InvertibleDownsampling(2),
            kind.conv(4 * in_channels, width, 3),
            MaxMin(),
            *blocks,
            ScaledAvgPool2d(4),
            nn.Flatten(),
            kind.dense(features, hidden),
            MaxMin(),
            classifier_head(kind, hidden, num_classes, head),
        )
        self.input_shape = (in_channels, input_size, input_size)


@register_model
def liresnet(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    conv: str = "aol",
    width: int = 128,
    depth: int = 12,
    hidden: int = 512,
    head: HeadName = "kind",
) -> LiResNet:
    """:class:`LiResNet`: ``depth`` linear residual convolutions of ``width`` channels; ``conv=`` any kind;
    ``head="rownorm"``: the last-layer normalisation."""
    return LiResNet(in_channels, num_classes, input_size, conv, width, depth, hidden, head)
