"""Losses for 1-Lipschitz classifiers (:mod:`lipnet.losses.classification`: τ-CE, hinge, KR, HKR,
τ-BCE, focal, Poly-1/N) and the losses of the attention catalogue (:mod:`lipnet.losses.attention`).

``create(name, **kwargs)`` builds the classification losses by name (the trainer's ``loss.name``).
Each declares the scalar arguments ``lipnet sweep`` may vary (:mod:`lipnet.losses.parameters`):
:func:`sweepable` lists them, :func:`parameter_rule` gives the range a value of an argument must lie in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from lipnet.losses.attention import (
    AttentionVariance,
    Consistency,
    DynamicWeightAverage,
    MILInstance,
    OAAHybrid,
    RankLoss,
    TaskPartition,
    WeightedFocal,
)
from lipnet.losses.classification import (
    HKR,
    KR,
    Focal,
    LogitLoss,
    MulticlassHinge,
    Poly1,
    PolyN,
    TauBCE,
    TauCrossEntropy,
)
from lipnet.losses.parameters import LossParameter

__all__ = [
    "HKR",
    "KR",
    "AttentionVariance",
    "Consistency",
    "DynamicWeightAverage",
    "Focal",
    "LogitLoss",
    "LossParameter",
    "MILInstance",
    "MulticlassHinge",
    "OAAHybrid",
    "Poly1",
    "PolyN",
    "RankLoss",
    "TaskPartition",
    "TauBCE",
    "TauCrossEntropy",
    "WeightedFocal",
    "arguments",
    "check_arguments",
    "create",
    "declared_parameters",
    "list_losses",
    "loss_class",
    "parameter_rule",
    "sweepable",
]

_REGISTRY: dict[str, type[LogitLoss]] = {
    "tau_ce": TauCrossEntropy,
    "hinge": MulticlassHinge,
    "kr": KR,
    "hkr": HKR,
    "tau_bce": TauBCE,
    "focal": Focal,
    "poly1": Poly1,
    "polyn": PolyN,
}


def list_losses() -> list[str]:
    """Names accepted by :func:`create`, in catalogue order."""
    return list(_REGISTRY)


def loss_class(name: str) -> type[LogitLoss]:
    """The class :func:`create` builds for ``name``; ``ValueError`` for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _arguments(cls: type[LogitLoss]) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def arguments(name: str) -> list[str]:
    """The keyword arguments loss ``name`` takes (``ValueError`` for an unknown loss)."""
    return list(_arguments(loss_class(name)))


def check_arguments(name: str, kwargs: Mapping[str, object]) -> None:
    """Raise ``ValueError`` unless loss ``name`` exists and takes every key of ``kwargs`` and is given each
    argument it needs; builds nothing (the values are the constructor's to judge)."""
    params = _arguments(loss_class(name))
    accepted = list(params)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown argument(s) {unknown}; it accepts {accepted}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"loss {name!r} needs argument(s) {missing}; it accepts {accepted}")


def sweepable(name: str) -> dict[str, LossParameter]:
    """The arguments loss ``name`` declares sweepable, by argument name (``ValueError``: unknown loss)."""
    return {p.name: p for p in loss_class(name).sweepable}


def declared_parameters() -> dict[str, LossParameter]:
    """Every parameter some registered loss declares sweepable, by name (one declaration per name)."""
    return {p.name: p for cls in _REGISTRY.values() for p in cls.sweepable}


def parameter_rule(name: str, key: str) -> LossParameter | None:
    """The declared range of the value of argument ``key`` of loss ``name``.

    The loss's own declaration when it declares ``key``; ``None`` when the loss takes ``key`` without
    declaring it (its constructor alone judges it: focal's per-class ``alpha``); otherwise, the loss
    not taking ``key`` (or ``name`` being unknown), the declaration of ``key`` by the other registered
    losses, since a name means the same thing in each of them: a bad value is then named before the
    argument is found unknown. ``None`` when no loss declares ``key``.
    """
    cls = _REGISTRY.get(name)
    if cls is not None:
        own = {p.name: p for p in cls.sweepable}
        if key in own:
            return own[key]
        if key in _arguments(cls):
            return None
    return declared_parameters().get(key)


def create(name: str, **kwargs: object) -> LogitLoss:
    """Build a loss by name, e.g. ``create("tau_ce", tau=10.0, offset=0.2)``.

    Names and keyword arguments: ``tau_ce(tau, offset)``, ``hinge(margin)``, ``kr()``,
    ``hkr(alpha, margin)``, ``tau_bce(tau, offset, pos_weight)``, ``focal(gamma, alpha, tau, offset)``,
    ``poly1(epsilon, tau, gamma, offset)``, ``polyn(epsilons, tau, gamma, offset)``; every loss also
    takes ``validate``. Raises ``ValueError`` for an unknown name, an unknown or missing keyword, or a
    bad value.
    """
    check_arguments(name, kwargs)
    # check_arguments matched the keywords to this class's own signature, not to LogitLoss's
    build: Callable[..., LogitLoss] = _REGISTRY[name]
    return build(**kwargs)
