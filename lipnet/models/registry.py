"""One entry point for every model: ``lipnet.models.create(name, **kwargs)`` (timm-style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["create", "list_models", "register_model"]

F = TypeVar("F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: F) -> F:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Names of the registered models that contain ``pattern``, sorted."""
    return sorted(name for name in _MODELS if pattern in name)


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return fn(**kwargs)
