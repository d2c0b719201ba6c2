"""Affine normalisations: eval-mode BatchNorm (alone or folded into its layer) and input normalisation.

BatchNorm in eval mode is the per-channel affine map ``y_c = s_c x_c + t_c`` with
``s_c = gamma_c / sqrt(running_var_c + eps)``. Bounded alone its constant is ``max_c |s_c|``
(exact; generally above 1): :func:`batch_norm_bound`, registered for ``nn.BatchNorm1d/2d`` on
import (training mode, or no running statistics, is refused: the layer then couples the samples).
When it directly follows a convolution or linear layer ``x -> W x + b`` whose output nothing else
reads, the pair is the single affine map ``x -> diag(s) W x + const``, and
``||diag(s) W||_2 <= max|s| ||W||_2`` is usually much smaller than the product (proof:
``docs/proofs/composition.md#lemma-batchnorm``). For a convolution, ``diag(s) W``
is the convolution whose kernel has output channel ``c`` multiplied by ``s_c`` (the padding mode
acts on the input, before the kernel, so it is unchanged).

Input normalisation ``x -> (x - mu) / sigma`` (per channel) is ``1 / min_c |sigma_c|``-Lipschitz
(``docs/proofs/composition.md#lemma-input-normalisation``):
:class:`Normalize` is a module that computes it and bounds itself accordingly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from certify.contract import (
    FLOAT64_SLACK,
    Shape,
    finite_float64,
    is_plain,
    matrix_spectral_norm,
    register_bound,
    require_plain,
)
from certify.rules.conv import conv_operator_bound

__all__ = [
    "Normalize",
    "affine_scale",
    "batch_norm_bound",
    "batchnorm_scale",
    "can_fold",
    "folded_bound",
    "folded_weight",
]


def batchnorm_scale(bn: nn.Module) -> Tensor:
    """Per-channel scale ``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm, in float64.

    Raises ``ValueError`` when the layer normalises with batch statistics (training mode, or no
    running statistics): then it couples the samples of a batch and has no per-sample bound; and
    when its statistics or weights are not finite (:func:`affine_scale`).
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
    name = type(bn).__name__
    if bn.training:
        raise ValueError(
            f"{name} is in training mode, where it normalises with batch statistics; call model.eval() first"
        )
    if bn.running_var is None:
        raise ValueError(
            f"{name} has track_running_stats=False, so it uses batch statistics even in eval mode"
        )
    return affine_scale(bn.weight, bn.running_var, float(bn.eps), name)


def affine_scale(weight: Tensor | None, running_var: Tensor, eps: float, name: str = "batch_norm") -> Tensor:
    """``weight / sqrt(running_var + eps)`` per channel (``1 / sqrt(...)`` without weight), float64 on CPU.

    The scale of eval-mode batch normalisation, module or functional; ``ValueError`` naming ``name``
    when the statistics or weights contain NaN or Inf, a variance is negative, or a scale is infinite.
    """
    var = finite_float64(running_var, f"{name}.running_var")
    if (var < 0).any():
        raise ValueError(f"{name}.running_var has negative entries")
    scale = 1.0 / torch.sqrt(var + float(eps))
    if weight is not None:
        scale = scale * finite_float64(weight, f"{name}.weight")
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name} divides by zero (running_var + eps == 0)")
    return scale


def can_fold(layer: nn.Module, bn: nn.Module, layer_output_ndim: int) -> bool:
    """Whether ``bn(layer(x))`` is the affine map with weight ``diag(s) W`` (see :func:`folded_weight`).

    ``layer`` must be a plain ``Conv1d``/``Conv2d`` or ``Linear`` (its own forward, possibly a
    parametrized weight, no hooks), ``bn`` a plain eval-mode BatchNorm with running statistics whose
    channels are the layer's output channels (dimension 1: a ``Linear`` only when its output is
    ``(N, features)``, ``layer_output_ndim == 2``).
    """
    if not is_plain(bn, _BatchNorm) or bn.training or bn.running_var is None:
        return False
    if is_plain(layer, nn.Conv1d) or is_plain(layer, nn.Conv2d):
        return bn.num_features == layer.out_channels
    if is_plain(layer, nn.Linear):
        return layer_output_ndim == 2 and bn.num_features == layer.out_features
    return False


def folded_weight(layer: nn.Module, bn: nn.Module) -> Tensor:
    """The float64 weight of ``bn . layer``: the layer's effective weight, output channel ``c`` times ``s_c``.

    (Only meaningful for pairs accepted by :func:`can_fold`.)
    """
    w = cast(Tensor, layer.weight).detach().to(torch.float64)
    s = batchnorm_scale(bn).to(w.device)
    return w * s.reshape(-1, *([1] * (w.ndim - 1)))


def folded_bound(layer: nn.Module, bn: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """Sound float64 bound of ``x -> bn(layer(x))`` for a pair accepted by :func:`can_fold`.

    The norm of the folded linear map: float64 SVD for ``Linear``,
    :func:`certify.rules.conv.conv_operator_bound` of the folded kernel with the layer's stride,
    padding, padding mode, dilation and groups (for ``input_shape`` when given) for convolutions.
    """
    w = folded_weight(layer, bn)
    if isinstance(layer, nn.Linear):
        return matrix_spectral_norm(w)
    conv = cast("nn.Conv1d | nn.Conv2d", layer)
    return conv_operator_bound(
        w,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        input_shape=input_shape,
    )


# ---------------------------------------------------------------------------------------------
# BatchNorm alone


def batch_norm_bound(module: nn.Module) -> float:
    """Exact Lipschitz constant (times ``1 + FLOAT64_SLACK``) of a BatchNorm layer in eval mode.

    In eval mode with running statistics the layer is ``gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c``
    per channel: the constant is ``max_c |gamma_c| / sqrt(var_c + eps)`` (:func:`batchnorm_scale`). In
    training mode (or without running statistics) it normalises with batch statistics and couples
    the samples: ValueError.
    """
    return float(batchnorm_scale(module).abs().max().item()) * (1.0 + FLOAT64_SLACK)


def _batch_norm_module(module: nn.Module, input_shape: Shape | None) -> float:
    require_plain(module, nn.BatchNorm1d if isinstance(module, nn.BatchNorm1d) else nn.BatchNorm2d)
    return batch_norm_bound(module)


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_bound(_bn, _batch_norm_module)


class Normalize(nn.Module):
    """Input normalisation ``(x - mean) / std`` per channel (dimension 1), with its sound bound.

    Prepend it to a model trained on normalised inputs so that certificates are stated for raw
    ``[0, 1]`` pixels: ``lipschitz_bound()`` is ``1 / min_c |std_c|`` (times ``1 + FLOAT64_SLACK``),
    the factor research notes section 3 item 5 requires (``L / min sigma``, not ``L / max sigma``).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 0 or s.numel() == 0:
            raise ValueError("mean and std must have at least one value")
        if not (torch.isfinite(m).all() and torch.isfinite(s).all()):
            raise ValueError("mean and std must be finite")
        if not bool((s.abs() > 0).all()):
            raise ValueError(f"std must be non-zero, got {s.tolist()}")
        if m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise ValueError(f"mean has {m.numel()} values but std has {s.numel()}: give one per channel")
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """``1 / min |std|`` in float64: the per-channel scale with the largest magnitude."""
        smallest = float(self.std.detach().to(torch.float64).abs().min().item())
        return (1.0 / smallest) * (1.0 + FLOAT64_SLACK)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
