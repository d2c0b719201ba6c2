"""Weight parametrizations that cache their result in eval mode.

A parametrization registered with :func:`torch.nn.utils.parametrize.register_parametrization`
is recomputed on every access of the weight. For an orthogonalisation that costs a few matrix
products per forward pass; at inference the raw weight does not change, so
:class:`CachedParametrization` computes the constrained weight once and reuses it until the raw
weight changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

__all__ = ["CachedParametrization", "EvalCache"]

_Key = tuple[int, int, int, torch.device, torch.dtype, torch.Size]


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
        if self.training or self._needs_graph(original):
            return self.compute(original)
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
