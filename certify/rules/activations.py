"""Activations: the one table of their Lipschitz constants, for modules and functional forms alike.

Each :class:`Activation` names the torch module classes, the functions (``F.relu``), the tensor
methods (``x.relu()``) and the aten operators (TorchScript graphs) that compute one elementwise
(or per-fibre, for softmax) map, and gives its Lipschitz constant from its parameters: the largest
``|f'|`` over the real line. :data:`ACTIVATIONS` is read twice: here, to register a bound for each
module class (its parameters read from the module's attributes), and by :mod:`certify.graph.rules`,
which bounds the functional forms in a traced graph (its parameters read from the call's
arguments). A constant written once serves both.

The constants, with their proofs:

* 1: ReLU, ReLU6, Hardtanh, Tanh, ``|x|``, clamp with constant bounds (slopes 0 or 1 or ``1 - tanh^2``);
  Softsign (``1 / (1 + |x|)^2``), Tanhshrink (``tanh^2``), Softplus (``sigmoid(beta x)``), LogSigmoid
  (``sigmoid(-x)``);
* Sigmoid ``1/4`` (``s (1 - s)``, at most 1/4); Hardsigmoid ``relu6(x + 3) / 6``: ``1/6`` on ``(-3, 3)``;
  Hardswish ``x relu6(x + 3) / 6``: slope ``(2x + 3) / 6`` in ``(-1/2, 3/2)`` on ``(-3, 3)``, 0 below,
  1 above: ``3/2``;
* LeakyReLU ``max(1, |slope|)``; PReLU ``max(1, max |a_c|)``; RReLU in eval mode: the fixed slope
  ``(lower + upper) / 2``, so ``max(1, |lower + upper| / 2)`` (random in training mode: refused);
* ELU: ``x`` above 0, ``alpha (e^x - 1)`` below: slopes 1 and ``alpha e^x``, whose magnitude tends to
  ``|alpha|``: ``max(1, |alpha|)``; aten's ``elu(x, alpha, scale, input_scale)`` has slopes ``scale`` and
  ``alpha scale input_scale e^(...)``: ``max(|scale|, |alpha scale input_scale|)``;
* CELU ``alpha (exp(x / alpha) - 1)`` below 0 has slope ``exp(x / alpha) <= 1`` for ``alpha > 0``; for
  ``alpha < 0`` that slope grows without bound as ``x -> -inf`` (refused);
* SELU ``scale * (x or alpha (e^x - 1))``: largest slope ``scale * alpha``, approached at 0-;
* GELU, SiLU, Mish: :func:`gelu_lipschitz`, :func:`silu_lipschitz`, :func:`mish_lipschitz`;
* Softmax / Softmin: the Jacobian ``diag(p) - p p^T`` is symmetric PSD with ``v^T J v = Var_p(v) <=
  (max v - min v)^2 / 4 <= 1/2`` for ``||v|| = 1`` (Popoviciu), so each fibre is 1/2-Lipschitz;
  fibres are disjoint.

Proofs: ``docs/proofs/activations-pooling.md#lemma-activation-slopes`` and ``#lemma-softmax``;
the grid maxima: ``docs/proofs/numerics.md#lemma-activation-grid``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certify.contract import BoundFn, Shape, register_bound

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Param",
    "gelu_lipschitz",
    "mish_lipschitz",
    "silu_lipschitz",
]


def _grid_max_abs_slope(derivative: Callable[[torch.Tensor], torch.Tensor], limit: float) -> float:
    """``max |f'(x)|`` over a float64 grid of step 1e-5 on ``[-limit, limit]``, plus a margin.

    The margin 1e-4 covers the grid error ``step / 2 * sup |f''|`` (``sup |f''| <= 1`` for the
    activations below: GELU ``|phi(x)(2 - x^2)| <= 2 phi(0) < 0.8``, SiLU ``< 0.5``), float64
    rounding of the derivative formula (about 1e-15) and the tails beyond ``limit`` (where the
    derivative is within 1e-20 of its limit 0 or 1, both below the grid maximum).
    """
    step = 1e-5
    n = int(round(2 * limit / step)) + 1
    x = torch.linspace(-limit, limit, n, dtype=torch.float64)
    return float(derivative(x).abs().max().item()) + 1e-4


@functools.cache
def gelu_lipschitz(approximate: str = "none") -> float:
    """Sound Lipschitz constant of GELU (Hendrycks & Gimpel 2016), exact or tanh-approximated.

    Exact GELU ``x Phi(x)`` has derivative ``Phi(x) + x phi(x)``, whose extrema are at ``x = +-sqrt(2)``
    (where ``phi(x)(2 - x^2) = 0``): the maximum ``Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.12886...``
    exceeds ``|min| = 0.12886...``. The tanh approximation ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``
    has no closed form; its derivative is maximised on a float64 grid with a margin
    (:func:`_grid_max_abs_slope`).
    """
    if approximate == "none":
        root2 = math.sqrt(2.0)
        phi = math.exp(-1.0) / math.sqrt(2.0 * math.pi)
        value = 0.5 * (1.0 + math.erf(1.0)) + root2 * phi
        return value * (1.0 + 1e-12)
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)

        def derivative(x: torch.Tensor) -> torch.Tensor:
            u = c * (x + 0.044715 * x**3)
            t = torch.tanh(u)
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)

        return _grid_max_abs_slope(derivative, 12.0)
    raise ValueError(f"unknown GELU approximation {approximate!r}: expected 'none' or 'tanh'")


@functools.cache
def silu_lipschitz() -> float:
    """Sound Lipschitz constant of SiLU / swish ``x sigmoid(x)``: ``1.0998... + 1e-4``.

    The derivative ``s(x) (1 + x (1 - s(x)))`` (``s`` the sigmoid) peaks near ``x = 2.3994`` at
    ``1.0998`` and its minimum ``-0.0998`` is smaller in magnitude; the maximum is taken on a
    float64 grid over ``[-40, 40]`` with the margin of :func:`_grid_max_abs_slope`.
    """

    def derivative(x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))

    return _grid_max_abs_slope(derivative, 40.0)


@functools.cache
def mish_lipschitz() -> float:
    """Sound Lipschitz constant of Mish ``x tanh(softplus(x))`` (Misra 2019), about ``1.0886 + 1e-4``.

    Derivative ``tanh(sp) + x s(x) (1 - tanh(sp)^2)`` with ``sp = softplus(x)``, maximised on a
    float64 grid over ``[-40, 40]`` (its second derivative is below 1 in magnitude).
    """

    def derivative(x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(F.softplus(x))
        return t + x * torch.sigmoid(x) * (1.0 - t * t)

    return _grid_max_abs_slope(derivative, 40.0)


@dataclass(frozen=True)
class Param:
    """A parameter of an activation: the module attribute of that ``name``, and in a functional call
    the argument at position ``index`` or keyword ``name`` (``default`` when absent, unless ``required``)."""

    name: str
    index: int
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Activation:
    """One activation in every form torch computes it, and its Lipschitz constant.

    ``lipschitz(**params)`` returns the constant for the values of ``params`` (``ValueError`` when
    there is none). ``training_note``, for a module that is random in training mode, says why it is
    refused there.
    """

    lipschitz: Callable[..., float]
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    training_note: str | None = None

    def module_rule(self) -> BoundFn:
        """The registered bound of this activation's modules: ``lipschitz`` of their attributes."""

        def bound(module: nn.Module, input_shape: Shape | None) -> float:
            if self.training_note is not None and module.training:
                raise ValueError(
                    f"{type(module).__name__} in training mode {self.training_note}; "
                    "put the model in eval() before bounding it"
                )
            return self.lipschitz(**{p.name: getattr(module, p.name) for p in self.params})

        return bound


