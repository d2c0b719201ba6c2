"""Folding affine normalisations into Lipschitz bounds: eval-mode BatchNorm and input normalisation.

BatchNorm in eval mode is the per-channel affine map ``y_c = s_c x_c + t_c`` with
``s_c = gamma_c / sqrt(running_var_c + eps)``. Bounded alone its constant is ``max_c |s_c|``
(generally above 1). When it directly follows a convolution or linear layer ``x -> W x + b`` whose
output nothing else reads, the pair is the single affine map ``x -> diag(s) W x + const``, and
``||diag(s) W||_2 <= max|s| ||W||_2`` is usually much smaller than the product: the first step of
the audit recipe in ``docs/research-certification.md`` section 4. For a convolution, ``diag(s) W``
is the convolution whose kernel has output channel ``c`` multiplied by ``s_c`` (the padding mode
acts on the input, before the kernel, so it is unchanged).

Input normalisation ``x -> (x - mu) / sigma`` (per channel) is ``1 / min_c |sigma_c|``-Lipschitz:
:class:`Normalize` is a module that computes it and bounds itself accordingly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from certify.bounds import FLOAT64_SLACK, matrix_spectral_norm

__all__ = ["Normalize", "batchnorm_scale", "can_fold", "folded_bound", "folded_weight"]

_CONV_FORWARDS = {nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward}


def batchnorm_scale(bn: nn.Module) -> Tensor:
    """Per-channel scale ``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm, in float64.

    Raises ``ValueError`` when the layer normalises with batch statistics (training mode, or no
    running statistics): then it couples the samples of a batch and has no per-sample bound.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
    if bn.training or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} normalises with batch statistics (training mode or "
            "track_running_stats=False): call model.eval() on a model with running statistics"
        )
    var = bn.running_var.detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + float(bn.eps))
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(device=scale.device, dtype=torch.float64)
    if not torch.isfinite(scale).all():
        raise ValueError(
            f"{type(bn).__name__} has a non-finite scale (running_var + eps <= 0 or NaN weights)"
        )
    return scale


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` whose forward is ``base``'s own and that has no forward hooks."""
    return (
        isinstance(module, base)
        and type(module).forward is base.forward
        and getattr(type(module), "_conv_forward", None) is getattr(base, "_conv_forward", None)
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def can_fold(layer: nn.Module, bn: nn.Module, layer_output_ndim: int) -> bool:
    """Whether ``bn(layer(x))`` is the affine map with weight ``diag(s) W`` (see :func:`folded_weight`).

    ``layer`` must be a plain ``Conv1d``/``Conv2d`` or ``Linear`` (its own forward, possibly a
    parametrized weight, no hooks), ``bn`` a plain eval-mode BatchNorm with running statistics whose
    channels are the layer's output channels (dimension 1: a ``Linear`` only when its output is
    ``(N, features)``, ``layer_output_ndim == 2``).
    """
    if not _plain(bn, _BatchNorm) or bn.training or bn.running_var is None:
        return False
    if any(_plain(layer, cls) for cls in _CONV_FORWARDS):
        return bn.num_features == layer.out_channels
    if _plain(layer, nn.Linear):
        return layer_output_ndim == 2 and bn.num_features == layer.out_features
    return False


def folded_weight(layer: nn.Module, bn: nn.Module) -> Tensor:
    """The float64 weight of ``bn . layer``: the layer's effective weight, output channel ``c`` times ``s_c``.

    (Only meaningful for pairs accepted by :func:`can_fold`.)
    """
    w = layer.weight.detach().to(torch.float64)
    s = batchnorm_scale(bn).to(w.device)
    return w * s.reshape(-1, *([1] * (w.ndim - 1)))


def folded_bound(layer: nn.Module, bn: nn.Module, input_shape: tuple[int, ...] | None = None) -> float:
    """Sound float64 bound of ``x -> bn(layer(x))`` for a pair accepted by :func:`can_fold`.

    The norm of the folded linear map: float64 SVD for ``Linear``,
    :func:`certify.conv_norm.conv_operator_bound` of the folded kernel with the layer's stride,
    padding, padding mode, dilation and groups (for ``input_shape`` when given) for convolutions.
    """
    w = folded_weight(layer, bn)
    if isinstance(layer, nn.Linear):
        return matrix_spectral_norm(w)
    from certify.conv_norm import conv_operator_bound

    return conv_operator_bound(
        w,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        padding_mode=layer.padding_mode,
        input_shape=input_shape,
    )


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
