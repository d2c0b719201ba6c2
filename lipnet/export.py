"""``lipnet.export(model)``: a copy of a trained model made of plain layers with frozen weights.

The walker knows no layer class. On a deep copy of the model in eval mode it replaces, depth first:

* a module with ``split_head()`` (:class:`~lipnet.models.lipconvnet.LipConvNet`, whose logits are
  the first rows of a square head selected by ``FirstChannels``) by ``nn.Sequential`` of its body's
  children and its ``nn.Linear`` head, so that :func:`certify.radius.split_head` finds the same head
  in the copy and ``certify`` gives it the same last-layer certificate. The copy computes only the
  rows that produce logits, so its global bound can be below the model's (for AOL and Björck heads,
  the norm of those rows instead of that of the square matrix);
* a module with ``export()`` (the :class:`~lipnet.layers.base.Exportable` protocol: every layer of
  :mod:`lipnet.layers`, :class:`~lipnet.models.sequential.LipschitzSequential`, and any third-party
  layer that implements it) by what ``export()`` returns: each new layer holds the values the source
  layer uses in eval mode, computed once, so no parametrization, eval cache or weight rescaling is
  left to run. A subclass that redefines ``forward`` (or ``_conv_forward``) below the class that
  defines ``export()`` computes something else and is copied unchanged;
* an ``nn.Conv2d`` / ``nn.Linear`` that computes as torch's (a plain layer, or one with
  :mod:`torch.nn.utils.parametrize` parametrizations attached, e.g. by :func:`lipnet.layers.aol`,
  :func:`lipnet.layers.bjorck`, :func:`lipnet.layers.orthogonal` or torch's own) by a plain layer
  with the same geometry holding the weight it uses in eval mode;

and walks the children of every module it keeps or puts in place (activations, pooling, channel
padding and selection, a module holding any of the above are kept, with their children converted).

Every layer of the copy is a plain torch module or has a ``lipschitz_bound`` computed from the
weights it holds, so :func:`certify.bounds.lipschitz_bound` bounds the copy from its own weights.
"""

from __future__ import annotations

import copy
from typing import TypeGuard

import torch
from torch import nn

from certify.contract import redefines_behaviour
from lipnet.layers.base import Exportable, InputSizeUnknownError, frozen_conv2d, frozen_linear

__all__ = ["export"]


def _exports(module: nn.Module) -> TypeGuard[Exportable]:
    """Whether ``module`` is converted by its own ``export()``: a method of its class (not, say, a child
    module named ``export``) that no class below the one defining it changes the computation of."""
    if not isinstance(module, Exportable):
        return False
    owner = next((k for k in type(module).__mro__ if "export" in k.__dict__), None)
    return owner is not None and not redefines_behaviour(type(module), owner)


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _replacement(module: nn.Module, path: str) -> nn.Module:
    """What ``module`` becomes in the copy, before its children are walked (see the module docstring)."""
    split = getattr(module, "split_head", None)
    parts = split() if callable(split) else None
    if parts is not None:
        # model(x) == head(body(x)) (the split_head contract); the copy is that composition
        body, head = parts
        return nn.Sequential(*(body.children() if type(body) is nn.Sequential else [body]), head)
    if _exports(module):
        try:
            return module.export()
        except InputSizeUnknownError as err:
            raise InputSizeUnknownError(
                f"{type(module).__name__} at '{path}': {err} "
                "(or pass lipnet.export(model, input_shape=(C, H, W)))"
            ) from None
    if isinstance(module, nn.Conv2d) and not redefines_behaviour(type(module), nn.Conv2d):
        return frozen_conv2d(module)
    if isinstance(module, nn.Linear) and not redefines_behaviour(type(module), nn.Linear):
        return frozen_linear(module)
    return module


def _convert(module: nn.Module, path: str) -> nn.Module:
    out = _replacement(module, path)
    for name, child in out.named_children():
        setattr(out, name, _convert(child, _child(path, name)))
    return out


def export(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode made of plain layers (see the module docstring).

    Each converted layer holds the values that ``model``'s layer uses in eval mode (computed once
    here, under ``torch.no_grad``), in the memory layout the layer passes them to its product (a
    dense residual block's transposed ``step_weight().mT`` included), so it repeats its source's
    operations and the copy's eval outputs equal ``model``'s bit for bit, except at a
    ``split_head`` head: the copy computes only the logit rows, another product whose float32
    rounding can differ (each logit of both stays within ``gamma_(n+1) (|W| |g| + |b|)`` of the
    exact one, ``n`` the head's input features; Higham 2002, section 3.1). ``model`` itself is not
    modified.

    ``input_shape`` (per sample, e.g. ``(3, 32, 32)``; default: ``model.input_shape`` when the model
    declares one, as lipnet's model families do) is used only when a layer's export needs an input
    size it has not seen (:class:`~lipnet.layers.InputSizeUnknownError`, raised by a
    :class:`~lipnet.layers.CayleyConv2d` before its first forward): one forward pass of a zero batch
    through the copy fixes it. Without it such a layer raises that error (a ``ValueError``).
    """
    with torch.no_grad():
        try:
            exported = _convert(copy.deepcopy(model).eval(), "")
        except InputSizeUnknownError:
            shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
            if shape is None:
                raise
            # a layer learns its input size from a forward pass: one on a fresh copy, then the walk again
            copied = copy.deepcopy(model).eval()
            ref = next(iter(copied.parameters()))
            copied(torch.zeros((1, *shape), device=ref.device, dtype=ref.dtype))
            exported = _convert(copied, "")
    return exported.eval()