def _one() -> float:
    return 1.0


def _leaky(negative_slope: float) -> float:
    return max(1.0, abs(float(negative_slope)))


def _elu(alpha: float) -> float:
    return max(1.0, abs(float(alpha)))


def _aten_elu(alpha: float, scale: float, input_scale: float) -> float:
    return max(abs(float(scale)), abs(float(alpha) * float(scale) * float(input_scale)))


def _celu(alpha: float) -> float:
    if float(alpha) <= 0:
        raise ValueError(f"CELU with alpha={alpha} <= 0 is not Lipschitz")
    return 1.0


def _prelu(weight: Any) -> float:
    slopes = torch.as_tensor(weight).detach().to(torch.float64)
    if not torch.isfinite(slopes).all():
        raise ValueError("PReLU slopes contain NaN or Inf")
    return max(1.0, float(slopes.abs().max().item()))


def _rrelu(lower: float, upper: float) -> float:
    # In eval mode the negative slope is the fixed (lower + upper) / 2.
    return max(1.0, abs((float(lower) + float(upper)) / 2.0))


def _gelu(approximate: str) -> float:
    return gelu_lipschitz(str(approximate))


#: The largest slope of SELU, ``scale * alpha``, with a margin for the rounding of the product.
_SELU = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1.0 + 1e-12)

