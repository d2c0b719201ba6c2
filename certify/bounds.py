"""Sound upper bounds of L2 Lipschitz constants, computed in float64 from the actual weights.

The contract (see ``docs/design.md``): every bound returned here is an upper bound that holds,
never an estimate. Per module the bound comes from, in this order,

1. the module's own ``lipschitz_bound(input_shape=None)`` method (lipnet's layers, or any user
   module that implements it);
2. a function registered for its type with :func:`register_bound` (plain torch layers are
   registered below and in :mod:`certify.conv_norm`);
3. composition: ``nn.Sequential`` multiplies the bounds of its children.

Anything else raises :class:`UnboundableModuleError`, which names the module and says how to
register a bound. Nothing is guessed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "FLOAT64_SLACK",
    "BoundFn",
    "UnboundableModuleError",
    "lipschitz_bound",
    "matrix_spectral_norm",
    "module_bound",
    "register_bound",
    "input_shapes",
]

#: Relative slack multiplied into every float64 norm. The SVD in float64 is backward stable: the
#: computed largest singular value is within about ``n * 2.2e-16`` of the true one (relative), so
#: 1e-9 covers matrices up to millions of rows with a wide margin.
FLOAT64_SLACK = 1e-9

Shape = tuple[int, ...]
BoundFn = Callable[[nn.Module, "Shape | None"], float]
M = TypeVar("M", bound=type[nn.Module])

_REGISTRY: dict[type[nn.Module], BoundFn] = {}


class UnboundableModuleError(TypeError):
    """Raised when no sound Lipschitz bound is known for a module."""

    def __init__(self, module: nn.Module, path: str = "") -> None:
        name = type(module).__module__ + "." + type(module).__qualname__
        where = f" at '{path}'" if path else ""
        super().__init__(
            f"no sound Lipschitz bound is known for module {name}{where}. Give the class a method "
            "`lipschitz_bound(self, input_shape=None) -> float` returning a sound float64 upper bound, or "
            "register one with `certify.bounds.register_bound(YourModule, fn)` where "
            "fn(module, input_shape) -> float. certify never guesses a bound."
        )
        self.module = module
        self.path = path


def register_bound(module_type: type[nn.Module], fn: BoundFn | None = None) -> Callable[[BoundFn], BoundFn]:
    """Register ``fn(module, input_shape) -> float`` as the sound bound of ``module_type``.

    Usable as a decorator: ``@register_bound(nn.ReLU)``. Subclasses inherit the registration
    unless they define ``lipschitz_bound`` or are registered themselves.
    """

    def deco(f: BoundFn) -> BoundFn:
        _REGISTRY[module_type] = f
        return f

    if fn is not None:
        deco(fn)
    return deco


def matrix_spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a matrix, by float64 SVD, times ``1 + FLOAT64_SLACK``."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if w.ndim != 2:
        w = w.reshape(w.shape[0], -1)
    if w.numel() == 0:
        return 0.0
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf: no Lipschitz bound exists")
    sigma = torch.linalg.matrix_norm(w, ord=2).item()
    return float(sigma) * (1.0 + FLOAT64_SLACK)


def _own_bound(module: nn.Module, input_shape: Shape | None) -> float:
    method = module.lipschitz_bound  # type: ignore[operator]
    params = inspect.signature(method).parameters
    value = method(input_shape=input_shape) if "input_shape" in params else method()
    return float(value)


def _registered(module: nn.Module) -> BoundFn | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def input_shapes(model: nn.Module, input_shape: Shape) -> dict[nn.Module, Shape]:
    """Record the per-sample input shape of every submodule for one input of ``input_shape``.

    Runs one forward pass of a zero batch of size 1 in eval mode (training-mode flags are
    restored afterwards); shapes exclude the batch dimension.
    """
    shapes: dict[nn.Module, Shape] = {}

    def hook(mod: nn.Module, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and mod not in shapes:
            shapes[mod] = tuple(args[0].shape[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    modes = {m: m.training for m in model.modules()}
    ref = next(iter(model.parameters()), None)
    kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), **kwargs))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def module_bound(
    module: nn.Module,
    input_shape: Shape | None = None,
    *,
    shapes: dict[nn.Module, Shape] | None = None,
    path: str = "",
) -> float:
    """Sound bound of one module (recursing into ``nn.Sequential``)."""
    if hasattr(module, "lipschitz_bound") and callable(module.lipschitz_bound):
        return _own_bound(module, input_shape)
    fn = _registered(module)
    if fn is not None:
        return float(fn(module, input_shape))
    if isinstance(module, nn.Sequential):
        total = 1.0
        for name, child in module.named_children():
            child_shape = shapes.get(child) if shapes is not None else None
            total *= module_bound(child, child_shape, shapes=shapes, path=f"{path}.{name}" if path else name)
        return total
    raise UnboundableModuleError(module, path)


def lipschitz_bound(model: nn.Module, input_shape: Shape | None = None) -> float:
    """Sound float64 upper bound of ``model``'s L2 Lipschitz constant w.r.t. its input.

    With ``input_shape`` (per sample, e.g. ``(3, 32, 32)``) convolution bounds are computed for
    that size, which can be tighter; without it they hold for every input size.
    """
    shapes = input_shapes(model, input_shape) if input_shape is not None else None
    return module_bound(model, input_shape, shapes=shapes)


def _one(module: nn.Module, input_shape: Shape | None) -> float:
    return 1.0


for _cls in (nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh,
             nn.Softsign, nn.PixelUnshuffle, nn.PixelShuffle):
    register_bound(_cls, _one)


@register_bound(nn.Dropout)
def _dropout(module: nn.Module, input_shape: Shape | None) -> float:
    if module.training:
        raise ValueError("Dropout in training mode is random; put the model in eval() before bounding it")
    return 1.0


@register_bound(nn.LeakyReLU)
def _leaky(module: nn.Module, input_shape: Shape | None) -> float:
    return max(1.0, abs(float(module.negative_slope)))


@register_bound(nn.Sigmoid)
def _sigmoid(module: nn.Module, input_shape: Shape | None) -> float:
    return 0.25


@register_bound(nn.Linear)
def _linear(module: nn.Module, input_shape: Shape | None) -> float:
    return matrix_spectral_norm(module.weight)
