"""Losses for 1-Lipschitz classifiers (:mod:`lipnet.losses.classification`: τ-CE, hinge, KR, HKR,
τ-BCE, focal, Poly-1/N) and the losses of the attention catalogue (:mod:`lipnet.losses.attention`).

``create(name, **kwargs)`` builds the classification losses by name (the trainer's ``loss.name``).
"""

from __future__ import annotations

import inspect

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

__all__ = [
    "HKR",
    "KR",
    "AttentionVariance",
    "Consistency",
    "DynamicWeightAverage",
    "Focal",
    "LogitLoss",
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
    "create",
    "list_losses",
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


def create(name: str, **kwargs: object) -> LogitLoss:
    """Build a loss by name, e.g. ``create("tau_ce", tau=10.0, offset=0.2)``.

    Names and keyword arguments: ``tau_ce(tau, offset)``, ``hinge(margin)``, ``kr()``,
    ``hkr(alpha, margin)``, ``tau_bce(tau, offset, pos_weight)``, ``focal(gamma, alpha, tau, offset)``,
    ``poly1(epsilon, tau, gamma, offset)``, ``polyn(epsilons, tau, gamma, offset)``; every loss also
    takes ``validate``. Raises ``ValueError`` for an unknown name, an unknown or missing keyword, or a
    bad value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(_REGISTRY)}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} got unknown argument(s) {unknown}; it accepts {accepted}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"loss {name!r} needs argument(s) {missing}; it accepts {accepted}")
    return cls(**kwargs)
