"""``lipconvnet_{xs,s,m,l}``: the ConvNet of Prach, Brau, Buttazzo & Lampert (CVPR 2024)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import redefines_behaviour
from lipnet.activations import MaxMin
from lipnet.layers.kinds import LayerKind, get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import LipschitzSequential
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
                f"got {list(x.shape)}"  # a list: TorchScript cannot build a tuple of unknown length
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
                f"got {list(x.shape)}"  # a list: TorchScript cannot build a tuple of unknown length
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

    Layout (that of the authors' code, ``models/simplified_conv_net.py`` of
    github.com/berndprach/1LipschitzLayersCompared, sizes ``ConvNet{XS,S,M,L}`` of its
    ``DEFAULT_MODELS``): :class:`ChannelPad` to ``width`` channels; a 1x1 ``block(width)`` and
    MaxMin; then ``log2(input_size)`` stages ``i = 0, 1, ...``, each ``depth`` x
    [``block(width 2^i, k)``, MaxMin] (``k = 3``, and ``k = 1`` in the stage at 2x2 resolution,
    where a 3x3 kernel has no room), followed by :class:`FirstChannels` (half of the channels) and
    a 2x2 :class:`~lipnet.pooling.InvertibleDownsampling` (PixelUnshuffle), so the channels double
    at each downsampling; no BatchNorm, no skips. The head, at 1x1 resolution with
    ``F = width input_size`` features, is the paper's: a square ``F -> F`` layer of the kind and
    its first ``num_classes`` outputs as logits (:class:`FirstChannels`). The authors build it as a
    1x1 convolution of the kind (a dense layer for Cayley and BCOP); on a 1x1 map that is the
    kind's ``dense(F, F)`` after flattening, which is what this class uses: an ``nn.Linear`` for
    AOL / Björck / orthogonal kinds, a residual block for ``sll`` / ``cpl`` (as in the paper).
    Every other layer is channel-preserving, so the kind's ``block`` factory builds all of them.
    Differences from the authors' code: the ``cayley`` and ``aoc`` kinds' square head is a Björck
    dense layer (theirs: ``CayleyLinear``; orthogonal either way); their ``AdaptiveMaxPool2d(1)``
    before the head (the identity on a 1x1 map) is left out; initialisations are the kinds' own
    (theirs, for AOL: Dirac-initialised blocks, orthogonally initialised first and head layers).

    Parameters: with plain convolutions and biases (the count of the ``aol`` and ``bjorck`` kinds)
    the layout has ``w^2 + w + sum_i depth (k_i^2 c_i^2 + c_i) + F^2 + F`` parameters
    (``c_i = w 2^i``), i.e. 1,572,288 / 6,283,136 / 25,120,512 / 100,457,984 for width 16 / 32 /
    64 / 128 at 32x32 (the paper's "about 1.6 / 6.3 / 25 / 100 M"); the other kinds' counts
    follow their layer parametrisations (``lipconvnet_xs``: ``sll`` 1,575,296, ``aoc`` 919,488).
    ``F^2 - F num_classes`` weights of the square head do not produce logits, but with AOL and
    Björck they shape the rows that do, through the normalisation of the whole square matrix.

    Last-layer certificate: :meth:`split_head` returns the linear map onto the logits that
    ``certify`` needs (see there); the model itself ends with :class:`FirstChannels`.

    Guarantee: every child is 1-Lipschitz when the kind's layers are, so the network is;
    ``lipschitz_bound`` is the product of the children's sound bounds.

    Reported on CIFAR-10 (clean / certified at 36/255): CPL, size M, 2-hour budget on one A100:
    certified 61.6% (issue 3; clean accuracy not verified here); the other sizes and kinds: not
    verified. Config: ``experiments/configs/cifar10_lipconvnet_m_cpl.yaml``.

    ``conv`` is a registered kind's name or a :class:`~lipnet.layers.kinds.LayerKind` (e.g. one of
    the anchor libraries' kinds in :mod:`lipnet.bench.anchors`, for benchmarks).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str | LayerKind = "aol",
        width: int = 16,
        depth: int = 5,
        kernel_size: int = 3,
    ) -> None:
        kind = conv if isinstance(conv, LayerKind) else get_layer_kind(conv)
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
        features = width * input_size
        if not 2 <= num_classes <= features:
            raise ValueError(
                f"num_classes must be in [2, width * input_size = {features}] (the first outputs of the "
                f"square head), got {num_classes}"
            )
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
        layers += [nn.Flatten(), kind.dense(channels, channels), FirstChannels(num_classes)]
        super().__init__(*layers)
        self.input_shape = (in_channels, input_size, input_size)
        #: ``F``, the features of the square head.
        self.features = channels

    def split_head(self) -> tuple[nn.Module, nn.Linear]:
        """``(body, head)`` with ``model(x) == head(body(x))`` and ``head`` linear, for ``certify``.

        When the square head layer is a plain-behaving ``nn.Linear`` (its forward is
        ``nn.Linear``'s, whatever parametrizes its weight), ``body`` is the network up to the
        flattening and ``head`` a new ``nn.Linear`` holding the first ``num_classes`` rows of the
        weight and bias the layer uses now (in the current mode; ``certify`` calls this in eval
        mode): the last-layer certificate then uses the rows that produce the logits. Otherwise
        (a residual head, ``sll`` / ``cpl``) ``body`` ends with that layer and ``head`` is the
        coordinate projection :class:`FirstChannels` as an ``nn.Linear`` ``[I 0]`` without bias,
        whose rows give the same radius as the global certificate. ``head`` is a copy: call this
        again after the weights change.
        """
        dense, first = self[-2], self[-1]
        if not isinstance(first, FirstChannels):
            raise TypeError(f"LipConvNet must end with FirstChannels, ends with {type(first).__name__}")
        n = first.channels
        with torch.no_grad():
            if isinstance(dense, nn.Linear) and not redefines_behaviour(type(dense), nn.Linear):
                weight = dense.weight.detach()[:n].clone()
                bias = None if dense.bias is None else dense.bias.detach()[:n].clone()
                body = self[:-2]
            else:
                ref = next(self.parameters())
                weight = torch.eye(n, self.features, device=ref.device, dtype=ref.dtype)
                bias = None
                body = self[:-1]
            head = nn.Linear(weight.shape[1], n, bias is not None, device=weight.device, dtype=weight.dtype)
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        return body, head


def _sized(size: str, width: int) -> Callable[..., LipConvNet]:
    """Defines and registers ``lipconvnet_<size>``: :class:`LipConvNet` with ``width`` fixed by the name."""

    def constructor(
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        conv: str | LayerKind = "aol",
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
