"""The contract every bound in certify keeps, and the registry of bounds for module types.

The contract (see ``docs/design.md``): a module that claims a Lipschitz constant implements
``lipschitz_bound(self, input_shape=None) -> float`` (:class:`LipschitzBounded`), a sound upper
bound, in float64 from the actual weights, of its L2 Lipschitz constant with respect to its input
(for inputs of ``input_shape`` when given, for every input size otherwise). Never an estimate: a
power iteration that has not converged is a lower estimate and may not be returned.

A module type without such a method gets its bound from a function registered with
:func:`register_bound`. A registration for a class also covers its subclasses **unless a subclass
redefines** ``forward`` or ``_conv_forward`` (:func:`redefines_behaviour`, the one check of "this
subclass computes something else", used by every rule that relies on a base class's forward):
deel-torchlip's ``ScaledAvgPool2d`` multiplies the ``nn.AvgPool2d`` output by the kernel size and
must not inherit its bound. Rules for third-party libraries are registered lazily, the first time
one of their classes is looked up (:func:`register_lazy_rules`).

:func:`leaf_bound` is the bound of a module that has one of its own or a registered one; composing
bounds over a model (``nn.Sequential``, ``torch.fx`` graphs) is the dispatcher's job
(:mod:`certify.bounds`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

import torch
from torch import nn

__all__ = [
    "BEHAVIOUR_METHODS",
    "FLOAT64_SLACK",
    "BoundFn",
    "LipschitzBounded",
    "Shape",
    "UnboundableModuleError",
    "finite_float64",
    "has_bound",
    "is_plain",
    "leaf_bound",
    "matrix_spectral_norm",
    "redefines_behaviour",
    "register_bound",
    "register_lazy_rules",
    "registered_bound",
    "require_plain",
]

#: Relative slack multiplied into every float64 norm. The SVD in float64 is backward stable: the
#: computed largest singular value is within about ``n * 2.2e-16`` of the true one (relative), so
#: 1e-9 covers matrices up to millions of rows with a wide margin.
FLOAT64_SLACK = 1e-9

#: A per-sample input shape (no batch dimension), e.g. ``(3, 32, 32)``.
Shape = tuple[int, ...]
#: A registered bound: ``fn(module, input_shape) -> float``, sound for ``input_shape`` (per sample)
#: when given and for every input size when None.
BoundFn = Callable[[nn.Module, Shape | None], float]

#: Methods whose redefinition in a subclass means that the subclass computes something else.
BEHAVIOUR_METHODS = ("forward", "_conv_forward")

_REGISTRY: dict[type[nn.Module], BoundFn] = {}
_LAZY_RULES: dict[str, Callable[[], None]] = {}
_LAZY_DONE: set[str] = set()


@runtime_checkable
class LipschitzBounded(Protocol):
    """The one contract: a module that states a sound upper bound of its L2 Lipschitz constant.

    ``lipschitz_bound(input_shape=None)`` returns, in float64 from the weights the module actually
    uses, an upper bound of ``sup ||f(x) - f(y)|| / ||x - y||`` over inputs of per-sample shape
    ``input_shape`` (every input size when None). certify's dispatcher uses it before any
    registered rule; ``isinstance(module, LipschitzBounded)`` tells whether a module has one.
    """

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float: ...


class UnboundableModuleError(TypeError):
    """Raised when no sound Lipschitz bound is known for a module (or for part of a model's graph).

    ``detail``, when given, replaces the standard message (used by :mod:`certify.graph` to list
    every unsupported operation of a model in one error).
    """

    def __init__(self, module: nn.Module, path: str = "", *, detail: str | None = None) -> None:
        name = type(module).__module__ + "." + type(module).__qualname__
        where = f" at '{path}'" if path else ""
        message = detail or (
            f"no sound Lipschitz bound is known for module {name}{where}. Give the class a method "
            "`lipschitz_bound(self, input_shape=None) -> float` returning a sound float64 upper bound, or "
            "register one with `certify.bounds.register_bound(YourModule, fn)` where "
            "fn(module, input_shape) -> float. certify never guesses a bound."
        )
        super().__init__(message)
        self.module = module
        self.path = path


def register_bound(module_type: type[nn.Module], fn: BoundFn | None = None) -> Callable[[BoundFn], BoundFn]:
    """Register ``fn(module, input_shape) -> float`` as the sound bound of ``module_type``.

    Usable as a decorator: ``@register_bound(nn.ReLU)``. Subclasses inherit the registration
    unless they define ``lipschitz_bound``, are registered themselves, or redefine ``forward``.
    """

    def deco(f: BoundFn) -> BoundFn:
        _REGISTRY[module_type] = f
        return f

    if fn is not None:
        deco(fn)
    return deco


def register_lazy_rules(package: str, loader: Callable[[], None]) -> None:
    """Run ``loader`` (which registers bounds) the first time a class of top-level ``package`` is looked up.

    Third-party rules (deel-torchlip, orthogonium) are registered this way, so that certify never
    imports those optional libraries unless a model uses them.
    """
    _LAZY_RULES[package] = loader


def _load_lazy_rules(mro: tuple[type, ...]) -> None:
    for cls in mro:
        root = cls.__module__.split(".", 1)[0]
        if root in _LAZY_RULES and root not in _LAZY_DONE:
            _LAZY_DONE.add(root)
            _LAZY_RULES[root]()


def redefines_behaviour(cls: type, base: type) -> tuple[str, ...]:
    """The methods of :data:`BEHAVIOUR_METHODS` that ``cls`` resolves to another function than ``base``.

    Empty when ``cls`` computes what ``base`` computes (its ``forward`` and ``_conv_forward`` are
    ``base``'s own): the one check behind every inherited registration and every "plain layer" rule.
    """
    return tuple(
        name for name in BEHAVIOUR_METHODS if getattr(cls, name, None) is not getattr(base, name, None)
    )


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` that computes ``base``'s forward (no redefinition, no forward hooks)."""
    return isinstance(module, base) and not redefines_behaviour(type(module), base) and not _has_hooks(module)


def require_plain(module: nn.Module, base: type[nn.Module]) -> None:
    """Refuse a module whose computation is not ``base``'s: redefined methods or forward hooks.

    Raises :class:`UnboundableModuleError` for a subclass that redefines ``forward`` or
    ``_conv_forward``, and ``ValueError`` for forward hooks (they may change what it computes).
    """
    cls = type(module)
    changed = redefines_behaviour(cls, base)
    if changed:
        raise UnboundableModuleError(
            module,
            detail=(
                f"{cls.__module__}.{cls.__qualname__} redefines {', '.join(changed)} of {base.__name__}, so "
                f"the bound of {base.__name__} does not apply to it; register a bound for it with "
                "certify.bounds.register_bound"
            ),
        )
    if _has_hooks(module):
        raise ValueError(
            f"{cls.__name__} has forward hooks, which may change what it computes; remove them (for "
            "torch.nn.utils.spectral_norm / weight_norm use the torch.nn.utils.parametrizations versions) "
            "before bounding it"
        )


def finite_float64(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` detached, in float64 on CPU; ``ValueError`` naming ``what`` if it has NaN or Inf."""
    value = tensor.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{what} contains NaN or Inf: no Lipschitz bound exists")
    return value


def matrix_spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a matrix, by float64 SVD, times ``1 + FLOAT64_SLACK``.

    A tensor of more than two dimensions is read as ``(rows, everything else)``.
    """
    w = finite_float64(weight, "weight")
    if w.ndim != 2:
        w = w.reshape(w.shape[0], -1)
    if w.numel() == 0:
        return 0.0
    sigma = torch.linalg.matrix_norm(w, ord=2).item()
    return float(sigma) * (1.0 + FLOAT64_SLACK)


def _has_own(module: nn.Module) -> bool:
    return callable(getattr(module, "lipschitz_bound", None))


def _own_bound(module: nn.Module, input_shape: Shape | None) -> float:
    method = cast("Callable[..., float]", module.lipschitz_bound)
    params = inspect.signature(method).parameters
    value = method(input_shape=input_shape) if "input_shape" in params else method()
    return float(value)


def registered_bound(module: nn.Module) -> BoundFn | None:
    """The bound function registered for ``module``'s class or the nearest registered ancestor.

    An ancestor's registration is skipped when ``type(module)`` redefines ``forward`` or
    ``_conv_forward`` relative to it (:func:`redefines_behaviour`): that subclass computes something
    else. Lazily registered rules (third-party libraries) are loaded the first time one of their
    classes is seen.
    """
    mro = type(module).__mro__
    _load_lazy_rules(mro)
    for cls in mro:
        if cls in _REGISTRY:
            if redefines_behaviour(type(module), cls):
                return None
            return _REGISTRY[cls]
    return None


def has_bound(module: nn.Module) -> bool:
    """Whether ``module`` has its own ``lipschitz_bound`` method or a registered bound (a graph leaf)."""
    return _has_own(module) or registered_bound(module) is not None


def leaf_bound(module: nn.Module, input_shape: Shape | None = None) -> float:
    """The bound of a module that has one (:func:`has_bound`): its own method, else its registered rule.

    Raises :class:`UnboundableModuleError` for a module with neither (compose those with
    :func:`certify.bounds.module_bound`).
    """
    if _has_own(module):
        return _own_bound(module, input_shape)
    fn = registered_bound(module)
    if fn is None:
        raise UnboundableModuleError(module)
    return float(fn(module, input_shape))
