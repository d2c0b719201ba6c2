"""Sound upper bounds of L2 Lipschitz constants, computed in float64 from the actual weights.

The contract (see ``docs/design.md``): every bound returned here is an upper bound that holds,
never an estimate. Per module the bound comes from, in this order,

1. the module's own ``lipschitz_bound(input_shape=None)`` method (lipnet's layers, or any user
   module that implements it);
2. a function registered for its type with :func:`register_bound` (plain torch layers are
   registered below and in :mod:`certify.conv_norm`; deel-torchlip and orthogonium layers are
   registered on first sight, from their *effective* weights, never from their own claims);
3. composition: an ``nn.Sequential`` without an input shape multiplies the bounds of its
   children; any other model (or a Sequential with an input shape, so that BatchNorm can be
   folded and convolutions bounded for their actual input size) is traced with ``torch.fx`` and
   bounded along its graph by :mod:`certify.graph`.

Anything else raises :class:`UnboundableModuleError`, which names the module and says how to
register a bound. Nothing is guessed.

A registration for a class also covers its subclasses **unless a subclass redefines
``forward``** (or ``_conv_forward``): a subclass that computes something else (deel-torchlip's
``ScaledAvgPool2d`` multiplies the ``nn.AvgPool2d`` output by the kernel size) must not inherit
the bound of its parent. Such a subclass is traced into instead, or registered on its own.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "FLOAT64_SLACK",
    "BoundFn",
    "UnboundableModuleError",
    "gelu_lipschitz",
    "has_bound",
    "input_shapes",
    "lipschitz_bound",
    "matrix_spectral_norm",
    "mish_lipschitz",
    "module_bound",
    "register_bound",
    "registered_bound",
    "silu_lipschitz",
    "sll_bound",
]

#: Relative slack multiplied into every float64 norm. The SVD in float64 is backward stable: the
#: computed largest singular value is within about ``n * 2.2e-16`` of the true one (relative), so
#: 1e-9 covers matrices up to millions of rows with a wide margin.
FLOAT64_SLACK = 1e-9

Shape = tuple[int, ...]
BoundFn = Callable[[nn.Module, "Shape | None"], float]
M = TypeVar("M", bound=type[nn.Module])

_REGISTRY: dict[type[nn.Module], BoundFn] = {}

#: Methods whose redefinition in a subclass cancels an inherited registration (see module doc).
_BEHAVIOUR_METHODS = ("forward", "_conv_forward")


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


def _has_own(module: nn.Module) -> bool:
    return callable(getattr(module, "lipschitz_bound", None))


def registered_bound(module: nn.Module) -> BoundFn | None:
    """The bound function registered for ``module``'s class or the nearest registered ancestor.

    An ancestor's registration is skipped when a class between it and ``type(module)`` redefines
    ``forward`` or ``_conv_forward``: that subclass computes something else. deel-torchlip and
    orthogonium registrations are loaded the first time one of their classes is seen.
    """
    mro = type(module).__mro__
    _load_third_party(mro)
    for depth, cls in enumerate(mro):
        if cls in _REGISTRY:
            if any(name in klass.__dict__ for klass in mro[:depth] for name in _BEHAVIOUR_METHODS):
                return None
            return _REGISTRY[cls]
    return None


def has_bound(module: nn.Module) -> bool:
    """Whether ``module`` has its own ``lipschitz_bound`` method or a registered bound (a graph leaf)."""
    return _has_own(module) or registered_bound(module) is not None


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
    """Sound bound of one module: its own method, a registered bound, or its traced graph.

    An ``nn.Sequential`` without ``input_shape`` is bounded by the product of its children
    (``shapes`` gives their input shapes when known); with ``input_shape`` it is bounded along
    its graph, which also folds BatchNorm into the preceding layer. Any other module without a
    bound of its own is traced by :func:`certify.graph.graph_bound`, which needs ``input_shape``.
    """
    if _has_own(module):
        return _own_bound(module, input_shape)
    fn = registered_bound(module)
    if fn is not None:
        return float(fn(module, input_shape))
    if isinstance(module, nn.Sequential) and input_shape is None:
        total = 1.0
        for name, child in module.named_children():
            child_shape = shapes.get(child) if shapes is not None else None
            total *= module_bound(child, child_shape, shapes=shapes, path=f"{path}.{name}" if path else name)
        return total
    if input_shape is None:
        name = type(module).__qualname__
        where = f" at '{path}'" if path else ""
        raise UnboundableModuleError(
            module,
            path,
            detail=(
                f"module {name}{where} has no bound of its own, so certify bounds it along its traced "
                "graph, which needs the per-sample input shape: call "
                "certify.lipschitz_bound(model, input_shape=(C, H, W))"
            ),
        )
    from certify.graph import graph_bound

    return graph_bound(module, tuple(int(s) for s in input_shape), path=path)


def lipschitz_bound(model: nn.Module, input_shape: Shape | None = None) -> float:
    """Sound float64 upper bound of ``model``'s L2 Lipschitz constant w.r.t. its input.

    With ``input_shape`` (per sample, e.g. ``(3, 32, 32)``) convolution bounds are computed for
    that size, which can be tighter, and models that are not a plain ``nn.Sequential`` of
    bounded modules are bounded along their ``torch.fx`` graph (:mod:`certify.graph`; in eval
    mode, the mode in which certificates are used); without it the bounds hold for every size.
    """
    return module_bound(model, None if input_shape is None else tuple(int(s) for s in input_shape))


# ---------------------------------------------------------------------------------------------
# Slopes of smooth activations


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
        t = torch.tanh(torch.nn.functional.softplus(x))
        return t + x * torch.sigmoid(x) * (1.0 - t * t)

    return _grid_max_abs_slope(derivative, 40.0)


# ---------------------------------------------------------------------------------------------
# Plain torch layers (convolutions, pooling and BatchNorm are in certify.conv_norm)


def _one(module: nn.Module, input_shape: Shape | None) -> float:
    return 1.0


# Each is 1-Lipschitz: identities and permutations (Identity, Flatten, Unflatten, pixel
# (un)shuffle, ChannelShuffle), or elementwise maps with slopes in [-1, 1]: ReLU, ReLU6, Tanh,
# Hardtanh, Softsign (1 / (1 + |x|)^2), Tanhshrink (tanh^2), Softplus (sigmoid(beta x)),
# LogSigmoid (sigmoid(-x)), CELU with alpha > 0 is checked below.
for _cls in (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.ReLU6,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softsign,
    nn.PixelUnshuffle,
    nn.PixelShuffle,
    nn.ChannelShuffle,
    nn.Tanhshrink,
    nn.Softplus,
    nn.LogSigmoid,
):
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


@register_bound(nn.Hardsigmoid)
def _hardsigmoid(module: nn.Module, input_shape: Shape | None) -> float:
    # relu6(x + 3) / 6: slope 1/6 on (-3, 3), 0 elsewhere.
    return 1.0 / 6.0 * (1.0 + 1e-15)


@register_bound(nn.Hardswish)
def _hardswish(module: nn.Module, input_shape: Shape | None) -> float:
    # x relu6(x + 3) / 6: slope (2x + 3) / 6 on (-3, 3), in (-1/2, 3/2); 0 below, 1 above.
    return 1.5


@register_bound(nn.ELU)
def _elu(module: nn.Module, input_shape: Shape | None) -> float:
    # x for x > 0, alpha (e^x - 1) below: slopes 1 and alpha e^x, whose magnitude tends to |alpha|.
    return max(1.0, abs(float(module.alpha)))


@register_bound(nn.CELU)
def _celu(module: nn.Module, input_shape: Shape | None) -> float:
    # alpha (exp(x / alpha) - 1) for x < 0 has slope exp(x / alpha) <= 1 when alpha > 0; for
    # alpha < 0 that slope grows without bound as x -> -inf.
    if float(module.alpha) <= 0:
        raise ValueError(f"CELU with alpha={module.alpha} <= 0 is not Lipschitz")
    return 1.0


@register_bound(nn.SELU)
def _selu(module: nn.Module, input_shape: Shape | None) -> float:
    # scale * (x or alpha (e^x - 1)): largest slope scale * alpha, approached at 0-.
    return 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1.0 + 1e-12)


@register_bound(nn.GELU)
def _gelu(module: nn.Module, input_shape: Shape | None) -> float:
    return gelu_lipschitz(module.approximate)


@register_bound(nn.SiLU)
def _silu(module: nn.Module, input_shape: Shape | None) -> float:
    return silu_lipschitz()


@register_bound(nn.Mish)
def _mish(module: nn.Module, input_shape: Shape | None) -> float:
    return mish_lipschitz()


@register_bound(nn.PReLU)
def _prelu(module: nn.Module, input_shape: Shape | None) -> float:
    slopes = module.weight.detach().to(torch.float64)
    if not torch.isfinite(slopes).all():
        raise ValueError("PReLU slopes contain NaN or Inf")
    return max(1.0, float(slopes.abs().max().item()))


@register_bound(nn.RReLU)
def _rrelu(module: nn.Module, input_shape: Shape | None) -> float:
    if module.training:
        raise ValueError(
            "RReLU in training mode draws random slopes; put the model in eval() before bounding it"
        )
    # In eval mode the negative slope is the fixed (lower + upper) / 2.
    return max(1.0, abs((float(module.lower) + float(module.upper)) / 2.0))


@register_bound(nn.Softmax)
@register_bound(nn.Softmin)
def _softmax(module: nn.Module, input_shape: Shape | None) -> float:
    # Jacobian diag(p) - p p^T is symmetric PSD with v^T J v = Var_p(v) <= (max v - min v)^2 / 4
    # <= 1/2 for ||v|| = 1 (Popoviciu), so each softmax fibre is 1/2-Lipschitz; fibres are disjoint.
    return 0.5


@register_bound(nn.Linear)
def _linear(module: nn.Module, input_shape: Shape | None) -> float:
    return matrix_spectral_norm(module.weight)


@register_bound(nn.Bilinear)
def _bilinear(module: nn.Module, input_shape: Shape | None) -> float:
    raise UnboundableModuleError(
        module,
        detail="nn.Bilinear multiplies two inputs: it is not globally Lipschitz and cannot be certified",
    )


def _transposed_conv_bound(module: nn.Module, input_shape: Shape | None) -> float:
    """``ConvTranspose{1,2}d``: the norm of the convolution it is the adjoint of.

    ``conv_transpose(stride s, padding p, output_padding q)`` on an input of spatial size ``m``
    produces size ``n = (m - 1) s - 2p + d (k - 1) + q + 1`` and is exactly the adjoint of
    ``conv(stride s, padding p)`` (zero padding) on inputs of size ``n`` (``q < s`` makes the
    forward convolution of size ``n`` return size ``m``), with the same weight tensor read as a
    convolution kernel ``(C_in_T, C_out_T / groups, k...)``. An operator and its adjoint have the
    same norm, so the bound of that convolution applies.
    """
    from certify.conv_norm import conv_operator_bound

    if module.padding_mode != "zeros":
        raise ValueError(f"{type(module).__name__} only supports zero padding, got {module.padding_mode!r}")
    conv_shape: Shape | None = None
    if input_shape is not None:
        spatial = input_shape[1:]
        sizes = []
        for i, m in enumerate(spatial):
            k = module.kernel_size[i]
            n = (
                (m - 1) * module.stride[i]
                - 2 * module.padding[i]
                + module.dilation[i] * (k - 1)
                + module.output_padding[i]
                + 1
            )
            sizes.append(n)
        conv_shape = (module.out_channels, *sizes)
    return conv_operator_bound(
        module.weight,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode="zeros",
        input_shape=conv_shape,
    )


register_bound(nn.ConvTranspose1d, _transposed_conv_bound)
register_bound(nn.ConvTranspose2d, _transposed_conv_bound)


# ---------------------------------------------------------------------------------------------
# Third-party layers, registered the first time one of their classes is seen. Their bounds come
# from the weights the layer actually uses (its parametrized ``weight``), never from its claim.

_THIRD_PARTY_DONE: set[str] = set()
#: Largest dense matrix (entries) whose exact norm is computed for composite third-party layers.
_DENSE_ENTRIES = 1 << 22


def _load_third_party(mro: tuple[type, ...]) -> None:
    for cls in mro:
        root = cls.__module__.split(".", 1)[0]
        if root in _THIRD_PARTY_LOADERS and root not in _THIRD_PARTY_DONE:
            _THIRD_PARTY_DONE.add(root)
            _THIRD_PARTY_LOADERS[root]()


def _coef(module: nn.Module) -> float:
    return abs(float(module._coefficient_lip))


def _register_deel() -> None:
    from deel.torchlip import modules as dl
    from deel.torchlip.functional import SymmetricPad
    from deel.torchlip.modules.normalization import LayerCentering, ScaleBiasLayer

    def pad_conv(module: nn.Module, input_shape: Shape | None) -> float:
        # PadConv{1,2}d: the symmetric ("mirror with edge") padding is applied by self.pad before a
        # 'valid' convolution; every other padding mode is nn.Conv's own.
        from certify.conv_norm import configured_conv_bound, conv_operator_bound

        if str(module.old_padding_mode).lower() != "symmetric":
            return configured_conv_bound(module, input_shape)
        if input_shape is None:
            raise ValueError(
                f"{type(module).__name__} with symmetric padding needs the input shape to be bounded"
            )
        # ||conv(P x)|| <= ||conv|| ||P||, P the padding copy; and, when the map is small, the exact
        # norm of the composition (float64 dense matrix from the actual weight). Both are sound.
        pad_factor, padded = _selection_norm(module.pad, input_shape)
        weight = module.weight.detach()
        product = pad_factor * conv_operator_bound(
            weight,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            input_shape=padded,
        )
        w64 = weight.to(device="cpu", dtype=torch.float64)
        conv = torch.nn.functional.conv1d if w64.ndim == 3 else torch.nn.functional.conv2d

        def linear_part(x: torch.Tensor) -> torch.Tensor:
            return conv(
                module.pad(x), w64, None, module.stride, module.padding, module.dilation, module.groups
            )

        out_numel = linear_part(torch.zeros((1, *input_shape), dtype=torch.float64)).numel()
        if math.prod(input_shape) * out_numel > _DENSE_ENTRIES:
            return product
        from certify.exact import dense_operator_norm

        return min(product, dense_operator_norm(linear_part, input_shape))

    def symmetric_pad(module: nn.Module, input_shape: Shape | None) -> float:
        if input_shape is None:
            raise ValueError("deel SymmetricPad needs the input shape to be bounded")
        return _selection_norm(module, input_shape)[0]

    def scaled_avg_pool(module: nn.Module, input_shape: Shape | None) -> float:
        plain = nn.AvgPool2d(
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )
        return _coef(module) * float(module.scalingFactor) * module_bound(plain, input_shape)

    def scaled_adaptive_avg_pool(module: nn.Module, input_shape: Shape | None) -> float:
        # AdaptiveAvgPool to (1, 1) times sqrt(H W): the mean over H W entries is 1/sqrt(H W)-Lipschitz.
        if input_shape is None:
            raise ValueError("deel ScaledAdaptiveAvgPool2d needs the input shape to be bounded")
        h, w = input_shape[-2:]
        plain = nn.AdaptiveAvgPool2d(module.output_size)
        return _coef(module) * math.sqrt(h * w) * module_bound(plain, input_shape)

    def scaled_l2_pool(module: nn.Module, input_shape: Shape | None) -> float:
        plain = nn.LPPool2d(2, module.kernel_size, module.stride, module.ceil_mode)
        return _coef(module) * module_bound(plain, input_shape)

    def batch_lip_norm(module: nn.Module, input_shape: Shape | None) -> float:
        # Eval mode: (x - running mean) * scale + bias with one scalar scale (1 for BatchCentering).
        # The eval forward first folds the running sums (update_running_values, idempotent after
        # the first call), so do the same before reading the scale it will use.
        if module.training:
            raise ValueError(
                f"{type(module).__name__} in training mode uses batch statistics; call model.eval()"
            )
        module.update_running_values()
        scale = torch.as_tensor(module.get_scaling(training=False)).detach().to(torch.float64)
        if not torch.isfinite(scale).all():
            raise ValueError(f"{type(module).__name__} has a non-finite scale")
        return float(scale.abs().max().item())

    def layer_centering(module: nn.Module, input_shape: Shape | None) -> float:
        # x - mean(x over dims) (+ bias): the orthogonal projection onto mean-zero fibres, norm 1.
        dims = module.dim if isinstance(module.dim, (list, tuple)) else (module.dim,)
        if any(int(d) == 0 for d in dims):
            raise ValueError(
                "LayerCentering over the batch dimension couples samples; it cannot be certified"
            )
        return 1.0

    def scale_bias(module: nn.Module, input_shape: Shape | None) -> float:
        scale = torch.as_tensor(module.scalar).detach().to(torch.float64)
        if not torch.isfinite(scale).all():
            raise ValueError("ScaleBiasLayer has a non-finite scalar")
        return float(scale.abs().max().item())

    def lprelu(module: nn.Module, input_shape: Shape | None) -> float:
        k = float(module._coefficient_lip)
        slopes = torch.clamp(module.weight.detach().to(torch.float64), -k, k)
        return max(1.0, float(slopes.abs().max().item()))

    register_bound(dl.PadConv2d, pad_conv)
    register_bound(dl.PadConv1d, pad_conv)
    register_bound(SymmetricPad, symmetric_pad)
    # GroupSort (and GroupSort2, FullSort): a sort within groups, times k_coef_lip. MaxMin:
    # cat(relu(x), relu(-x)) times k_coef_lip; per entry (relu(a) - relu(b))^2 + (relu(-a) -
    # relu(-b))^2 <= (a - b)^2, so 1-Lipschitz before the factor.
    register_bound(dl.GroupSort, lambda m, s: _coef(m))
    register_bound(dl.MaxMin, lambda m, s: _coef(m))
    # HouseHolder: identity on one side of a line, the reflection across that line on the other;
    # continuous and an isometry on each side, hence 1-Lipschitz (k_coef_lip is not applied).
    register_bound(dl.HouseHolder, _one)
    register_bound(dl.LPReLU, lprelu)
    register_bound(dl.ScaledAvgPool2d, scaled_avg_pool)
    register_bound(dl.ScaledAdaptiveAvgPool2d, scaled_adaptive_avg_pool)
    register_bound(dl.ScaledL2NormPool2d, scaled_l2_pool)
    # F.lp_pool2d(x, 2, whole image): one L2 norm per channel, times k_coef_lip.
    register_bound(dl.ScaledAdaptativeL2NormPool2d, lambda m, s: _coef(m))
    register_bound(dl.BatchLipNorm, batch_lip_norm)
    register_bound(LayerCentering, layer_centering)
    register_bound(ScaleBiasLayer, scale_bias)


def _selection_norm(pad: nn.Module, input_shape: Shape) -> tuple[float, Shape]:
    """Norm of a padding module that only copies entries, and its output shape.

    Such a map sends each output entry to exactly one input entry, so its matrix ``P`` has one 1
    per row and ``||P||_2 = sqrt(max column sum)``: the root of the largest number of copies of
    one input entry. The column sums are ``P^T 1``, the gradient of ``sum(P x)``.
    """
    x = torch.zeros((1, *input_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = pad(x)
        (counts,) = torch.autograd.grad(y.sum(), x)
    return math.sqrt(float(counts.max().item())), tuple(y.shape[1:])


def _register_orthogonium() -> None:
    from orthogonium.layers import custom_activations as acts
    from orthogonium.layers.channel_shuffle import ChannelShuffle
    from orthogonium.layers.conv.SLL import sll_layer as sll
    from orthogonium.layers.residual import ConcatResidual, L2NormResidual

    def concat_residual(module: nn.Module, input_shape: Shape | None) -> float:
        # cat([x1, fn(x2)]) with (x1, x2) = x.chunk(2, dim=1), two disjoint parts of x:
        # ||d||^2 = ||d1||^2 + ||d2||^2 and ||out||^2 <= ||d1||^2 + L^2 ||d2||^2 <= max(1, L)^2 ||d||^2.
        inner = None
        if input_shape is not None:
            c = input_shape[0]
            inner = (c - (c + 1) // 2, *input_shape[1:])
        return max(1.0, module_bound(module.fn, inner, path="fn"))

    def l2norm_residual(module: nn.Module, input_shape: Shape | None) -> float:
        # sqrt(0.5 x^2 + 0.5 fn(x)^2 + eps) entrywise: (a, b) -> sqrt(a^2 + b^2 + eps) is
        # 1-Lipschitz, and x -> (sqrt(.5) x, sqrt(.5) fn(x)) is sqrt(0.5 + 0.5 L^2)-Lipschitz.
        inner = module_bound(module.fn, input_shape, path="fn")
        return math.sqrt(0.5 + 0.5 * inner * inner) * (1.0 + 1e-12)

    register_bound(acts.MaxMin, _one)  # (max(a, b), min(a, b)) per pair: a sort of pairs
    register_bound(acts.Abs, _one)
    # Reflection-or-identity (continuous piecewise isometry, as deel's) divided by sqrt(2).
    register_bound(acts.HouseHolder, lambda m, s: (1.0 / math.sqrt(2.0)) * (1.0 + 1e-12))
    register_bound(ChannelShuffle, _one)  # a permutation of the channels
    register_bound(ConcatResidual, concat_residual)
    register_bound(L2NormResidual, l2norm_residual)
    register_bound(sll.SDPBasedLipschitzDense, _sll_dense)
    register_bound(sll.SDPBasedLipschitzResBlock, _sll_conv)
    register_bound(sll.AOCLipschitzResBlock, _aoc_res_block)


_THIRD_PARTY_LOADERS: dict[str, Callable[[], None]] = {
    "deel": _register_deel,
    "orthogonium": _register_orthogonium,
}


def sll_bound(a: float) -> float:
    """Lipschitz bound of ``h(x) = x - 2 A^T S(x) A x``-type blocks given ``||A||_2 <= a``.

    For ``h(x) = x - 2 W^T D sigma(W x + b)`` with ``D`` diagonal >= 0 and ``sigma`` slope-restricted
    in ``[0, 1]`` (ReLU), the Jacobian is ``I - 2 A^T S A`` with ``A = D^(1/2) W`` and ``S``
    diagonal in ``[0, 1]``; ``0 <= A^T S A <= a^2 I``, so its eigenvalues lie in ``[1 - 2a^2, 1]``
    and ``||J|| <= max(1, 2a^2 - 1)`` (SLL, Araujo et al., ICLR 2023, Thm. 3, read with the
    actual weights instead of the guarantee of their parametrization).
    """
    return max(1.0, 2.0 * a * a - 1.0)


def _check_reference(
    module: nn.Module, reference: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> None:
    """Refuse to bound ``module`` if it does not compute ``reference`` (the formula the bound is for).

    Guards registered third-party bounds against a library version whose forward differs from
    the one the bound was derived from.
    """
    with torch.no_grad():
        got = module(x)
        want = reference(x)
    scale = float(want.abs().max().item()) + 1e-30
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
        raise UnboundableModuleError(
            module,
            detail=(
                f"{type(module).__name__} does not compute the formula certify's bound is derived for "
                "(the installed library version differs): register a bound for it with certify.register_bound"
            ),
        )


def _probe(module: nn.Module, shape: Shape) -> torch.Tensor:
    ref = next(iter(module.parameters()))
    gen = torch.Generator(device=ref.device).manual_seed(0)
    return torch.randn((2, *shape), generator=gen, device=ref.device, dtype=ref.dtype)


def _sll_dense(module: nn.Module, input_shape: Shape | None) -> float:
    """orthogonium ``SDPBasedLipschitzDense``: ``x - 2 W^T diag(t) relu(W x + b)``, see :func:`sll_bound`."""
    import torch.nn.functional as F

    with torch.no_grad():
        t = module.compute_t().detach()
        w = module.weight.detach()
    if not bool((t >= 0).all()) or not torch.isfinite(t).all():
        raise ValueError("SDPBasedLipschitzDense has negative or non-finite scales t")

    def reference(x: torch.Tensor) -> torch.Tensor:
        return x - 2 * F.linear(t * torch.relu(F.linear(x, w) + module.bias), w.T)

    _check_reference(module, reference, _probe(module, (w.shape[1],)))
    a = matrix_spectral_norm(t.to(torch.float64).sqrt()[:, None] * w.to(torch.float64))
    return sll_bound(a)


def _sll_conv(module: nn.Module, input_shape: Shape | None) -> float:
    """orthogonium ``SDPBasedLipschitzResBlock``: ``x - 2 K^T relu(K x + b)`` with the rescaled kernel ``K``.

    ``conv_transpose2d(., K, padding=p)`` is the adjoint of ``conv2d(., K, padding=p)`` on inputs
    of the block's size (odd kernel, ``p = k // 2``: both keep the size), so the Jacobian is
    ``I - 2 C^T S C`` with ``C`` the zero-padded convolution; :func:`sll_bound` with ``a >= ||C||``.
    """
    import torch.nn.functional as F

    from certify.conv_norm import conv_operator_bound

    with torch.no_grad():
        kernel = module.kernel.detach()
    k = kernel.shape[-1]
    if k % 2 != 1 or kernel.shape[-2] != k or module.padding != k // 2:
        raise UnboundableModuleError(
            module, detail="SDPBasedLipschitzResBlock with an even kernel is not supported"
        )
    pad, groups = module.padding, module.groups

    def reference(x: torch.Tensor) -> torch.Tensor:
        res = torch.relu(F.conv2d(x, kernel, padding=pad, groups=groups) + module.bias)
        return x - 2 * F.conv_transpose2d(res, kernel, padding=pad, groups=groups)

    channels = kernel.shape[1] * groups
    _check_reference(module, reference, _probe(module, input_shape or (channels, 8, 8)))
    a = conv_operator_bound(
        kernel,
        stride=1,
        padding=pad,
        dilation=1,
        groups=groups,
        padding_mode="zeros",
        input_shape=input_shape,
    )
    return sll_bound(a)


def _aoc_res_block(module: nn.Module, input_shape: Shape | None) -> float:
    """orthogonium ``AOCLipschitzResBlock``: ``x - 2 C^T relu(C x + b)`` with ``C`` the 'valid' convolution.

    Its forward convolves without padding (the circular branch pads by ``self.padding``, which
    is 0 in that mode) and transposes with padding 0, the exact adjoint; see :func:`sll_bound`.
    """
    import torch.nn.functional as F

    from certify.conv_norm import conv_operator_bound

    with torch.no_grad():
        kernel = module.in_conv.weight.detach()
        bias = None if module.in_conv.bias is None else module.in_conv.bias.detach()
    if module.padding_mode == "circular" and module.padding != 0:
        raise UnboundableModuleError(
            module, detail="AOCLipschitzResBlock with circular padding > 0 is not supported"
        )
    groups = module.groups

    def reference(x: torch.Tensor) -> torch.Tensor:
        res = torch.relu(F.conv2d(x, kernel, bias=bias, padding=0, groups=groups))
        return x - 2 * F.conv_transpose2d(res, kernel, padding=0, groups=groups)

    channels = kernel.shape[1] * groups
    _check_reference(module, reference, _probe(module, input_shape or (channels, 8, 8)))
    a = conv_operator_bound(
        kernel, stride=1, padding=0, dilation=1, groups=groups, padding_mode="zeros", input_shape=input_shape
    )
    return sll_bound(a)
