"""1-Lipschitz dense layers: ``nn.Linear`` with a parametrized weight.

Each class registers a :mod:`torch.nn.utils.parametrize` parametrization on ``weight`` in its
constructor, so ``remove_parametrizations(layer, "weight", leave_parametrized=True)`` leaves a
plain-weight layer whose ``lipschitz_bound()`` (or ``certify``) still measures the weight.
``lipschitz_bound()`` is always the float64 spectral norm of the weight the layer uses in its
current mode (``certify.bounds.matrix_spectral_norm``), never a constant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from certify.bounds import matrix_spectral_norm
from lipnet.layers.aol import AOLRescaling
from lipnet.layers.bjorck import BjorckOrthonormal
from lipnet.layers.parametrization import EvalCache

__all__ = ["AOLLinear", "BjorckLinear", "OrthogonalLinear"]

Device = torch.device | str | None


class _BoundedLinear(nn.Linear):
    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Float64 spectral norm of the current weight (times ``1 + FLOAT64_SLACK``)."""
        return matrix_spectral_norm(self.weight)


class OrthogonalLinear(_BoundedLinear):
    """Dense layer with an exactly orthogonal weight, from torch's own parametrization.

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
        orthogonal(self, "weight", orthogonal_map=orthogonal_map)
        chain = self.parametrizations["weight"]
        chain[0] = EvalCache(chain[0])


class BjorckLinear(_BoundedLinear):
    """Dense layer whose weight is the Björck orthonormalisation of a raw weight.

    ``weight = Bjorck(W / b)`` with ``b >= ||W||_2`` a Gram-iteration bound (Björck & Bowie
    1971; Anil, Lucas & Grosse, ICML 2019), computed on the smaller Gram matrix, so non-square
    weights get orthonormal rows (``out <= in``) or columns (``out > in``). In training mode
    ``train_iterations`` steps of order ``order`` are differentiated through; in eval mode the
    iteration runs in float64 to convergence and is cached. Every iterate is a contraction in
    exact arithmetic (1-Lipschitz in both modes), and eval weights of full rank are orthonormal
    to float64 precision before the cast to the layer dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        nn.init.orthogonal_(self.weight)
        parametrize.register_parametrization(
            self,
            "weight",
            BjorckOrthonormal(
                train_iterations=train_iterations,
                order=order,
                eval_max_iterations=eval_max_iterations,
                eval_tol=eval_tol,
            ),
        )


class AOLLinear(_BoundedLinear):
    """Dense layer with the almost-orthogonal rescaling of Prach & Lampert (ECCV 2022).

    ``weight = W diag(d)``, ``d_i = (sum_j |W^T W|_ij)^(-1/2)`` (on the smaller side of ``W``,
    see :class:`~lipnet.layers.aol.AOLRescaling`): 1-Lipschitz for every raw ``W``, with no
    iteration. Not orthogonal in general (exactly orthogonal when ``W`` has orthogonal columns).
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
        parametrize.register_parametrization(self, "weight", AOLRescaling())
