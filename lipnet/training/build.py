"""The model, loss and optimiser a run config describes, and the check that the model fits the data.

Each raises :class:`~lipnet.training.config.ConfigError` (one line naming the config section) for
input that cannot be built, so that a command reports it as bad input.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from certify.bounds import UnboundableModuleError, lipschitz_bound
from lipnet import losses, models
from lipnet.training.config import Config, ConfigError, ModelConfig

__all__ = ["build_loss", "build_model", "build_optimizer", "check_model_fits"]


def build_model(spec: ModelConfig) -> nn.Module:
    """``lipnet.models.create(spec.name, **spec.kwargs)``; a bad name or argument -> ConfigError."""
    try:
        return models.create(spec.name, **spec.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model {spec.name!r}: {err}") from None


def build_loss(cfg: Config) -> nn.Module:
    """``lipnet.losses.create(cfg.loss.name, **cfg.loss.kwargs)``; bad input -> ConfigError."""
    try:
        return losses.create(cfg.loss.name, **cfg.loss.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss: {err}") from None


def build_optimizer(params: Iterable[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum, optionally Nesterov) from ``cfg.optim``."""
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )


def check_model_fits(model: nn.Module, train_ds: Any, cfg: Config) -> tuple[int, ...]:
    """One forward pass on two training images: the output must be ``(2, num_classes)``, and the model
    bounded by :func:`certify.bounds.lipschitz_bound`. Returns the input shape; ConfigError otherwise."""
    shape = tuple(int(s) for s in train_ds.images.shape[1:])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(train_ds.images[:2].to(next(model.parameters()).device))
        lipschitz_bound(model, shape)
    except UnboundableModuleError as err:
        raise ConfigError(f"model {cfg.model.name!r} cannot be certified: {err}") from None
    except RuntimeError as err:
        raise ConfigError(
            f"model {cfg.model.name!r} does not accept {cfg.data.name} images of shape {shape}: {err}. "
            "Set model.in_channels / model.input_size to match the dataset."
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != train_ds.num_classes:
        raise ConfigError(
            f"model {cfg.model.name!r} outputs shape {tuple(out.shape)} for 2 images, "
            f"but {cfg.data.name} has "
            f"{train_ds.num_classes} classes: set model.num_classes={train_ds.num_classes}"
        )
    return shape
