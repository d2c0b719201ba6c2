"""One entry point for every model: ``lipnet.models.create(name, **kwargs)`` (timm-style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["create", "get_model", "list_models", "register_model"]

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


def get_model(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name`` (its signature says which arguments it takes)."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments."""
    return get_model(name)(**kwargs)
