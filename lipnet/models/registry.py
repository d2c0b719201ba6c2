"""One entry point for every model: ``lipnet.models.create(name, **kwargs)`` (timm-style).

A model family registers its constructors with :func:`register_model`; :func:`list_models`,
:func:`is_model`, :func:`model_entrypoint` and :func:`default_cfg` read the registry, and
:func:`create` builds a model. A constructor's signature is its configuration: its parameters are
the keys a config's ``model`` section may set, and its defaults (input channels and size, number of
classes, layer kind) are the model's default configuration (:func:`default_cfg`).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

__all__ = [
    "ModelDefaults",
    "create",
    "default_cfg",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_WILDCARDS = frozenset("*?[")


def register_model(fn: F) -> F:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "") -> list[str]:
    """Names of the registered models that match ``pattern``, sorted.

    A pattern with a shell wildcard (``*``, ``?``, ``[...]``) is matched with :mod:`fnmatch` against
    the whole name (``list_models("lipconvnet_*")``); any other pattern is a substring
    (``list_models("sll_")``; ``""`` lists every model). Matching is case-sensitive.
    """
    if not _WILDCARDS.intersection(pattern):
        pattern = f"*{pattern}*"
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def is_model(name: str) -> bool:
    """Whether a model is registered under exactly ``name``."""
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name`` (its signature says which arguments it takes).

    An unknown name raises ``ValueError`` listing the registered models.
    """
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


@dataclass(frozen=True)
class ModelDefaults:
    """What a registered model is built for when its data arguments are left out.

    ``input_shape`` is ``(in_channels, input_size, input_size)`` per sample; ``num_classes`` the
    number of logits; ``conv`` the layer kind (:func:`lipnet.layers.list_layer_kinds`). A field is
    ``None`` when the constructor has no such argument (or no default for it).
    """

    input_shape: tuple[int, int, int] | None
    num_classes: int | None
    conv: str | None


def default_cfg(name: str) -> ModelDefaults:
    """The default configuration of the model ``name``, read from its constructor's signature.

    The defaults live in one place, the constructor (``in_channels``, ``input_size``,
    ``num_classes``, ``conv``); this reads them there, so it cannot disagree with what
    ``create(name)`` builds.
    """
    params = inspect.signature(model_entrypoint(name)).parameters

    def default(key: str) -> object:
        param = params.get(key)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    channels, size = default("in_channels"), default("input_size")
    shape = (channels, size, size) if isinstance(channels, int) and isinstance(size, int) else None
    classes, conv = default("num_classes"), default("conv")
    return ModelDefaults(
        input_shape=shape,
        num_classes=classes if isinstance(classes, int) else None,
        conv=conv if isinstance(conv, str) else None,
    )


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with its keyword arguments."""
    return model_entrypoint(name)(**kwargs)
