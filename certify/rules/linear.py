"""Dense layers: ``nn.Linear`` is bounded by the float64 spectral norm of its weight; ``nn.Bilinear``
multiplies two inputs, is not globally Lipschitz, and is refused with a clear error.

The bias does not change a Lipschitz constant. A parametrized weight
(``torch.nn.utils.parametrize``) is read through its parametrization: the bound is that of the
weight the layer actually uses.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from certify.contract import Shape, UnboundableModuleError, matrix_spectral_norm, register_bound

__all__: list[str] = []


@register_bound(nn.Linear)
def _linear(module: nn.Module, input_shape: Shape | None) -> float:
    return matrix_spectral_norm(cast(nn.Linear, module).weight)


@register_bound(nn.Bilinear)
def _bilinear(module: nn.Module, input_shape: Shape | None) -> float:
    raise UnboundableModuleError(
        module,
        detail="nn.Bilinear multiplies two inputs: it is not globally Lipschitz and cannot be certified",
    )
