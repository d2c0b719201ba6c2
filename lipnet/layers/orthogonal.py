"""Exactly orthogonal dense layers from torch's own orthogonal parametrization, with the eval cache.

:func:`orthogonal` attaches :func:`torch.nn.utils.parametrizations.orthogonal` to an existing
``nn.Linear`` and wraps it in :class:`~lipnet.layers.parametrization.EvalCache`;
:class:`OrthogonalLinear` is a new ``nn.Linear`` built that way. Convolutions are not offered here:
an orthogonal reshaped kernel is not an orthogonal (nor a 1-Lipschitz) convolution; use
:func:`lipnet.layers.bjorck` (scaled RKO, 1-Lipschitz) or :class:`lipnet.layers.CayleyConv2d`.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from lipnet.layers.base import BoundedLinear
from lipnet.layers.parametrization import EvalCache, check_attachable
from lipnet.layers.types import Device

__all__ = ["OrthogonalLinear", "orthogonal"]


def orthogonal(module: nn.Linear, *, orthogonal_map: str | None = None) -> nn.Linear:
    """Constrain an existing ``nn.Linear`` to an orthogonal weight; returns it.

    Registers :func:`torch.nn.utils.parametrizations.orthogonal` (``orthogonal_map`` one of
    ``"matrix_exp"``, ``"cayley"``, ``"householder"``; default: matrix_exp for square weights,
    householder otherwise) on ``module.weight`` and caches its value in eval mode
    (:class:`~lipnet.layers.parametrization.EvalCache`). Guarantee: the weight lies on the Stiefel
    manifold, orthonormal rows when ``out_features <= in_features`` and orthonormal columns otherwise
    (exactly, up to rounding), so the layer is 1-Lipschitz, and norm-preserving when
    ``out_features >= in_features``. ``certify`` bounds it from the actual weight (1 up to rounding),
    and :func:`lipnet.export` turns it into a plain ``nn.Linear`` holding that weight.
    """
    check_attachable(module, (nn.Linear,), "orthogonal")
    parametrizations.orthogonal(module, "weight", orthogonal_map=orthogonal_map)
    # register_parametrization adds the ModuleDict `parametrizations` at run time, which torch's typing
    # knows only as Tensor | Module; its entry is the weight's ParametrizationList (a ModuleList).
    lists = cast(nn.ModuleDict, module.parametrizations)
    chain = cast(parametrize.ParametrizationList, lists["weight"])
    chain[-1] = EvalCache(chain[-1])
    return module


class OrthogonalLinear(BoundedLinear):
    """Dense layer with an exactly orthogonal weight, from torch's own parametrization (:func:`orthogonal`).

    :func:`torch.nn.utils.parametrizations.orthogonal` (``orthogonal_map`` one of
    ``"matrix_exp"``, ``"cayley"``, ``"householder"``; default: matrix_exp for square weights,
    householder otherwise) keeps the weight on the Stiefel manifold: orthonormal rows when
    ``out_features <= in_features``, orthonormal columns otherwise. It is therefore 1-Lipschitz
    and, when ``out_features >= in_features``, norm-preserving. The weight is cached in eval mode.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        orthogonal_map: str | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        orthogonal(self, orthogonal_map=orthogonal_map)
