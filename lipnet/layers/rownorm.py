"""Row-normalised dense layers: every row of the weight divided by its L2 norm (a classifier head).

For a head ``f = W g + b`` on features ``g`` of Lipschitz constant ``L_g``, unit rows ``||w_i|| = 1``
make every logit ``f_i`` 1-Lipschitz in the features, and the last-layer certificate
(``certify.radius.certified_radius``: ``min_{j != y} (f_y - f_j) / (L_g ||w_y - w_j||)``) sees
``||w_y - w_j|| <= 2``, from the actual rows, whatever their angles. An orthonormal head (Björck) fixes
``||w_y - w_j|| = sqrt(2)`` for every pair; a row-normalised one lets training choose the angle
between each pair of class directions, which on Fashion-MNIST gave a larger mean certified radius at
the same budget (``lipnet bench recipe``).

The layer as a whole is not 1-Lipschitz: ``||W||_2`` lies in ``[1, sqrt(out_features)]`` (equal rows
reach ``sqrt(out_features)``). Its ``lipschitz_bound()`` is that spectral norm, computed in float64 from
the weight it uses (:class:`~lipnet.layers.base.BoundedLinear`), so the global certificate, which
multiplies the bounds of all layers, stays sound too; the last-layer certificate, which ``certify``
uses for a model whose last layer is this ``nn.Linear``, does not depend on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipnet.layers.base import BoundedLinear
from lipnet.layers.parametrization import CachedParametrization, attach
from lipnet.layers.types import Device

__all__ = ["RowNormLinear", "RowNormalization", "row_normalize"]


class RowNormalization(CachedParametrization):
    """Parametrization ``weight_i = v_i / ||v_i||_2`` of a dense weight ``V`` ``(out, in)``, row by row.

    A zero row stays zero (its norm is clamped at the dtype's smallest normal number, so the division
    is exact and its gradient finite). Cached in eval mode (:class:`CachedParametrization`).
    """

    def compute(self, original: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(original, dim=1, keepdim=True)
        return original / norms.clamp_min(torch.finfo(original.dtype).tiny)


def row_normalize(module: nn.Linear) -> nn.Linear:
    """Constrain an existing ``nn.Linear`` to unit-norm rows (:class:`RowNormalization` on its weight);
    returns it. ``certify`` bounds it from the constrained weight and :func:`lipnet.export` turns it into a
    plain ``nn.Linear`` holding that weight."""
    return attach(module, RowNormalization(), (nn.Linear,))


class RowNormLinear(BoundedLinear):
    """Dense layer with unit-norm rows (:func:`row_normalize`): each output is 1-Lipschitz in the input.

    Meant as a classifier's last layer (module docstring). The raw weight starts orthogonal, so the
    initial rows are orthonormal (the layer starts as an orthonormal head), and the bias at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        nn.init.orthogonal_(self.weight)
        row_normalize(self)
