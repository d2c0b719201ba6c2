"""What every lipnet layer shares: the two protocols, the bounded bases, the frozen copies.

* :class:`LipschitzBounded` (:mod:`certify.contract`'s, re-exported): the
  ``lipschitz_bound(input_shape=None)`` contract that ``certify`` composes (a sound float64 upper
  bound of the module's L2 Lipschitz constant, from its actual weights, for inputs of
  ``input_shape`` per sample when given and for every input size otherwise).
* :class:`Exportable`: ``export()`` returns the plain frozen form of a module, what
  :func:`lipnet.export` puts in its place.
* :class:`BoundedConv2d` / :class:`BoundedLinear`: an ``nn.Conv2d`` / ``nn.Linear`` whose weight a
  :mod:`torch.nn.utils.parametrize` parametrization constrains (AOL, Björck, orthogonal, the
  linear residual kernel). Their bound is measured on the weight the layer uses in its current
  mode, never assumed, and they export to the plain torch layer holding that weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from certify.contract import LipschitzBounded, matrix_spectral_norm
from certify.rules.conv import configured_conv_bound

__all__ = [
    "BoundedConv2d",
    "BoundedLinear",
    "Exportable",
    "InputSizeUnknownError",
    "LipschitzBounded",
    "eval_mode",
    "frozen_conv2d",
    "frozen_linear",
    "set_frozen_weights",
    "zero_bias",
]

_Layer = TypeVar("_Layer", nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


@runtime_checkable
class Exportable(Protocol):
    """A module with a plain frozen form: ``export()``.

    ``export()`` returns a new module that computes what this module computes in eval mode, made of
    plain torch modules (or small frozen modules with their own bound, such as
    :class:`~lipnet.layers.FourierConv2d`) holding the values this module uses in eval mode, computed
    once, under ``torch.no_grad``. A container converts only itself: the children it keeps are
    exported in turn by :func:`lipnet.export`, which walks the result. ``export()`` applies to the
    class that defines it and to subclasses that do not redefine ``forward`` (or ``_conv_forward``);
    :func:`lipnet.export` copies any other subclass unchanged.
    """

    def export(self) -> nn.Module: ...


class InputSizeUnknownError(ValueError):
    """Raised by ``export()`` of a layer whose frozen form depends on an input size it has not seen yet.

    :func:`lipnet.export` answers it by one forward pass of a zero batch when it knows the input shape
    (its ``input_shape`` argument or the model's ``input_shape`` attribute).
    """


def zero_bias(module: nn.Module) -> None:
    """Set ``module.bias`` to zero, when it has one: the initial bias of every lipnet 1-Lipschitz layer.

    torch's default bias, uniform in ``±1 / sqrt(fan_in)``, is as large as a 1-Lipschitz layer's response
    to its input (``±0.33`` on a 3x3 stem over one channel, whose 1-Lipschitz response to a [0, 1] patch is
    at most 1): a random offset of that size on every channel costs Fashion-MNIST networks about 3 points of
    clean accuracy at a short budget, and it is what separated lipnet's Björck networks from
    deel-torchlip's, which zero their biases. It changes no bound: a bias does not enter the Lipschitz
    constant.
    """
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        with torch.no_grad():
            bias.zero_()


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode under ``torch.no_grad`` for the block; every submodule's mode is restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def set_frozen_weights(out: _Layer, weight: Tensor, bias: Tensor | None) -> _Layer:
    """``out`` holding copies of ``weight``, in its memory layout (strides), and of ``bias``.

    The layout is kept because it selects the kernel: a dense residual block applies the transposed
    view ``step_weight().mT``, and ``F.linear`` with that view runs another BLAS product, with
    another summation order, than with a contiguous copy (1 float32 ulp apart on the blocks' outputs,
    measured). With the source's layout the copy repeats the source's operations bit for bit.
    """
    with torch.no_grad():
        # clone keeps the strides of a non-overlapping dense tensor (such as a transposed view)
        out.weight = nn.Parameter(weight.detach().clone())
        if bias is not None and out.bias is not None:
            out.bias.copy_(bias.detach())
    return out


def frozen_conv2d(layer: nn.Conv2d, weight: Tensor | None = None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` configured as ``layer`` (stride, padding and its mode, dilation, groups).

    It holds ``weight`` (default: the weight ``layer`` uses now, parametrized or not) and ``layer``'s
    bias, as :func:`set_frozen_weights` copies them.
    """
    kernel = layer.weight.detach() if weight is None else weight.detach()
    out = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,  # type: ignore[arg-type]
        layer.stride,  # type: ignore[arg-type]
        layer.padding,  # type: ignore[arg-type]
        layer.dilation,  # type: ignore[arg-type]
        layer.groups,
        layer.bias is not None,
        layer.padding_mode,
        device=kernel.device,
        dtype=kernel.dtype,
    )
    return set_frozen_weights(out, kernel, layer.bias)


def frozen_linear(layer: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` holding the weight ``layer`` uses now (parametrized or not) and its bias."""
    weight = layer.weight.detach()
    out = nn.Linear(
        layer.in_features,
        layer.out_features,
        layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    return set_frozen_weights(out, weight, layer.bias)


class BoundedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose kernel is constrained by a parametrization (AOL, Björck, linear residual).

    ``lipschitz_bound(input_shape=None)`` is ``certify.rules.conv.conv_operator_bound`` of the actual
    kernel for the layer as configured (padding and padding mode, stride, dilation, groups): a sound
    float64 bound for every input size, or for the given per-sample ``(C, H, W)``. The
    parametrization makes the layer 1-Lipschitz by construction (see each subclass); the bound
    checks it. The bias starts at zero (:func:`zero_bias`).
    """

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation, then a zero bias (:func:`zero_bias`)."""
        super().reset_parameters()
        zero_bias(self)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound of this convolution's operator norm, as configured, from its actual kernel."""
        return configured_conv_bound(self, input_shape)

    def export(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the same geometry holding the kernel this layer uses in eval mode."""
        with eval_mode(self):
            return frozen_conv2d(self)


class BoundedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is constrained by a parametrization (AOL, Björck, orthogonal).

    ``lipschitz_bound()`` is the float64 spectral norm of the weight the layer uses in its current
    mode (``certify.bounds.matrix_spectral_norm``, times ``1 + FLOAT64_SLACK``), never a constant.
    The bias starts at zero (:func:`zero_bias`).
    """

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, then a zero bias (:func:`zero_bias`)."""
        super().reset_parameters()
        zero_bias(self)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Float64 spectral norm of the current weight (times ``1 + FLOAT64_SLACK``)."""
        return matrix_spectral_norm(self.weight)

    def export(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the weight this layer uses in eval mode, and its bias."""
        with eval_mode(self):
            return frozen_linear(self)
