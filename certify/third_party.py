"""Bounds for deel-torchlip and orthogonium layers, from the weights they use, never from their claims.

Both libraries are optional: their rules are registered lazily (:func:`certify.contract.register_lazy_rules`),
the first time one of their classes is looked up, so certify imports them only when a model uses
them. Each bound is derived here from the layer's forward as the installed version computes it:

* deel-torchlip: ``PadConv1d/2d`` (symmetric padding: the padding copy's norm times the convolution's,
  or the exact norm of the composition when small), ``SymmetricPad``, ``GroupSort`` / ``MaxMin``
  (sorts within groups: 1-Lipschitz, times ``k_coef_lip``), ``HouseHolder``, ``LPReLU``, the scaled
  poolings (the plain pooling's bound times the scale), ``BatchLipNorm`` (one scalar scale in eval
  mode), ``LayerCentering`` (an orthogonal projection), ``ScaleBiasLayer``;
* orthogonium: ``MaxMin``, ``Abs``, ``HouseHolder``, ``ChannelShuffle``, the residual wrappers
  ``ConcatResidual`` / ``L2NormResidual`` (from the bound of the wrapped module, through the
  dispatcher :func:`certify.bounds.module_bound`), and the SLL / AOC residual blocks
  ``x - 2 W^T relu(W x + b)`` (:func:`sll_bound` with the norm of the actual, rescaled weight). A
  block whose forward does not compute the formula its bound is derived for (another library
  version) is refused (:func:`_check_reference`).

Proofs: ``docs/proofs/residual-blocks.md`` (``#lemma-gradient-step`` for the SLL blocks,
``#lemma-residual-combinations``) and ``docs/proofs/activations-pooling.md#lemma-piecewise-isometry``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certify.bounds import module_bound
from certify.contract import (
    Shape,
    UnboundableModuleError,
    matrix_spectral_norm,
    register_bound,
    register_lazy_rules,
)
from certify.exact import dense_operator_norm
from certify.rules.conv import configured_conv_bound, conv_operator_bound

__all__ = ["claimed_bound", "sll_bound"]

# The third-party modules are untyped (deel-torchlip and orthogonium ship no type information), so the
# rules below read their attributes through Any.

#: Largest dense matrix (entries) whose exact norm is computed for composite third-party layers.
_DENSE_ENTRIES = 1 << 22


def _one(module: Any, input_shape: Shape | None) -> float:
    return 1.0


def _coef(module: Any) -> float:
    return abs(float(module._coefficient_lip))


def _register_deel() -> None:
    from deel.torchlip import modules as dl
    from deel.torchlip.functional import SymmetricPad
    from deel.torchlip.modules.normalization import LayerCentering, ScaleBiasLayer

    def pad_conv(module: Any, input_shape: Shape | None) -> float:
        # PadConv{1,2}d: the symmetric ("mirror with edge") padding is applied by self.pad before a
        # 'valid' convolution; every other padding mode is nn.Conv's own.
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
        conv = F.conv1d if w64.ndim == 3 else F.conv2d

        def linear_part(x: torch.Tensor) -> torch.Tensor:
            return conv(
                module.pad(x), w64, None, module.stride, module.padding, module.dilation, module.groups
            )

        out_numel = linear_part(torch.zeros((1, *input_shape), dtype=torch.float64)).numel()
        if math.prod(input_shape) * out_numel > _DENSE_ENTRIES:
            return product
        return min(product, dense_operator_norm(linear_part, input_shape))

    def symmetric_pad(module: Any, input_shape: Shape | None) -> float:
        if input_shape is None:
            raise ValueError("deel SymmetricPad needs the input shape to be bounded")
        return _selection_norm(module, input_shape)[0]

    def scaled_avg_pool(module: Any, input_shape: Shape | None) -> float:
        plain = nn.AvgPool2d(
            module.kernel_size,
            module.stride,
            module.padding,
            module.ceil_mode,
            module.count_include_pad,
            module.divisor_override,
        )
        return _coef(module) * float(module.scalingFactor) * module_bound(plain, input_shape)

    def scaled_adaptive_avg_pool(module: Any, input_shape: Shape | None) -> float:
        # AdaptiveAvgPool to (1, 1) times sqrt(H W): the mean over H W entries is 1/sqrt(H W)-Lipschitz.
        if input_shape is None:
            raise ValueError("deel ScaledAdaptiveAvgPool2d needs the input shape to be bounded")
        h, w = input_shape[-2:]
        plain = nn.AdaptiveAvgPool2d(module.output_size)
        return _coef(module) * math.sqrt(h * w) * module_bound(plain, input_shape)

    def scaled_l2_pool(module: Any, input_shape: Shape | None) -> float:
        plain = nn.LPPool2d(2, module.kernel_size, module.stride, module.ceil_mode)
        return _coef(module) * module_bound(plain, input_shape)

    def batch_lip_norm(module: Any, input_shape: Shape | None) -> float:
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

    def layer_centering(module: Any, input_shape: Shape | None) -> float:
        # x - mean(x over dims) (+ bias): the orthogonal projection onto mean-zero fibres, norm 1.
        dims = module.dim if isinstance(module.dim, (list, tuple)) else (module.dim,)
        if any(int(d) == 0 for d in dims):
            raise ValueError(
                "LayerCentering over the batch dimension couples samples; it cannot be certified"
            )
        return 1.0

    def scale_bias(module: Any, input_shape: Shape | None) -> float:
        scale = torch.as_tensor(module.scalar).detach().to(torch.float64)
        if not torch.isfinite(scale).all():
            raise ValueError("ScaleBiasLayer has a non-finite scalar")
        return float(scale.abs().max().item())

    def lprelu(module: Any, input_shape: Shape | None) -> float:
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

    def concat_residual(module: Any, input_shape: Shape | None) -> float:
        # cat([x1, fn(x2)]) with (x1, x2) = x.chunk(2, dim=1), two disjoint parts of x:
        # ||d||^2 = ||d1||^2 + ||d2||^2 and ||out||^2 <= ||d1||^2 + L^2 ||d2||^2 <= max(1, L)^2 ||d||^2.
        inner = None
        if input_shape is not None:
            c = input_shape[0]
            inner = (c - (c + 1) // 2, *input_shape[1:])
        return max(1.0, module_bound(module.fn, inner, path="fn"))

    def l2norm_residual(module: Any, input_shape: Shape | None) -> float:
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


def _sll_dense(module: Any, input_shape: Shape | None) -> float:
    """orthogonium ``SDPBasedLipschitzDense``: ``x - 2 W^T diag(t) relu(W x + b)``, see :func:`sll_bound`."""
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


def _sll_conv(module: Any, input_shape: Shape | None) -> float:
    """orthogonium ``SDPBasedLipschitzResBlock``: ``x - 2 K^T relu(K x + b)`` with the rescaled kernel ``K``.

    ``conv_transpose2d(., K, padding=p)`` is the adjoint of ``conv2d(., K, padding=p)`` on inputs
    of the block's size (odd kernel, ``p = k // 2``: both keep the size), so the Jacobian is
    ``I - 2 C^T S C`` with ``C`` the zero-padded convolution; :func:`sll_bound` with ``a >= ||C||``.
    """
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


def _aoc_res_block(module: Any, input_shape: Shape | None) -> float:
    """orthogonium ``AOCLipschitzResBlock``: ``x - 2 C^T relu(C x + b)`` with ``C`` the 'valid' convolution.

    Its forward convolves without padding (the circular branch pads by ``self.padding``, which
    is 0 in that mode) and transposes with padding 0, the exact adjoint; see :func:`sll_bound`.
    """
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


def claimed_bound(module: nn.Module) -> float | None:
    """The Lipschitz constant a third-party library claims for ``module``, or None (no claim known).

    * deel-torchlip: every ``LipschitzModule`` claims its ``k_coef_lip`` (the ``_coefficient_lip`` it
      stores), the constant its constraint is documented to ensure;
    * orthogonium: every layer of ``orthogonium.layers`` is documented as 1-Lipschitz (orthogonal,
      AOL, SLL and AOC layers, its activations and residual wrappers): 1.

    A claim is what the library says, not a bound: the audit prints it next to certify's bound
    computed from the weights, and flags a layer whose bound exceeds its claim (the claim is then
    unproven) and one whose measured lower estimate exceeds it (the claim is then false). Neither
    library is imported: the module name of the class (of the first library class in its MRO, for
    a layer with a torch parametrization, whose class torch derives) says where it comes from.
    """
    origins = [k.__module__ for k in type(module).__mro__]
    origin = next((o for o in origins if o.startswith(("deel.torchlip.", "orthogonium."))), "")
    if origin.startswith("deel.torchlip."):
        coefficient = getattr(module, "_coefficient_lip", None)
        return abs(float(coefficient)) if isinstance(coefficient, (int, float)) else None
    if origin.startswith("orthogonium.layers"):
        return 1.0
    return None


register_lazy_rules("deel", _register_deel)
register_lazy_rules("orthogonium", _register_orthogonium)
