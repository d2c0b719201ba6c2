"""``bethune_vgg``: the VGG-like 1-Lipschitz network of Béthune et al. (NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipnet.activations import GroupSort
from lipnet.layers.kinds import LayerKind, get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import LipschitzSequential, linear_head
from lipnet.pooling import GlobalL2NormPool2d, ScaledL2NormPool2d

__all__ = ["BethuneVGG", "bethune_vgg"]


class BethuneVGG(LipschitzSequential):
    """VGG-like network of Béthune et al., "Pay attention to your loss: understanding misconceptions
    about 1-Lipschitz neural networks" (NeurIPS 2022), in the layers of one layer kind.

    Stages of 3x3 'same' convolutions (default widths ``32, 32 / 64, 64, 64 / 128, 128, 128``), each
    followed by GroupSort of size 2; a 2x2 :class:`~lipnet.pooling.ScaledL2NormPool2d` between
    stages; :class:`~lipnet.pooling.GlobalL2NormPool2d`; ``dense(128, 128)``, GroupSort 2, and the
    linear head ``dense(128, num_classes)`` as the last child (``certify`` splits it off for the
    last-layer certificate). The first convolution of a stage (it changes the number of channels)
    is the kind's ``conv`` layer, the others its ``block`` layer. With ``conv="bjorck"``
    (reshaped-kernel Björck convolutions, as in the paper) the default network has 488,544
    weights plus 778 biases (the paper's "about 0.49 M").

    Guarantee: every child is 1-Lipschitz when the kind's layers are (``bjorck``, ``aol`` and the
    other registered kinds are), so the network is; ``lipschitz_bound`` is the product of the
    children's sound bounds. It is not gradient-norm preserving with AOL layers.

    Reported on CIFAR-10 (clean / certified at 36/255): not verified here; the paper presents
    this network along a τ sweep of the τ-cross-entropy rather than as one number. Config:
    ``experiments/configs/cifar10_bethune_vgg.yaml`` (its τ grid in the ``sweep`` section).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str | LayerKind = "bjorck",
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 3, 3),
        hidden: int = 128,
    ) -> None:
        kind = conv if isinstance(conv, LayerKind) else get_layer_kind(conv)
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths and depths need the same non-zero length, got {widths} and {depths}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if any(d < 1 for d in depths):
            raise ValueError(f"every stage needs at least one convolution, got depths={depths}")
        if any(w < 2 or w % 2 for w in (*widths, hidden)):
            raise ValueError(
                f"widths and hidden must be even and >= 2 (GroupSort pairs channels), got {widths}, {hidden}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        downsampling = 2 ** (len(widths) - 1)
        if input_size < downsampling or input_size % downsampling:
            raise ValueError(
                f"input_size must be a positive multiple of {downsampling} ({len(widths) - 1} 2x2 poolings), "
                f"got {input_size}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            if stage:
                layers.append(ScaledL2NormPool2d(2))
            for i in range(depth):
                changes = i == 0 and channels != width
                layers += [kind.conv(channels, width, 3) if changes else kind.block(width, 3), GroupSort(2)]
                channels = width
        layers += [
            GlobalL2NormPool2d(),
            kind.dense(channels, hidden),
            GroupSort(2),
            linear_head(kind, hidden, num_classes),
        ]
        super().__init__(*layers)
        self.input_shape = (in_channels, input_size, input_size)


@register_model
def bethune_vgg(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: int = 32,
    conv: str | LayerKind = "bjorck",
    widths: Sequence[int] = (32, 64, 128),
    depths: Sequence[int] = (2, 3, 3),
    hidden: int = 128,
) -> BethuneVGG:
    """:class:`BethuneVGG`, the network of Béthune et al. (NeurIPS 2022); ``conv=`` any layer kind (a
    registered name or a :class:`~lipnet.layers.kinds.LayerKind`)."""
    return BethuneVGG(in_channels, num_classes, input_size, conv, widths, depths, hidden)
