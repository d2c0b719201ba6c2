"""Lipschitz-bounded attention modules, one file per family.

Every module has ``lipschitz_bound(input_shape=None)``: a sound float64 upper bound of its L2
Lipschitz constant computed from its current weights (global mode: clamps, soft clamps and ball
projections inside the module make the constants hold on every input). Modules with a
``normalize`` flag divide their output by that bound when it is set.
"""

from lipnet.attention.cam import CAMHead, IntegralAttention, OnlineAttentionAccumulator
from lipnet.attention.cbam import CBAM
from lipnet.attention.gating import AttentionToScale, FeedbackGating
from lipnet.attention.mil import LossAttentionMIL, LSEPooling, SoftAttentionPooling
from lipnet.attention.mtan import MultiTaskAttentionNetwork
from lipnet.attention.multiscale import MultiScaleAttentionAggregation
from lipnet.attention.residual_attention import ResidualAttention
from lipnet.attention.se import SqueezeExcitation
from lipnet.attention.self_attention import BoundedDotProductAttention, L2MultiheadAttention, MemoryAttention
from lipnet.attention.spatial import BoundedTranslation, BoundedZoom, SoftGlimpse

__all__ = [
    "CBAM",
    "AttentionToScale",
    "BoundedDotProductAttention",
    "BoundedTranslation",
    "BoundedZoom",
    "CAMHead",
    "FeedbackGating",
    "IntegralAttention",
    "L2MultiheadAttention",
    "LSEPooling",
    "LossAttentionMIL",
    "MemoryAttention",
    "MultiScaleAttentionAggregation",
    "MultiTaskAttentionNetwork",
    "OnlineAttentionAccumulator",
    "ResidualAttention",
    "SoftAttentionPooling",
    "SoftGlimpse",
    "SqueezeExcitation",
]
