"""1-Lipschitz convolutions: ``nn.Conv2d`` with a parametrized kernel.

``lipschitz_bound(input_shape=None)`` is ``certify.conv_norm.conv_operator_bound`` of the actual
kernel for the layer as configured (padding and padding mode, stride, dilation, groups): a sound
float64 bound for every input size, or for the given per-sample ``(C, H, W)``. The
parametrization makes the layer 1-Lipschitz by construction; the bound checks it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from certify.conv_norm import configured_conv_bound
from lipnet.layers.aol import AOLConvRescaling
from lipnet.layers.bjorck import BjorckOrthonormal
from lipnet.layers.rko import padding_sides, patch_multiplicity

__all__ = ["AOLConv2d", "BjorckConv2d"]

Device = torch.device | str | None
Size2 = int | tuple[int, int]
Padding = str | int | tuple[int, int]


class _BoundedConv2d(nn.Conv2d):
    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound of this convolution's operator norm, as configured, from its actual kernel."""
        return configured_conv_bound(self, input_shape)


class BjorckConv2d(_BoundedConv2d):
    """Reshaped-kernel orthogonal (RKO) convolution, scaled to be 1-Lipschitz as configured.

    The ``c_out x (c_in k_h k_w)`` reshaped kernel of each group is orthonormalised by Björck
    iterations (:class:`~lipnet.layers.bjorck.BjorckOrthonormal`, sound pre-scaling, float64
    convergence in eval) and multiplied by ``1 / sqrt(C)``, where ``C`` is the largest number of
    times the convolution reads one input pixel for this kernel size, stride, dilation, padding
    and padding mode (:func:`~lipnet.layers.rko.patch_multiplicity`; ``C = k_h k_w`` for stride 1
    with zero padding, ``ceil(k/s)^2`` for stride ``s``; more under reflect, replicate or
    circular padding). Then ``||conv(x)||^2 <= ||M||^2 C ||x||^2 <= ||x||^2``: the layer is
    1-Lipschitz (contractive, not orthogonal: RKO is norm-preserving only when stride equals
    the kernel size), the idea of deel-torchlip's ``SpectralConv2d`` and orthogonium's
    ``RKOConv2d``, with the scale derived for the actual padding mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Padding = 0,
        dilation: Size2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        multiplicity = patch_multiplicity(
            self.kernel_size, self.stride, self.dilation, self.padding, padding_mode
        )
        self.patch_multiplicity = multiplicity
        nn.init.orthogonal_(self.weight)
        parametrize.register_parametrization(
            self,
            "weight",
            BjorckOrthonormal(
                groups=groups,
                scale=1.0 / math.sqrt(multiplicity),
                train_iterations=train_iterations,
                order=order,
                eval_max_iterations=eval_max_iterations,
                eval_tol=eval_tol,
            ),
        )


class AOLConv2d(_BoundedConv2d):
    """Almost-orthogonal convolution (Prach & Lampert, ECCV 2022): 1-Lipschitz, no iteration.

    Each input channel of the kernel is multiplied by ``d_i = (sum_j sum_t |A_ij(t)|)^(-1/2)``,
    ``A`` the kernel's autocorrelation (:class:`~lipnet.layers.aol.AOLConvRescaling`). The theorem
    covers zero padding (any amount, any stride, dilation and groups) and circular padding that
    adds at most ``dilation * (k - 1)`` in total per dimension (no output beyond the input
    size); reflect and replicate padding read pixels twice and are refused. Initialised with an
    orthogonal centre tap and zeros elsewhere.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: Size2 = 1,
        padding: Padding = 0,
        dilation: Size2 = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(
                "AOLConv2d is 1-Lipschitz only with zero or circular padding, got "
                f"padding_mode={padding_mode!r}: reflect and replicate padding read border pixels twice"
            )
        if padding_mode == "circular":
            for dim in range(2):
                left, right = padding_sides(self.padding, self.kernel_size[dim], self.dilation[dim], dim)
                if left + right > self.dilation[dim] * (self.kernel_size[dim] - 1):
                    raise ValueError(
                        "AOLConv2d with circular padding needs total padding <= dilation * (kernel_size - 1)"
                        f" per dimension (otherwise outputs repeat), got padding={self.padding} in dimension"
                        f" {dim}"
                    )
        centre = torch.empty(self.weight.shape[:2], device=self.weight.device, dtype=self.weight.dtype)
        nn.init.orthogonal_(centre)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, self.kernel_size[0] // 2, self.kernel_size[1] // 2] = centre
        parametrize.register_parametrization(self, "weight", AOLConvRescaling(groups))
