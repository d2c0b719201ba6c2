"""Weight parametrizations that cache their result in eval mode, and how one is attached to a layer.

A parametrization registered with :func:`torch.nn.utils.parametrize.register_parametrization`
is recomputed on every access of the weight. For an orthogonalisation that costs a few matrix
products per forward pass; at inference the raw weight does not change, so
:class:`CachedParametrization` computes the constrained weight once and reuses it until the raw
weight changes. :class:`EvalTensorCache` applies the same rule to any tensor computed from some
parameters (the steps of the SLL / CPL blocks, the divisors of the attention modules).

:func:`attach` registers a parametrization on the weight of an existing ``nn.Linear`` /
``nn.Conv2d``; the functional forms :func:`lipnet.layers.aol`, :func:`lipnet.layers.bjorck` and
:func:`lipnet.layers.orthogonal` (each in its method's file) and the layer classes all go through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from certify.contract import redefines_behaviour

__all__ = [
    "CachedParametrization",
    "EvalCache",
    "EvalTensorCache",
    "attach",
    "check_attachable",
    "full_precision",
]

_Key = tuple[int, int, int, torch.device, torch.dtype, torch.Size]
_CacheKey = tuple[object, ...]
_Module = TypeVar("_Module", bound=nn.Module)


def check_attachable(module: nn.Module, bases: tuple[type[nn.Module], ...], what: str) -> None:
    """Refuse (``TypeError``) a ``module`` that ``what`` cannot constrain: not an instance of one of
    ``bases``, or a subclass that redefines ``forward`` / ``_conv_forward`` (the guarantee of a
    parametrization is about the base's computation with the constrained weight)."""
    base = next((b for b in bases if isinstance(module, b)), None)
    if base is None:
        names = " or ".join(b.__name__ for b in bases)
        raise TypeError(f"{what} attaches to {names} modules, got {type(module).__name__}")
    if redefines_behaviour(type(module), base):
        raise TypeError(
            f"{type(module).__qualname__} redefines the computation of {base.__name__}, so the guarantee of "
            f"{what} on its weight would not hold for it"
        )


def attach(module: _Module, parametrization: nn.Module, bases: tuple[type[nn.Module], ...]) -> _Module:
    """Register ``parametrization`` on ``module.weight`` and return ``module`` (which it modifies).

    ``module`` must pass :func:`check_attachable` for ``bases``. Like
    :func:`torch.nn.utils.parametrizations.orthogonal`, the raw weight becomes
    ``module.parametrizations.weight.original`` and ``module.weight`` is the constrained one;
    ``torch.nn.utils.parametrize.remove_parametrizations(module, "weight")`` takes it off again.
    """
    check_attachable(module, bases, type(parametrization).__name__)
    parametrize.register_parametrization(module, "weight", parametrization)
    return module


def full_precision(device_type: str) -> AbstractContextManager[object]:
    """Autocast off for ``device_type`` when it is on, else nothing.

    A constrained weight is computed in the raw weight's dtype even inside a bf16 / fp16 autocast region
    (the training forward on CUDA): the orthogonalisation, its bound and the rescaling are what make the
    layer 1-Lipschitz, and in bf16 (8 bits of mantissa) Björck or AOL would be so only to about 1e-2. The
    layer's own product with its input then runs under autocast as usual (the weight cast once).
    """
    # devices without autocast (meta: shape-only models) have nothing to turn off
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class EvalTensorCache:
    """A tensor computed from some parameters, reused in eval mode while they are unchanged.

    Same rules as :class:`CachedParametrization`: recomputed in training mode and whenever an
    autograd graph is needed; the key holds each tensor's identity, storage, version counter
    (bumped by optimizer steps and ``load_state_dict``), device, dtype and shape, plus any extra key
    (an input size).
    """

    def __init__(self) -> None:
        self._key: _CacheKey | None = None
        self._value: Tensor | None = None

    def get(
        self, training: bool, tensors: Sequence[Tensor], compute: Callable[[], Tensor], extra: _CacheKey = ()
    ) -> Tensor:
        """``compute()``, or the value it returned last time when the key is the same (see the class);
        ``compute`` runs outside autocast (:func:`full_precision`)."""
        with full_precision(tensors[0].device.type if tensors else "cpu"):
            if training or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
                return compute()
            return self._cached(tensors, compute, extra)

    # Eager even inside compiled code (see CachedParametrization._cached).
    @torch.compiler.disable
    def _cached(self, tensors: Sequence[Tensor], compute: Callable[[], Tensor], extra: _CacheKey) -> Tensor:
        key = (*((id(t), t.data_ptr(), t._version, t.device, t.dtype, t.shape) for t in tensors), *extra)
        if self._key != key or self._value is None:
            self._value = compute()
            self._key = key
        return self._value


class CachedParametrization(nn.Module, ABC):
    """Base class of a parametrization ``weight = compute(original)`` cached in eval mode.

    In training mode ``compute`` runs on every call, so gradients always flow through a fresh
    graph. In eval mode the result is reused while the original tensor is unchanged: the cache
    key is the tensor's identity, storage address, version counter (bumped by every in-place
    update, so by every optimizer step and by ``load_state_dict``), device, dtype and shape.

    The cache never holds an autograd graph: when a graph is needed (grad mode on and the
    original, or a parameter of the parametrization, requires grad) the weight is recomputed
    and not stored, so eval-mode gradients with respect to the weights stay exact. For fast
    eval-mode attacks on inputs, freeze the parameters (``model.requires_grad_(False)``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache_key: _Key | None = None
        self._cache_value: Tensor | None = None

    @abstractmethod
    def compute(self, original: Tensor) -> Tensor:
        """The constrained weight for the raw tensor ``original`` (differentiable)."""

    def clear_cache(self) -> None:
        """Forget the cached weight (it is recomputed on the next eval-mode access)."""
        self._cache_key = None
        self._cache_value = None

    def _needs_graph(self, original: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return original.requires_grad or any(p.requires_grad for p in self.parameters())

    def forward(self, original: Tensor) -> Tensor:
        with full_precision(original.device.type):
            if self.training or self._needs_graph(original):
                return self.compute(original)
            return self._cached(original)

    # Eager even inside compiled code: the key holds Python identities, on which torch.compile would guard
    # and recompile once per layer; the compiled graph takes the cached weight as an input.
    @torch.compiler.disable
    def _cached(self, original: Tensor) -> Tensor:
        key: _Key = (
            id(original),
            original.data_ptr(),
            original._version,
            original.device,
            original.dtype,
            original.shape,
        )
        if self._cache_key != key or self._cache_value is None:
            self._cache_value = self.compute(original)
            self._cache_key = key
        return self._cache_value


class EvalCache(CachedParametrization):
    """Wraps an existing parametrization (e.g. torch's orthogonal map) with the eval-mode cache.

    The wrapped module's value is returned unchanged; ``right_inverse`` is delegated so that
    assigning to the parametrized weight behaves as without the wrapper.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def compute(self, original: Tensor) -> Tensor:
        return self.inner(original)

    def right_inverse(self, value: Tensor) -> Tensor:
        self.clear_cache()
        return self.inner.right_inverse(value)
