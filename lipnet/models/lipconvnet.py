"""``lipconvnet_{xs,s,m,l}``: the ConvNet of Prach, Brau, Buttazzo & Lampert (CVPR 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.activations import MaxMin
from lipnet.models.kinds import get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import LipschitzSequential, linear_head
from lipnet.pooling import InvertibleDownsampling

__all__ = [
    "ChannelPad",
    "FirstChannels",
    "LipConvNet",
    "lipconvnet_l",
    "lipconvnet_m",
    "lipconvnet_s",
    "lipconvnet_xs",
]


class ChannelPad(nn.Module):
    """Appends zero channels: ``(N, C, H, W) -> (N, channels, H, W)`` with the input in the first ``C``.

    Guarantee: an isometry (norm-preserving, hence 1-Lipschitz); the stem of SLL networks and of
    the ConvNet of Prach et al. (CVPR 2024), which lifts the image to the network width without a
    layer that could lose information.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] > self.channels:
            raise ValueError(
                f"ChannelPad({self.channels}) expects (N, C, H, W) with C <= {self.channels}, "
                f"got {tuple(x.shape)}"
            )
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: an isometric embedding."""
        return 1.0

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class FirstChannels(nn.Module):
    """Keeps the first ``channels`` channels: ``(N, C, ...) -> (N, channels, ...)``.

    Guarantee: an orthogonal projection onto coordinates (1-Lipschitz, not norm-preserving).
    Prach et al. (CVPR 2024) apply it before each ``PixelUnshuffle(2)`` so that the channels
    double, not quadruple, at each downsampling.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] < self.channels:
            raise ValueError(
                f"FirstChannels({self.channels}) needs at least {self.channels} channels, "
                f"got {tuple(x.shape)}"
            )
        return x[:, : self.channels]

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a coordinate projection."""
        return 1.0

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class LipConvNet(LipschitzSequential):
    """The ConvNet of Prach, Brau, Buttazzo & Lampert, "1-Lipschitz Layers Compared: Memory, Speed,
    and Certifiable Robustness" (CVPR 2024), in the layers of one layer kind.

    Layout (that of the authors' code, ``simplified_conv_net.py``): :class:`ChannelPad` to ``width``
    channels; a 1x1 ``block(width)`` and MaxMin; then ``log2(input_size)`` stages ``i = 0, 1, ...``,
    each ``depth`` x [``block(width 2^i, k)``, MaxMin] (``k = 3``, and ``k = 1`` in the stage at 2x2
    resolution, where a 3x3 kernel has no room), followed by :class:`FirstChannels` (half of the
    channels) and a 2x2 :class:`~lipnet.pooling.InvertibleDownsampling` (PixelUnshuffle), so the
    channels double at each downsampling; no BatchNorm, no skips. At 1x1 resolution the features
    are flattened into the linear head ``dense(width 2^stages, num_classes)``, the last child
    (``certify`` splits it off for the last-layer certificate). Every convolution is
    channel-preserving, so the kind's ``block`` factory builds all of them (residual blocks for
    ``sll`` / ``cpl``).

    The head differs from the paper's in one respect: the paper uses a ``(F, F)`` 1x1 convolution
    (``F = 32 width`` at 32x32) and keeps its first ``num_classes`` outputs, so ``F^2 - F num_classes``
    of its weights never reach the output (for orthogonal kinds, the kept rows are any
    orthonormal rows, which ``dense(F, num_classes)`` parametrises directly). With plain 3x3
    convolutions and biases the paper's layout has 1.57 / 6.29 / 25.1 / 100.5 M parameters for
    width 16 / 32 / 64 / 128; this one has ``F^2 - F num_classes`` fewer (1.31 / 5.24 / 20.9 / 83.7 M
    at 10 classes); the counts of other kinds follow their layer parametrisations.

    Guarantee: every child is 1-Lipschitz when the kind's layers are, so the network is;
    ``lipschitz_bound`` is the product of the children's sound bounds.

    Reported on CIFAR-10 (clean / certified at 36/255): CPL, size M, 2-hour budget on one A100:
    certified 61.6% (issue 3; clean accuracy not verified here); the other sizes and kinds: not
    verified. Config: ``experiments/configs/cifar10_lipconvnet_m_cpl.yaml``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str = "aol",
        width: int = 16,
        depth: int = 5,
        kernel_size: int = 3,
    ) -> None:
        kind = get_layer_kind(conv)
        if input_size < 2 or input_size & (input_size - 1):
            raise ValueError(f"input_size must be a power of 2 >= 2 (halved down to 1x1), got {input_size}")
        if width < 2 or width % 2:
            raise ValueError(f"width must be even and >= 2 (MaxMin pairs channels), got {width}")
        if not 1 <= in_channels <= width:
            raise ValueError(
                f"in_channels must be in [1, width={width}] (zero-padded to width), got {in_channels}"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        layers: list[nn.Module] = [ChannelPad(width), kind.block(width, 1), MaxMin()]
        channels, size = width, input_size
        while size > 1:
            k = kernel_size if size > 2 else 1
            for _ in range(depth):
                layers += [kind.block(channels, k), MaxMin()]
            layers += [FirstChannels(channels // 2), InvertibleDownsampling(2)]
            channels, size = 2 * channels, size // 2
        layers += [nn.Flatten(), linear_head(kind, channels, num_classes)]
        super().__init__(*layers)
        self.input_shape = (in_channels, input_size, input_size)


def _sized(size: str, width: int) -> Callable[..., LipConvNet]:
    """Defines and registers ``lipconvnet_<size>``: :class:`LipConvNet` with ``width`` fixed by the name."""

    def constructor(
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str = "aol",
        depth: int = 5,
        kernel_size: int = 3,
    ) -> LipConvNet:
        return LipConvNet(in_channels, num_classes, input_size, conv, width, depth, kernel_size)

    # the registry and list_models() key on __name__; docs and repr read __qualname__ and __doc__
    constructor.__name__ = constructor.__qualname__ = f"lipconvnet_{size}"
    constructor.__doc__ = (
        f":class:`LipConvNet` of width {width} (Prach et al.'s {size.upper()}); ``conv=`` any layer kind."
    )
    return register_model(constructor)


lipconvnet_xs = _sized("xs", 16)
lipconvnet_s = _sized("s", 32)
lipconvnet_m = _sized("m", 64)
lipconvnet_l = _sized("l", 128)
