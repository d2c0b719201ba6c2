"""``fmnist_convnet_s`` / ``fmnist_convnet_m``: the Fashion-MNIST yardstick networks (1x28x28, 10 classes).

One layout, :func:`fmnist_layers`, built from the three factories of a
:class:`~lipnet.layers.kinds.LayerKind` (stem / channel-changing ``conv``, channel-preserving
``block``, ``dense``). :class:`FashionConvNet` is that layout with a registered lipnet kind, GroupSort2
(or Householder activations, ``activation="householder"``) and scaled L2-norm pooling; ``lipnet bench
fmnist`` passes deel-torchlip's and orthogonium's layers to the same function so that every library
trains exactly the same architecture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Literal, get_args

from torch import nn

from lipnet.activations import GroupSort, HouseholderActivation
from lipnet.layers.kinds import AUTO, AUTO_TAU_SPLIT, LayerKind, get_layer_kind
from lipnet.models.registry import register_model
from lipnet.models.sequential import HEADS, HeadName, LipschitzSequential, classifier_head
from lipnet.pooling import ScaledL2NormPool2d

__all__ = [
    "ACTIVATIONS",
    "AUTO_TAUS",
    "HOUSEHOLDER_TAU",
    "ROWNORM_TAU",
    "SIZES",
    "ActivationName",
    "FashionConvNet",
    "activation_factory",
    "activation_for_tau",
    "auto_options",
    "fmnist_convnet_m",
    "fmnist_convnet_s",
    "fmnist_layers",
    "head_for_tau",
]

#: The activations of :class:`FashionConvNet` (``model.activation``): ``groupsort``, GroupSort of size 2
#: (MaxMin on adjacent channel pairs), or ``householder``, a
#: :class:`~lipnet.activations.HouseholderActivation` per layer (a learned reflection angle per channel
#: pair, MaxMin at initialisation). Both are gradient-norm preserving and exactly 1-Lipschitz.
ActivationName = Literal["groupsort", "householder"]
ACTIVATIONS: tuple[str, ...] = get_args(ActivationName)


#: The temperature from which :func:`activation_for_tau` takes ``householder``, up to
#: :data:`~lipnet.layers.kinds.AUTO_TAU_SPLIT`.
HOUSEHOLDER_TAU = 1.0


def activation_factory(name: ActivationName) -> Callable[[int], nn.Module]:
    """The activation ``name`` (:data:`ACTIVATIONS`) as a factory of the number of channels it acts on;
    ``ValueError`` for another name."""
    if name == "groupsort":
        return lambda channels: GroupSort(2)
    if name == "householder":
        return HouseholderActivation
    hint = " (model.conv: auto picks it from loss.tau when model.activation is unset)" if name == AUTO else ""
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}{hint}")


def activation_for_tau(tau: float | None) -> ActivationName:
    """The activation a training config with ``model.conv: auto`` gives a Fashion-MNIST network (unless it
    sets ``model.activation``) for a loss of temperature ``tau``: ``householder`` for ``HOUSEHOLDER_TAU <=
    tau < AUTO_TAU_SPLIT``, where the kind is ``bcop``, else ``groupsort``.

    Measured on Fashion-MNIST, 60,000 images, three seeds (``docs/benchmarks.md``, "Householder
    activations at tau 5"): with bcop at tau 5 they add +0.2 clean and +0.3 / +0.6 / +1.2 / +1.0 points
    certified at eps 0.1 / 0.3 / 0.5 / 1 at 4 epochs, at tau 1 +0.2 clean and +0.1 to +0.3 in every
    certified column; at tau 0.5 (4 and 20 epochs) and with rko_bcop they change nothing beyond the seeds'
    noise, so the cheaper GroupSort stays there.
    """
    return "householder" if tau is not None and HOUSEHOLDER_TAU <= tau < AUTO_TAU_SPLIT else "groupsort"


#: The temperature from which :func:`head_for_tau` takes ``rownorm``.
ROWNORM_TAU = 50.0


def head_for_tau(tau: float | None) -> HeadName:
    """The last layer a training config with ``model.conv: auto`` gives a Fashion-MNIST network (unless it
    sets ``model.head``) for a loss of temperature ``tau``: ``rownorm`` (unit-norm class rows,
    :class:`~lipnet.layers.rownorm.RowNormLinear`) from ``ROWNORM_TAU`` on, else ``kind`` (the kind's
    orthonormal dense layer).

    Measured on Fashion-MNIST, 60,000 images x 4 epochs (``docs/benchmarks.md``, "A row-normalised head at
    the accurate end"): with rko_bcop at tau 50 and 100 (three seeds each) the head certifies +11 / +8
    points more at eps 0.1 at the same clean accuracy. The last-layer certificate divides each pair's margin
    by ``||w_y - w_j||``, which an orthonormal head fixes at ``sqrt(2)``; the trained rows put the classes
    the data confuses closer (T-shirt / shirt 0.91 at tau 100). At tau 0.1, 1, 5, 10 and 20 the head lost
    clean accuracy or certified accuracy at small eps; at 0.5 it moved along the front (level at 4 epochs,
    -0.3 clean and +0.4 to +1.3 certified from eps 0.5 at 20).
    """
    return "rownorm" if tau is not None and tau >= ROWNORM_TAU else "kind"


#: The temperatures at which the network of ``model.conv: auto`` for a Fashion-MNIST model changes
#: (:func:`~lipnet.layers.kinds.kind_for_tau`, :func:`activation_for_tau`, :func:`head_for_tau`): it is
#: one network between two of them, and below the first, where it is the network for ``tau=None``.
AUTO_TAUS: tuple[float, ...] = (HOUSEHOLDER_TAU, AUTO_TAU_SPLIT, ROWNORM_TAU)


def auto_options(tau: float | None, given: Collection[str] = ()) -> dict[str, str]:
    """The arguments besides ``conv`` that ``model.conv: auto`` sets on a Fashion-MNIST network at the
    temperature ``tau``: of ``activation_for_tau(tau)`` and ``head_for_tau(tau)``, those that differ from
    :class:`FashionConvNet`'s defaults and that ``given`` (the arguments a config sets itself) does not
    name."""
    chosen = {"activation": activation_for_tau(tau), "head": head_for_tau(tau)}
    defaults = inspect.signature(FashionConvNet).parameters
    return {k: v for k, v in chosen.items() if k not in given and v != defaults[k].default}


#: Keyword arguments of :func:`fmnist_layers` for ``fmnist_convnet_s`` / ``_m``: their defaults, which the
#: model config overrides (``model.width``, ``model.blocks``, ``model.hidden``). ``blocks: 0`` is
#: deel-torchlip's anchor layout, which ``experiments/configs/fmnist_convnet_s.yaml`` trains: with Björck the
#: channel-preserving blocks are contractive RKO convolutions at initialisation, and one block per stage
#: cost 2.4x the time per step and about 3.5 points of clean accuracy at a short budget (20,000 images x 3
#: epochs); ``lipnet bench fmnist`` keeps the sizes below, its tables' layout.
SIZES: dict[str, dict[str, int]] = {
    "s": {"width": 16, "blocks": 1, "hidden": 64},
    "m": {"width": 32, "blocks": 2, "hidden": 256},
}


def fmnist_layers(
    kind: LayerKind,
    *,
    activation: Callable[[int], nn.Module],
    pool: Callable[[], nn.Module],
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    blocks: int = 1,
    hidden: int = 64,
    input_size: int = 28,
) -> list[nn.Module]:
    """The layers of the Fashion-MNIST convnet, in order (the last one is the dense head).

    ``conv(c, w) A [block(w) A] * blocks pool conv(w, 2w) A [block(2w) A] * blocks pool flatten
    dense(2w (s/4)^2, hidden) A dense(hidden, num_classes)``, with 3x3 'same' convolutions,
    A = ``activation(channels)`` (given the number of channels or features it acts on), a 2x
    downsampling ``pool()`` that keeps the channels, and s = ``input_size``.
    """
    for name, value in (
        ("in_channels", in_channels),
        ("width", width),
        ("hidden", hidden),
        ("input_size", input_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"blocks must be a non-negative integer, got {blocks!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if width % 2 or hidden % 2:
        raise ValueError(f"width and hidden must be even (GroupSort2 pairs channels), got {width}, {hidden}")
    if input_size % 4:
        raise ValueError(f"input_size must be a multiple of 4 (two 2x downsamplings), got {input_size}")
    layers: list[nn.Module] = []
    channels = in_channels
    for c in (width, 2 * width):
        layers += [kind.conv(channels, c, 3), activation(c)]
        for _ in range(blocks):
            layers += [kind.block(c, 3), activation(c)]
        layers.append(pool())
        channels = c
    side = input_size // 4
    layers += [
        nn.Flatten(),
        kind.dense(channels * side * side, hidden),
        activation(hidden),
        kind.dense(hidden, num_classes),
    ]
    return layers


class FashionConvNet(LipschitzSequential):
    """The :func:`fmnist_layers` convnet with a registered lipnet layer kind; each part 1-Lipschitz.

    ``conv`` names the kind (:func:`lipnet.layers.kinds.list_layer_kinds`; default ``bcop``: orthogonal
    BCOP convolutions, which at 1.1x the step of Björck's contractive RKO convolutions matched orthogonium's
    AOC and beat deel-torchlip at tau 0.5 in ``docs/benchmarks.md``); activations are GroupSort of
    size 2, or with ``activation="householder"`` Householder activations (:data:`ACTIVATIONS`), and
    downsamplings are 2x2 :class:`~lipnet.pooling.ScaledL2NormPool2d`, so the network is 1-Lipschitz
    in L2 up to the rounding of its layers' parametrizations. ``lipschitz_bound`` measures that from
    the actual weights: the product of the children's sound float64 bounds
    (:class:`~lipnet.models.sequential.LipschitzSequential`). When the kind's dense layer is an
    ``nn.Linear``, the last child is the linear head and ``certify``'s last-layer certificate splits it
    off. ``head="rownorm"`` makes that head a :class:`~lipnet.layers.rownorm.RowNormLinear` (unit class
    rows; the network up to the head stays 1-Lipschitz, each logit too).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks: int = 1,
        hidden: int = 64,
        conv: str = "bcop",
        input_size: int = 28,
        head: HeadName = "kind",
        activation: ActivationName = "groupsort",
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        kind = get_layer_kind(conv)
        layers = fmnist_layers(
            kind,
            activation=activation_factory(activation),
            pool=lambda: ScaledL2NormPool2d(2),
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            blocks=blocks,
            hidden=hidden,
            input_size=input_size,
        )
        if head != "kind":
            layers[-1] = classifier_head(kind, hidden, num_classes, head)
        super().__init__(*layers)
        self.input_shape = (in_channels, input_size, input_size)


def _sized(size: str, label: str, width: int, blocks: int, hidden: int) -> Callable[..., FashionConvNet]:
    """Defines and registers ``fmnist_convnet_<size>``: :class:`FashionConvNet` whose size arguments default
    to ``width``, ``blocks`` and ``hidden``."""
    default_width, default_blocks, default_hidden = width, blocks, hidden

    def constructor(
        conv: str = "bcop",
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = default_width,
        blocks: int = default_blocks,
        hidden: int = default_hidden,
        head: HeadName = "kind",
        activation: ActivationName = "groupsort",
    ) -> FashionConvNet:
        return FashionConvNet(
            in_channels, num_classes, width, blocks, hidden, conv, input_size, head, activation
        )

    # the registry and list_models() key on __name__; docs and repr read __qualname__ and __doc__
    constructor.__name__ = constructor.__qualname__ = f"fmnist_convnet_{size}"
    constructor.__doc__ = (
        f"{label} Fashion-MNIST :class:`FashionConvNet`: by default width {width}, {blocks} "
        f"block{'' if blocks == 1 else 's'} per stage, dense {hidden} (``width``, ``blocks``, ``hidden`` "
        "override them); ``head``: ``kind`` (the kind's dense layer) or ``rownorm``; ``activation``: "
        "``groupsort`` or ``householder``."
    )
    return register_model(constructor)


fmnist_convnet_s = _sized("s", "Small", **SIZES["s"])
fmnist_convnet_m = _sized("m", "Medium", **SIZES["m"])
