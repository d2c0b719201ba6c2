"""The anchor implementations the benchmarks compare lipnet's layer kinds against.

Each is wrapped as an unregistered :class:`~lipnet.layers.kinds.LayerKind` (its factories build the
anchor library's own modules), so a model layout written against ``LayerKind`` builds the same network
from either library. Nothing here is registered: ``conv=`` of the model families never selects them.

* deel-torchlip: ``SpectralConv2d`` (spectral normalisation then Björck orthogonalisation of the
  reshaped kernel; 1-Lipschitz) and ``SpectralLinear``;
* orthogonium: AOC (``AdaptiveOrthoConv2d``, Boissin et al. 2025; orthogonal with circular padding,
  1-Lipschitz with zero padding), AOL (``AOLConv2D``, Prach & Lampert 2022; 1-Lipschitz) and SLL
  (``SDPBasedLipschitzResBlock``, Araujo et al. 2023; 1-Lipschitz residual block), with ``OrthoLinear``
  dense layers (orthogonium has no AOL dense layer) and AOC channel-changing convolutions for SLL.

Like with like: in a network, unlike in one wide layer at full resolution, the weight parametrisations
dominate a CPU training step (the 256-channel 1x1 layers at 2x2 resolution and the 512x512 head of
``lipconvnet_xs`` cost more than all the convolutions), so the anchors' iteration counts matter. lipnet's
AOC runs :data:`~lipnet.layers.aoc.AOC_BJORCK_ITERATIONS` (25) Björck steps after a sound Gram-iteration
pre-scaling, orthogonium's default 12 after a power-iteration estimate (a lower bound). 12 steps leave an
ill-conditioned weight far from orthogonal whichever the pre-scaling (a Gaussian 256x256: smallest singular
value 0.17 after 12 steps, 1.00 after 25), and the step count, not the pre-scaling, makes the time (a
256-channel 1x1 AOC: 84 ms lipnet, 78 ms orthogonium at 25 steps, 38 ms at 12). So :func:`anchor_kind`
builds the AOC anchor with 25 steps and orthogonium's own pre-scaling: the same method at the same
orthogonality, differing in implementation.
The dense layers are each library's own (lipnet's Björck: 3 order-2 steps; ``OrthoLinear``: 12 order-1
steps; ``SpectralLinear``: order-1 steps until the change is below 1e-3, at most 15).

:data:`ANCHORS` is the one table of anchors every benchmark reads: which lipnet kind each stands beside,
its library, its name and its layer class, and (:class:`Anchor`) its layers, activation and pooling.
``lipnet bench models`` and ``lipnet bench layers --per-layer`` build each anchor configured as lipnet's
kind is (``Anchor.layers(as_lipnet=True)``: :func:`anchor_kind`); ``lipnet bench fmnist`` and the network
table of ``lipnet bench layers`` build the libraries as they ship (``as_lipnet=False``), each with its
own activation and pooling.

Importing this module needs neither library; each function raises ``ImportError`` when its library is
not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lipnet.layers.aoc import AOC_BJORCK_ITERATIONS
from lipnet.layers.kinds import LayerKind
from lipnet.pooling import ScaledL2NormPool2d

__all__ = ["ANCHORS", "Anchor", "anchor_kind", "deel_kind", "orthogonium_kinds"]


def _same(kernel_size: int) -> int:
    return kernel_size // 2


def deel_kind() -> LayerKind:
    """deel-torchlip's ``SpectralConv2d`` / ``SpectralLinear`` (zero 'same' padding), named ``spectral``."""
    import deel.torchlip as tl

    return LayerKind(
        name="spectral",
        block=lambda c, k: tl.SpectralConv2d(c, c, k, padding=_same(k)),
        conv=lambda i, o, k: tl.SpectralConv2d(i, o, k, padding=_same(k)),
        dense=tl.SpectralLinear,
        description="deel-torchlip spectral-normalised + Björck convolutions and dense layers",
    )


