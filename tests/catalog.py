"""Every lipnet class with ``lipschitz_bound`` -> a factory of small random instances.

``tests/test_soundness.py`` fails when a bounded class has no entry here, so a new module joins
the generic soundness test by being added below. Factories build modules in float32 with
PyTorch's default initialisation; the test moves them to float64 and perturbs the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lipnet.activations import FullSort, GroupSort, HouseholderActivation, MaxMin
from lipnet.layers import (
    AOLConv2d,
    AOLLinear,
    BatchCentering,
    BjorckConv2d,
    BjorckLinear,
    OrthogonalLinear,
)
from lipnet.models.small import SmallCNN
from lipnet.pooling import GlobalL2NormPool2d, InvertibleDownsampling, ScaledAvgPool2d, ScaledL2NormPool2d

__all__ = ["CATALOG", "Case"]


@dataclass
class Case:
    """One instance to test: the module, its per-sample input shape, and whether it is affine.

    ``per_sample_in_training`` is False for modules that couple the samples of a batch in
    training mode (batch statistics): their training-mode guarantee is about the whole batch and
    is tested in their own unit tests, not per sample here.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    affine: bool = False
    per_sample_in_training: bool = True


Factory = Callable[[], list[Case]]

CATALOG: dict[type[nn.Module], Factory] = {
    OrthogonalLinear: lambda: [
        Case(OrthogonalLinear(5, 7), (5,), affine=True),
        Case(OrthogonalLinear(6, 3, orthogonal_map="cayley"), (6,), affine=True),
    ],
    BjorckLinear: lambda: [
        Case(BjorckLinear(5, 7), (5,), affine=True),
        Case(BjorckLinear(8, 4), (8,), affine=True),
        Case(BjorckLinear(6, 6, train_iterations=1, order=1), (6,), affine=True),
    ],
    AOLLinear: lambda: [
        Case(AOLLinear(5, 7), (5,), affine=True),
        Case(AOLLinear(9, 4), (9,), affine=True),
    ],
    BjorckConv2d: lambda: [
        Case(BjorckConv2d(2, 4, 3, padding=1), (2, 6, 6), affine=True),
        Case(BjorckConv2d(4, 2, 3, stride=2, padding=1, padding_mode="reflect"), (4, 7, 7), affine=True),
        Case(
            BjorckConv2d(4, 4, 3, padding=2, dilation=2, groups=2, padding_mode="circular"),
            (4, 6, 6),
            affine=True,
        ),
        Case(BjorckConv2d(2, 3, 2, stride=2, padding=1, padding_mode="replicate"), (2, 5, 5), affine=True),
    ],
    AOLConv2d: lambda: [
        Case(AOLConv2d(2, 4, 3, padding=1), (2, 6, 6), affine=True),
        Case(AOLConv2d(4, 4, 3, stride=2, groups=2), (4, 7, 7), affine=True),
        Case(AOLConv2d(3, 2, 3, padding=1, padding_mode="circular"), (3, 5, 5), affine=True),
    ],
    BatchCentering: lambda: [
        Case(BatchCentering(3), (3, 4, 4), affine=True, per_sample_in_training=False),
        Case(BatchCentering(5), (5,), affine=True, per_sample_in_training=False),
    ],
    GroupSort: lambda: [Case(GroupSort(2), (6, 3, 3)), Case(GroupSort(3), (6,))],
    MaxMin: lambda: [Case(MaxMin(), (4, 2, 2))],
    FullSort: lambda: [Case(FullSort(), (5,)), Case(FullSort(), (4, 2, 2))],
    HouseholderActivation: lambda: [
        Case(HouseholderActivation(4), (4, 3, 3)),
        Case(HouseholderActivation(6), (6,)),
    ],
    ScaledL2NormPool2d: lambda: [
        Case(ScaledL2NormPool2d(2), (2, 4, 4)),
        Case(ScaledL2NormPool2d((2, 3)), (1, 5, 6)),
    ],
    ScaledAvgPool2d: lambda: [Case(ScaledAvgPool2d(2), (2, 4, 4), affine=True)],
    InvertibleDownsampling: lambda: [Case(InvertibleDownsampling(2), (2, 4, 4), affine=True)],
    GlobalL2NormPool2d: lambda: [Case(GlobalL2NormPool2d(), (3, 3, 3))],
    SmallCNN: lambda: [
        Case(SmallCNN(in_channels=1, num_classes=3, width=2, input_size=8), (1, 8, 8)),
        Case(
            SmallCNN(in_channels=2, num_classes=4, width=2, conv="aol", input_size=4, pool="invertible"),
            (2, 4, 4),
        ),
    ],
}
