"""``lipnet.export(model)``: a copy of a trained model made of plain torch layers.

Every parametrized ``nn.Conv2d`` / ``nn.Linear`` (Björck, AOL, orthogonal, linear-residual, ...)
becomes a plain ``nn.Conv2d`` / ``nn.Linear`` holding the weight the layer uses in eval mode, with
the same stride, padding, padding mode, dilation and groups; the weight parametrizations and their
eval caches are gone. The model families' containers
(:class:`~lipnet.models.sequential.LipschitzSequential`) become ``nn.Sequential``. Activations,
pooling, residual blocks (SLL, CPL) and any other module are deep-copied unchanged: the ones
lipnet provides keep their ``lipschitz_bound`` (or a registered bound), so
:func:`certify.bounds.lipschitz_bound` still bounds the copy, from its plain weights.

A subclass of ``nn.Conv2d`` / ``nn.Linear`` that redefines ``forward`` or ``_conv_forward``
computes something else than the plain layer and is copied unchanged rather than converted.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TypeVar

import torch
from torch import Tensor, nn

from lipnet.models.sequential import LipschitzSequential

__all__ = ["export"]

_BEHAVIOUR = ("forward", "_conv_forward")
_Layer = TypeVar("_Layer", nn.Conv2d, nn.Linear)


def _plain_behaviour(module: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``module`` computes what ``base`` computes with the same weight (no class in between
    redefines the forward pass; torch's generated ``Parametrized...`` class only adds properties)."""
    for klass in type(module).__mro__:
        if klass is base:
            return True
        if any(name in klass.__dict__ for name in _BEHAVIOUR):
            return False
    return False


def _filled(out: _Layer, weight: Tensor, bias: Tensor | None) -> _Layer:
    """``out`` holding the evaluated ``weight`` and the source layer's ``bias``."""
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def _plain_conv(layer: nn.Conv2d) -> nn.Conv2d:
    weight = layer.weight.detach().clone()
    out = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,  # type: ignore[arg-type]
        layer.stride,  # type: ignore[arg-type]
        layer.padding,  # type: ignore[arg-type]
        layer.dilation,  # type: ignore[arg-type]
        layer.groups,
        layer.bias is not None,
        layer.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    return _filled(out, weight, layer.bias)


def _plain_linear(layer: nn.Linear) -> nn.Linear:
    weight = layer.weight.detach().clone()
    out = nn.Linear(
        layer.in_features,
        layer.out_features,
        layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    return _filled(out, weight, layer.bias)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d) and _plain_behaviour(module, nn.Conv2d):
        return _plain_conv(module)
    if isinstance(module, nn.Linear) and _plain_behaviour(module, nn.Linear):
        return _plain_linear(module)
    if isinstance(module, LipschitzSequential):
        # the family classes only add the product bound, which certify composes on its own
        return nn.Sequential(OrderedDict((name, _convert(child)) for name, child in module.named_children()))
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module


def export(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with plain ``nn.Conv2d`` / ``nn.Linear`` layers.

    Each converted layer holds the weight that ``model``'s layer uses in eval mode (computed once
    here, under ``torch.no_grad``), so the copy's eval outputs equal ``model``'s up to the
    floating-point differences of the two code paths. ``model`` itself is not modified, and the
    copy's other modules are deep copies. The copy's Lipschitz bound is
    :func:`certify.bounds.lipschitz_bound` of its plain weights.
    """
    copied = copy.deepcopy(model)
    copied.eval()
    with torch.no_grad():
        exported = _convert(copied)
    exported.eval()
    return exported