def orthogonium_kinds(
    *, aoc_padding_mode: str = "zeros", sll_inner_factor: int = 2, aoc_iterations: int | None = None
) -> dict[str, LayerKind]:
    """orthogonium's ``aoc``, ``aol`` and ``sll`` kinds, with orthogonium's default parametrisations.

    ``aoc_padding_mode`` is the padding of the AOC convolutions (``"circular"``: orthogonal, as lipnet's
    ``aoc`` kind; ``"zeros"``: 1-Lipschitz); ``sll_inner_factor`` is the ratio of the SLL blocks' inner
    channels to their channels (lipnet's ``sll`` kind uses 1); ``aoc_iterations``, when given, replaces
    the number of Björck steps of the AOC convolutions' orthogonaliser (orthogonium's default: 12), keeping
    orthogonium's power-iteration pre-scaling.
    """
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear
    from orthogonium.layers.conv.AOL import AOLConv2D
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock
    from orthogonium.model_factory.classparam import ClassParam
    from orthogonium.reparametrizers import BatchedBjorckOrthogonalization, OrthoParams

    if aoc_padding_mode not in ("zeros", "circular"):
        raise ValueError(f"aoc_padding_mode must be 'zeros' or 'circular', got {aoc_padding_mode!r}")
    if sll_inner_factor < 1:
        raise ValueError(f"sll_inner_factor must be >= 1, got {sll_inner_factor}")
    if aoc_iterations is not None and aoc_iterations < 1:
        raise ValueError(f"aoc_iterations must be >= 1, got {aoc_iterations}")
    ortho_params = (
        OrthoParams()
        if aoc_iterations is None
        else OrthoParams(
            orthogonalizer=ClassParam(
                BatchedBjorckOrthogonalization, beta=0.5, niters=aoc_iterations, pass_through=False
            )
        )
    )

    def aoc(i: int, o: int, k: int) -> nn.Module:
        return AdaptiveOrthoConv2d(
            i, o, k, padding=_same(k), padding_mode=aoc_padding_mode, ortho_params=ortho_params
        )

    def aol(i: int, o: int, k: int) -> nn.Module:
        return AOLConv2D(i, o, k, padding=_same(k))

    return {
        "aoc": LayerKind("aoc", lambda c, k: aoc(c, c, k), aoc, OrthoLinear, "orthogonium AOC + OrthoLinear"),
        "aol": LayerKind("aol", lambda c, k: aol(c, c, k), aol, OrthoLinear, "orthogonium AOL + OrthoLinear"),
        "sll": LayerKind(
            "sll",
            lambda c, k: SDPBasedLipschitzResBlock(c, inner_dim_factor=sll_inner_factor, kernel_size=k),
            aoc,
            OrthoLinear,
            "orthogonium SLL blocks, AOC convolutions, OrthoLinear",
        ),
    }


def _deel_activation() -> nn.Module:
    import deel.torchlip as tl

    return tl.GroupSort2()


def _deel_pool() -> nn.Module:
    import deel.torchlip as tl

    return tl.ScaledL2NormPool2d(2)


def _orthogonium_activation() -> nn.Module:
    from orthogonium.layers import MaxMin

    return MaxMin()


def _lipnet_pool() -> nn.Module:
    # orthogonium has no L2-norm pooling: its networks use lipnet's
    return ScaledL2NormPool2d(2)


@dataclass(frozen=True)
class Anchor:
    """One anchor: the lipnet ``kind`` it stands beside, its ``library``, the ``name`` of its layer kind
    (``library:name`` labels its rows), its channel-preserving ``layer`` class, and the library's
    activation (GroupSort2 / MaxMin) and 2x downsampling, as factories."""

    kind: str
    library: str
    name: str
    layer: str
    activation: Callable[[], nn.Module]
    pool: Callable[[], nn.Module]

    @property
    def label(self) -> str:
        """``library:name``, e.g. ``orthogonium:aol``."""
        return f"{self.library}:{self.name}"

    def layers(self, *, as_lipnet: bool) -> LayerKind:
        """The anchor's :class:`LayerKind`: configured as lipnet's kind is (``as_lipnet``: AOC with
        circular padding and :data:`~lipnet.layers.aoc.AOC_BJORCK_ITERATIONS` Björck steps, SLL blocks
        with as many inner channels as channels; see the module docstring) or as the library ships it.
        ``ImportError`` when the library is not installed."""
        if self.library == "deel-torchlip":
            return deel_kind()
        if as_lipnet:
            kinds = orthogonium_kinds(
                aoc_padding_mode="circular", sll_inner_factor=1, aoc_iterations=AOC_BJORCK_ITERATIONS
            )
        else:
            kinds = orthogonium_kinds()
        return kinds[self.name]


#: The anchors, by the lipnet kind each stands beside (Björck against deel-torchlip's spectral + Björck).
ANCHORS: dict[str, Anchor] = {
    a.kind: a
    for a in (
        Anchor("bjorck", "deel-torchlip", "spectral", "SpectralConv2d", _deel_activation, _deel_pool),
        Anchor("aoc", "orthogonium", "aoc", "AdaptiveOrthoConv2d", _orthogonium_activation, _lipnet_pool),
        Anchor("aol", "orthogonium", "aol", "AOLConv2D", _orthogonium_activation, _lipnet_pool),
        Anchor(
            "sll", "orthogonium", "sll", "SDPBasedLipschitzResBlock", _orthogonium_activation, _lipnet_pool
        ),
    )
}


def anchor_kind(kind: str) -> tuple[str, LayerKind]:
    """``(library, LayerKind)`` of the anchor of lipnet's ``kind`` (:data:`ANCHORS`), configured as lipnet's
    kind (``Anchor.layers(as_lipnet=True)``). ``ValueError`` for a kind without an anchor; ``ImportError``
    when its library is missing.
    """
    if kind not in ANCHORS:
        raise ValueError(f"layer kind {kind!r} has no anchor; kinds with one: {', '.join(ANCHORS)}")
    anchor = ANCHORS[kind]
    return anchor.library, anchor.layers(as_lipnet=True)