_ALPHA = Param("alpha", 1, 1.0)

#: Every activation certify bounds, in every form (the module docstring proves each constant).
ACTIVATIONS: tuple[Activation, ...] = (
    Activation(_one, (nn.ReLU,), (torch.relu, F.relu), ("relu", "relu_"), ("relu", "relu_")),
    Activation(_one, (nn.ReLU6,), (F.relu6,)),
    Activation(_one, (nn.Hardtanh,), (F.hardtanh,), aten=("hardtanh", "hardtanh_")),
    Activation(_one, (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",), ("tanh",)),
    Activation(_one, (nn.Softsign,), (F.softsign,)),
    Activation(_one, (nn.Tanhshrink,), (F.tanhshrink,)),
    Activation(_one, (nn.Softplus,), (F.softplus,), aten=("softplus",)),
    Activation(_one, (nn.LogSigmoid,), (F.logsigmoid,), aten=("log_sigmoid",)),
    Activation(_one, (), (torch.abs, torch.absolute), ("abs", "absolute"), ("abs",)),
    Activation(
        _one,
        (),
        (torch.clamp, torch.clip),
        ("clamp", "clip", "clamp_", "clip_"),
        ("clamp", "clamp_min", "clamp_max"),
    ),
    Activation(
        lambda: 0.25,
        (nn.Sigmoid,),
        (torch.sigmoid, F.sigmoid),
        ("sigmoid", "sigmoid_"),
        ("sigmoid", "sigmoid_"),
    ),
    Activation(lambda: 1.0 / 6.0 * (1.0 + 1e-15), (nn.Hardsigmoid,), (F.hardsigmoid,), aten=("hardsigmoid",)),
    Activation(lambda: 1.5, (nn.Hardswish,), (F.hardswish,), aten=("hardswish",)),
    Activation(
        _leaky,
        (nn.LeakyReLU,),
        (F.leaky_relu,),
        aten=("leaky_relu", "leaky_relu_"),
        params=(Param("negative_slope", 1, 0.01),),
    ),
    Activation(
        _prelu,
        (nn.PReLU,),
        (F.prelu, torch.prelu),
        aten=("prelu", "_prelu_kernel"),
        params=(Param("weight", 1, required=True),),
    ),
    Activation(
        _rrelu,
        (nn.RReLU,),
        params=(Param("lower", 1), Param("upper", 2)),
        training_note="draws random slopes",
    ),
    Activation(_elu, (nn.ELU,), (F.elu,), params=(_ALPHA,)),
    Activation(
        _aten_elu, aten=("elu", "elu_"), params=(_ALPHA, Param("scale", 2, 1.0), Param("input_scale", 3, 1.0))
    ),
    Activation(_celu, (nn.CELU,), (F.celu,), aten=("celu",), params=(_ALPHA,)),
    Activation(lambda: _SELU, (nn.SELU,), (F.selu, torch.selu), aten=("selu",)),
    Activation(_gelu, (nn.GELU,), (F.gelu,), aten=("gelu",), params=(Param("approximate", 1, "none"),)),
    Activation(silu_lipschitz, (nn.SiLU,), (F.silu,), aten=("silu", "silu_")),
    Activation(mish_lipschitz, (nn.Mish,), (F.mish,), aten=("mish",)),
    Activation(
        lambda: 0.5,
        (nn.Softmax, nn.Softmin),
        (F.softmax, F.softmin, torch.softmax),
        ("softmax",),
        ("softmax", "_softmax"),
    ),
)

for _activation in ACTIVATIONS:
    for _cls in _activation.modules:
        register_bound(_cls, _activation.module_rule())
