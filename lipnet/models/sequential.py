"""``LipschitzSequential``: the base class of the sequential model families.

A sequential network ``f = f_n o ... o f_1`` is ``prod_i Lip(f_i)``-Lipschitz; the families built
on this class get that bound, a slicing that works with their own constructors (``model[:-1]`` is
what ``certify.radius.split_head`` uses to split off the linear head), and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, get_args

from torch import nn

from certify.bounds import input_shapes, module_bound
from lipnet.layers.bjorck import BjorckLinear
from lipnet.layers.kinds import LayerKind
from lipnet.layers.rownorm import RowNormLinear

__all__ = ["HEADS", "HeadName", "LipschitzSequential", "classifier_head", "linear_head"]

#: The classifier heads a model family takes as ``head=``: ``kind``, the layer kind's dense layer
#: (:func:`linear_head`); ``orthogonal``, a :class:`~lipnet.layers.bjorck.BjorckLinear` whatever the kind
#: (orthonormal class rows); or ``rownorm``, a :class:`~lipnet.layers.rownorm.RowNormLinear` (unit-norm class
#: rows; every logit 1-Lipschitz in the features). The annotation lets the run config refuse another name
#: before any data is loaded.
HeadName = Literal["kind", "orthogonal", "rownorm"]
HEADS: tuple[str, ...] = get_args(HeadName)


def linear_head(kind: LayerKind, in_features: int, out_features: int) -> nn.Linear:
    """The kind's dense layer as a model's last layer, which must be an ``nn.Linear``.

    ``certify``'s last-layer certificate splits off a linear head; kinds whose dense layers are
    residual blocks (``sll``, ``cpl``) build one only when ``in_features != out_features``, so a
    head of equal sizes is refused with an error rather than silently losing the certificate.
    """
    head = kind.dense(in_features, out_features)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"layer kind {kind.name!r} builds a {type(head).__name__} for "
            f"dense({in_features}, {out_features}), "
            "not an nn.Linear: the linear head needs in_features != out_features with this kind"
        )
    return head


def classifier_head(
    kind: LayerKind, in_features: int, out_features: int, head: HeadName = "kind"
) -> nn.Linear:
    """A model's last layer, an ``nn.Linear`` that ``certify``'s last-layer certificate splits off: the
    kind's dense layer (``head="kind"``, :func:`linear_head`), a Björck one (``"orthogonal"``) or a
    row-normalised one (``"rownorm"``); ``ValueError`` for another name (:data:`HEADS`)."""
    if head == "kind":
        return linear_head(kind, in_features, out_features)
    if head == "orthogonal":
        return BjorckLinear(in_features, out_features)
    if head == "rownorm":
        return RowNormLinear(in_features, out_features)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


class LipschitzSequential(nn.Sequential):
    """``nn.Sequential`` whose ``lipschitz_bound`` is the product of its children's sound bounds.

    Guarantee: Lipschitz with constant at most ``prod_i L_i``, ``L_i`` the sound float64 bound of
    child ``i`` (its own ``lipschitz_bound``, a registered bound, or its traced graph; see
    :func:`certify.bounds.module_bound`). It is 1-Lipschitz when every child is.
    """

    def __getitem__(self, idx: int | slice) -> nn.Module:
        # nn.Sequential rebuilds a slice with self.__class__(OrderedDict), which the constructors
        # of the subclasses do not take; a slice is a plain Sequential of the same modules.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Product of the children's sound float64 bounds.

        With ``input_shape`` (per sample) each child is bounded for its actual input size, which
        makes convolution bounds tighter; without it the bound holds for every input size.
        """
        shapes = input_shapes(self, tuple(input_shape)) if input_shape is not None else None
        total = 1.0
        for name, child in self.named_children():
            child_shape = shapes.get(child) if shapes is not None else None
            total *= module_bound(child, child_shape, shapes=shapes, path=name)
        return total

    def export(self) -> nn.Sequential:
        """``nn.Sequential`` of the same children: the family classes only add the product bound, which
        ``certify`` composes on its own. :func:`lipnet.export` then exports the children."""
        return nn.Sequential(OrderedDict(self.named_children()))
