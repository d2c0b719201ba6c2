"""Every lipnet class with ``lipschitz_bound`` -> a factory of small random instances.

``tests/test_soundness.py`` fails when a bounded class has no entry here, so a new module joins
the generic soundness test by being added below. Factories build modules in float32 with
PyTorch's default initialisation; the test moves them to float64 and perturbs the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec

import torch
from torch import nn

from lipnet.activations import FullSort, GroupSort, HouseholderActivation, MaxMin
from lipnet.attention import (
    CBAM,
    AttentionToScale,
    BoundedDotProductAttention,
    BoundedTranslation,
    BoundedZoom,
    CAMHead,
    FeedbackGating,
    IntegralAttention,
    L2MultiheadAttention,
    LossAttentionMIL,
    LSEPooling,
    MemoryAttention,
    MultiScaleAttentionAggregation,
    MultiTaskAttentionNetwork,
    ResidualAttention,
    SoftAttentionPooling,
    SoftGlimpse,
    SqueezeExcitation,
)
from lipnet.catalogue.networks import (
    BagNetwork,
    CAMNetwork,
    CentredPooling,
    InstanceMean,
    MultiTaskBaseline,
    MultiTaskNetwork,
    PixelTokens,
)
from lipnet.layers import (
    AOCConv2d,
    AOLConv2d,
    AOLLinear,
    BatchCentering,
    BCOPConv2d,
    BjorckConv2d,
    BjorckLinear,
    BoundedConv2d,
    BoundedLinear,
    CayleyConv2d,
    CPLConv2d,
    CPLLinear,
    FourierConv2d,
    LinearResidualConv2d,
    OrthogonalLinear,
    PotentialStep,
    RowNormLinear,
    SLLConv2d,
    SLLLinear,
)
from lipnet.models.fmnist import FashionConvNet
from lipnet.models.lipconvnet import ChannelPad, FirstChannels, LipConvNet
from lipnet.models.liresnet import LiResNet
from lipnet.models.sequential import LipschitzSequential
from lipnet.models.sll import SLLNet
from lipnet.models.small import SmallCNN
from lipnet.models.vgg import BethuneVGG
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
    # the bases without a parametrization: plain layers whose bound is that of their raw weights
    BoundedLinear: lambda: [Case(BoundedLinear(5, 3), (5,), affine=True)],
    BoundedConv2d: lambda: [
        Case(BoundedConv2d(2, 3, 3, padding=1), (2, 5, 5), affine=True),
        Case(BoundedConv2d(3, 2, 3, stride=2, padding=1, padding_mode="reflect"), (3, 6, 6), affine=True),
    ],
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
    # unit rows, not 1-Lipschitz as a whole (up to sqrt(out)): the bound is the weight's spectral norm
    RowNormLinear: lambda: [
        Case(RowNormLinear(6, 4), (6,), affine=True),
        Case(RowNormLinear(3, 5), (3,), affine=True),
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
    CayleyConv2d: lambda: [
        Case(CayleyConv2d(3, 4, 3, input_size=6), (3, 6, 6), affine=True),
        Case(CayleyConv2d(4, 2, 3, stride=2, bias=False, input_size=4), (4, 4, 4), affine=True),
    ],
    BCOPConv2d: lambda: [
        Case(BCOPConv2d(3, 4, 3, padding=1), (3, 6, 6), affine=True),
        Case(BCOPConv2d(4, 2, 3, stride=2, padding=1, padding_mode="circular"), (4, 6, 6), affine=True),
        Case(BCOPConv2d(2, 2, 2, padding=0, dilation=2, bias=False), (2, 5, 5), affine=True),
    ],
    # orthogonium is an optional extra: without it AOCConv2d cannot be built and has no cases.
    AOCConv2d: lambda: (
        [
            Case(AOCConv2d(4, 4, 3), (4, 5, 5), affine=True),
            Case(AOCConv2d(4, 8, 3, stride=2, padding=1, padding_mode="zeros"), (4, 6, 6), affine=True),
        ]
        if find_spec("orthogonium")
        else []
    ),
    LinearResidualConv2d: lambda: [
        Case(LinearResidualConv2d(3), (3, 5, 5), affine=True),
        Case(
            LinearResidualConv2d(4, groups=2, padding_mode="circular", normalize=True, bound_grid=8),
            (4, 5, 5),
            affine=True,
        ),
    ],
    SLLLinear: lambda: [Case(SLLLinear(5), (5,)), Case(SLLLinear(4, 7), (4,))],
    SLLConv2d: lambda: [Case(SLLConv2d(2, 3), (2, 5, 5)), Case(SLLConv2d(3, 2, 1), (3, 4, 4))],
    CPLLinear: lambda: [Case(CPLLinear(5), (5,)), Case(CPLLinear(6, 3), (6,))],
    CPLConv2d: lambda: [Case(CPLConv2d(2, 3), (2, 5, 5)), Case(CPLConv2d(3, 2, 1, grid_size=4), (3, 4, 4))],
    BatchCentering: lambda: [
        Case(BatchCentering(3), (3, 4, 4), affine=True, per_sample_in_training=False),
        Case(BatchCentering(5), (5,), affine=True, per_sample_in_training=False),
        Case(BatchCentering(4, momentum=None, bias=False), (4, 6), affine=True, per_sample_in_training=False),
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
    FashionConvNet: lambda: [
        Case(FashionConvNet(num_classes=3, width=2, hidden=2, input_size=8), (1, 8, 8)),
        Case(FashionConvNet(in_channels=2, width=2, blocks=0, hidden=4, conv="aol", input_size=4), (2, 4, 4)),
        Case(
            FashionConvNet(num_classes=4, width=2, blocks=1, hidden=2, input_size=4, head="rownorm"),
            (1, 4, 4),
        ),
        Case(
            FashionConvNet(num_classes=3, width=2, hidden=4, input_size=4, activation="householder"),
            (1, 4, 4),
        ),
    ],
    LipschitzSequential: lambda: [
        Case(LipschitzSequential(BjorckLinear(4, 6), GroupSort(2), AOLLinear(6, 3)), (4,)),
    ],
    ChannelPad: lambda: [Case(ChannelPad(4), (2, 3, 3), affine=True)],
    FirstChannels: lambda: [Case(FirstChannels(2), (3, 2, 2), affine=True)],
    BethuneVGG: lambda: [
        Case(BethuneVGG(1, 3, input_size=4, widths=(2, 2), depths=(1, 1), hidden=4), (1, 4, 4)),
        Case(BethuneVGG(2, 3, input_size=4, conv="aol", widths=(2, 4), depths=(2, 1), hidden=2), (2, 4, 4)),
    ],
    LipConvNet: lambda: [
        Case(LipConvNet(1, 3, input_size=4, conv="aol", width=2, depth=1), (1, 4, 4)),
        Case(LipConvNet(2, 3, input_size=2, conv="bjorck", width=2, depth=2), (2, 2, 2)),
    ],
    SLLNet: lambda: [
        Case(SLLNet(1, 3, input_size=4, width=2, n_conv=2, n_dense=1, dense_inner=3), (1, 4, 4)),
    ],
    LiResNet: lambda: [Case(LiResNet(1, 3, input_size=8, width=2, depth=2, hidden=2), (1, 8, 8))],
    SmallCNN: lambda: [
        Case(SmallCNN(in_channels=1, num_classes=3, width=2, input_size=8), (1, 8, 8)),
        Case(
            SmallCNN(2, 4, width=2, conv="aol", input_size=4, pool="invertible", norm="none"),
            (2, 4, 4),
        ),
        # AOL's default: centred after each convolution, which couples the samples of a training batch
        Case(
            SmallCNN(in_channels=1, num_classes=3, width=2, conv="aol", input_size=4),
            (1, 4, 4),
            per_sample_in_training=False,
        ),
    ],
    SqueezeExcitation: lambda: [
        Case(SqueezeExcitation(4, reduction=2, normalize=False), (4, 3, 3)),
        Case(SqueezeExcitation(4, reduction=2, clamp=2.0), (4, 3, 3)),
    ],
    CBAM: lambda: [
        Case(CBAM(4, reduction=2, kernel_size=3, normalize=False), (4, 3, 3)),
        Case(CBAM(4, reduction=2, kernel_size=3, use_max=True), (4, 3, 3)),
    ],
    ResidualAttention: lambda: [Case(ResidualAttention(2, normalize=False), (2, 4, 4))],
    BoundedDotProductAttention: lambda: [
        Case(BoundedDotProductAttention(4, heads=2, radius=2.0, normalize=False), (4, 4)),
        Case(BoundedDotProductAttention(4, heads=1), (3, 4)),
    ],
    L2MultiheadAttention: lambda: [
        Case(L2MultiheadAttention(4, heads=2, normalize=False), (4, 4)),
        Case(L2MultiheadAttention(4, heads=1), (3, 4)),
    ],
    MemoryAttention: lambda: [Case(MemoryAttention(4, slots=5, beta=2.0), (3, 4))],
    SoftAttentionPooling: lambda: [
        Case(SoftAttentionPooling(4, attention_dim=3, radius=2.0, normalize=False), (5, 4)),
        Case(SoftAttentionPooling(4, attention_dim=3), (5, 4)),
    ],
    LossAttentionMIL: lambda: [
        Case(LossAttentionMIL(4, 3, beta=2.0, normalize=False), (5, 4)),
        Case(LossAttentionMIL(4, 3), (5, 4)),
    ],
    LSEPooling: lambda: [Case(LSEPooling(beta=3.0), (5, 4))],
    FeedbackGating: lambda: [
        Case(FeedbackGating(1, 2, clamp=2.0, normalize=False), (1, 3, 3)),
        Case(FeedbackGating(2, 2), (2, 3, 3)),
    ],
    AttentionToScale: lambda: [
        Case(AttentionToScale(1, 2, hidden=2, radius=2.0, normalize=False), (1, 4, 4)),
    ],
    MultiTaskAttentionNetwork: lambda: [
        Case(MultiTaskAttentionNetwork(1, 2, (1, 2), clamp=2.0, normalize=False), (1, 3, 3)),
    ],
    BoundedTranslation: lambda: [
        Case(BoundedTranslation(1, 4, hidden=3, radius=2.0, normalize=False), (1, 4, 4)),
        Case(BoundedTranslation(2, 4, hidden=3, radius=2.0, normalize=False, transform_bound=0.5), (2, 4, 4)),
    ],
    BoundedZoom: lambda: [
        Case(BoundedZoom(1, 4, hidden=3, min_scale=0.5, normalize=False), (1, 4, 4)),
        Case(BoundedZoom(1, 4, hidden=3, min_scale=0.75, normalize=False, transform_bound=0.5), (1, 4, 4)),
    ],
    SoftGlimpse: lambda: [
        Case(SoftGlimpse(1, 2, radius=2.0, normalize=False), (1, 4, 4)),
        Case(SoftGlimpse(2, 3, radius=2.0, normalize=False, attention_bound=0.5), (2, 5, 5)),
    ],
    # Frozen export layers with arbitrary weights: a symbol that is not a real convolution's, and an
    # outer weight that is not the rescaled adjoint of the inner one (the bound pays for the difference).
    FourierConv2d: lambda: [
        Case(
            FourierConv2d(torch.randn(4, 3, 2, 3, dtype=torch.cfloat), torch.randn(2), 1, (4, 4)), (3, 4, 4)
        ),
        Case(FourierConv2d(torch.randn(2, 2, 2, 8, dtype=torch.cfloat), None, 2, (4, 4)), (2, 4, 4)),
    ],
    PotentialStep: lambda: [
        Case(PotentialStep(nn.Linear(4, 3), nn.Linear(3, 4, bias=False), torch.rand(3)), (4,)),
        Case(
            PotentialStep(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.ConvTranspose2d(3, 2, 3, padding=1, bias=False),
                torch.rand(3),
            ),
            (2, 4, 4),
        ),
    ],
    # The catalogue's task networks (lipnet.catalogue.networks), at tiny sizes.
    PixelTokens: lambda: [
        Case(PixelTokens(L2MultiheadAttention(4, heads=1, normalize=False)), (4, 2, 2)),
        Case(PixelTokens(MemoryAttention(4, slots=3), residual=False), (4, 2, 2)),
    ],
    InstanceMean: lambda: [Case(InstanceMean(), (3, 4), affine=True)],
    BagNetwork: lambda: [
        Case(
            BagNetwork(
                nn.Sequential(nn.Flatten(), BjorckLinear(4, 3)), InstanceMean(), 3, instance_channels=1
            ),
            (3, 2, 2),
            affine=True,
        ),
        Case(
            BagNetwork(
                nn.Sequential(nn.Flatten(), BjorckLinear(4, 4)),
                nn.Sequential(
                    CentredPooling(SoftAttentionPooling(4, attention_dim=2, radius=2.0)), BjorckLinear(4, 2)
                ),
                4,
                instance_channels=1,
            ),
            (2, 2, 2),
        ),
    ],
    MultiTaskBaseline: lambda: [Case(MultiTaskBaseline(2, (1, 2), depth=2), (2, 3, 3))],
    MultiTaskNetwork: lambda: [
        Case(MultiTaskNetwork(2, MultiTaskBaseline(2, (2, 2, 1)), 3, 2, feature_side=2), (3, 4, 4)),
        Case(
            MultiTaskNetwork(2, MultiTaskAttentionNetwork(2, 2, (2, 2, 1), clamp=2.0), 3, 2, feature_side=2),
            (3, 4, 4),
        ),
    ],
    CAMNetwork: lambda: [
        Case(CAMNetwork(2, CAMHead(4, 3)), (3, 4, 4)),
        Case(CAMNetwork(2, CAMHead(4, 2, normalize=False)), (3, 4, 4)),
    ],
    CentredPooling: lambda: [
        Case(CentredPooling(SoftAttentionPooling(4, attention_dim=3, radius=2.0), normalize=False), (5, 4)),
        Case(CentredPooling(SoftAttentionPooling(4, attention_dim=3, radius=2.0)), (3, 4)),
    ],
    MultiScaleAttentionAggregation: lambda: [
        Case(MultiScaleAttentionAggregation(2, 3, scales=2, radius=2.0, normalize=False), (2, 4, 4)),
        Case(MultiScaleAttentionAggregation(2, 3, scales=2, mask="elementwise", aggregate="max"), (2, 3, 2)),
    ],
    CAMHead: lambda: [
        Case(CAMHead(3, 2, normalize=False), (3, 3, 3), affine=True),
        Case(CAMHead(2, 3), (2, 2, 3), affine=True),
    ],
    IntegralAttention: lambda: [
        Case(IntegralAttention(2, 2, hidden=2, normalize=False), (2, 4, 4)),
        Case(IntegralAttention(1, 3, hidden=2), (1, 3, 3)),
    ],
}
