"""Block convolution orthogonal parametrization (BCOP): an explicit orthogonal ``k x k`` kernel.

Li, Haghighi, Lee, Rajan & Grosse, "Preventing Gradient Attenuation in Lipschitz Constrained
Convolutional Networks", NeurIPS 2019 (the 2-tap factorisation of orthogonal convolutions of Kautsky
& Turcajová 1994, in Xiao et al.'s block-convolution form); orthogonium's AOC (Boissin et al. 2025)
builds its stride-1 kernels the same way. The kernel is a product of small factors, each a
contraction as a convolution on the infinite grid and orthogonal once its Björck iteration has
converged:

* a ``1 x 1`` factor ``Q = (I - 2 P_a)(I - 2 P_b)`` cropped to ``c_out x c_in``;
* ``k_h - 1`` vertical and ``k_w - 1`` horizontal 2-tap factors ``[P, I - P]``,

each ``P = U U^T`` with ``U`` the Björck orthonormalisation of a raw ``c x r`` matrix
(``c = max(c_in, c_out)``, ``r = max(1, c // 2)``). Composing a kernel ``K`` with a 2-tap factor
along one axis gives ``K'[a] = P K[a] + (I - P) K[a - 1]``, a kernel one tap longer; all ``2k``
raw matrices are orthonormalised in one batched call (a :class:`~lipnet.layers.bjorck.BjorckOrthonormal`
with one group per frame, which :func:`~lipnet.layers.batching.batch_weights` joins to the model's other
Björck weights), then the chains of taps are built as ``c x c`` matrices and the kernel in two products,
then one plain convolution.

Guarantee (``docs/proofs/convolutions.md#lemma-bcop``). On the infinite grid the layer's frequency
response is the product of the factors'; a 2-tap factor's is ``P + (I - P) e^{-i w}``, whose
singular values are ``|lambda + (1 - lambda) e^{-i w}| <= 1`` for the eigenvalues ``lambda`` of
``P`` in ``[0, 1]``, and ``I - 2P`` has eigenvalues in ``[-1, 1]``. So in both modes, whether or
not the iteration has converged, the layer is **1-Lipschitz** with zero padding (any padding
amount, stride and dilation: a crop of the infinite-grid convolution) and with circular padding.
With converged projectors (eval mode: float64 to ``||I - U^T U||_F <= 1e-12``), circular padding and
stride 1 it is **orthogonal** for ``c_in == c_out`` (an isometry for ``c_out > c_in``, orthonormal
rows for ``c_out < c_in``); with zero padding it loses the energy its taps send past the border.
Every ``SO(c)`` matrix is such a ``Q`` (``c`` even), so the ``1 x 1`` factor is not a restriction.
``lipschitz_bound()`` is ``certify``'s bound of the actual kernel as configured, never an assumed 1.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipnet.layers.base import BoundedConv2d, zero_bias
from lipnet.layers.bjorck import BjorckOrthonormal, bjorck_orthonormalize
from lipnet.layers.parametrization import CachedParametrization
from lipnet.layers.types import Device, Padding, PaddingMode, Size2

__all__ = ["BCOPConv2d", "BlockOrthogonalKernel", "bcop_kernel"]


def _two_tap_chain(projectors: Tensor, eye: Tensor) -> Tensor:
    """The ``n + 1`` taps of the 2-tap factors ``[P_j, I - P_j]``, ``j = 0 .. n - 1``, applied in order.

    ``projectors``: ``(..., n, c, c)``; returns ``(..., n + 1, c, c)`` (``[I]`` for ``n = 0``). Adding the
    factor ``[P, I - P]`` after taps ``T`` gives ``T'[a] = P T[a] + (I - P) T[a - 1] = T[a - 1] + P (T[a] -
    T[a - 1])`` (``T`` zero outside its taps), one batched product per factor.
    """
    n = projectors.shape[-3]
    if n == 0:
        return eye.expand(*projectors.shape[:-3], 1, *eye.shape)
    first = projectors[..., 0, :, :]
    taps = torch.stack([first, eye - first], dim=-3)
    for j in range(1, n):
        previous = F.pad(taps, (0, 0, 0, 0, 1, 0))  # T[a - 1]
        current = F.pad(taps, (0, 0, 0, 0, 0, 1))  # T[a]
        taps = previous + projectors[..., j : j + 1, :, :] @ (current - previous)
    return taps


def bcop_kernel(frames: Tensor, in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> Tensor:
    """The BCOP kernel ``(out_channels, in_channels, k_h, k_w)`` from orthonormalised frames.

    ``frames``: ``(2 + (k_h - 1) + (k_w - 1), c, r)`` matrices ``U_j`` (orthonormal columns when
    converged, singular values in ``[0, 1]`` in any case), ``c = max(in_channels, out_channels)``.
    ``P_j = U_j U_j^T``; the ``1 x 1`` factor is ``R = (I - 2 P_0)(I - 2 P_1)`` cropped to
    ``min(in, out)`` columns, then ``P_2 ...`` are the vertical and then the horizontal 2-tap factors
    (module docstring): all vertical factors, then all horizontal ones. (BCOP's own order alternates them,
    a vertical and a horizontal factor per 2 x 2 block, a larger family of kernels; on Fashion-MNIST at
    tau 0.5, 20,000 images x 3 epochs, it gave 75.28% clean / radius 1.213 against this order's 75.26 /
    1.218, so the cheaper chains stay.) With ``V`` and ``H`` the taps of the vertical and horizontal chains
    (:func:`_two_tap_chain`), the composition "``R``, then ``V``, then ``H``" has the kernel
    ``K[:, :, a, b] = H[b] V[a] R``: one product for ``V R`` and one for all ``(a, b)``. For
    ``out_channels < in_channels`` the kernel is built for the swapped channel counts and its channel
    axes are swapped (the adjoint up to a spatial flip, which keeps every singular value of the operator).
    """
    kh, kw = kernel_size
    c = frames.shape[1]
    projectors = frames @ frames.mT
    eye = torch.eye(c, dtype=frames.dtype, device=frames.device)
    rotation = (eye - 2 * projectors[0]) @ (eye - 2 * projectors[1])
    narrow = min(in_channels, out_channels)
    if kh == kw:  # both chains in one batch
        vertical, horizontal = _two_tap_chain(projectors[2:].unflatten(0, (2, kh - 1)), eye).unbind(0)
    else:
        vertical = _two_tap_chain(projectors[2 : 1 + kh], eye)
        horizontal = _two_tap_chain(projectors[1 + kh :], eye)
    columns = vertical @ rotation[:, :narrow]  # (kh, c, narrow): V[a] R
    # K[o, i, a, b] = sum_m H[b][o, m] (V[a] R)[m, i]: one (kw c x c) @ (c x kh narrow) product
    kernel = (horizontal.reshape(kw * c, c) @ columns.permute(1, 0, 2).reshape(c, kh * narrow)).reshape(
        kw, c, kh, narrow
    )
    kernel = kernel.permute(1, 3, 2, 0)
    if out_channels < in_channels:
        kernel = kernel.transpose(0, 1)
    return kernel.contiguous()


def _frame_stack(raw: Tensor, kernel_size: tuple[int, ...]) -> Tensor:
    """The ``(k_h + k_w) c x r`` raw weight (or its orthonormalisation) as ``k_h + k_w`` matrices ``c x r``
    (a view of a contiguous tensor)."""
    return raw.reshape(sum(kernel_size), -1, raw.shape[-1])


def _orthonormal_frames_(frames: Tensor) -> None:
    """Each ``(c, r)`` matrix of ``frames`` set to a random one with orthonormal columns, in place.

    The Björck iteration then starts converged and the initial kernel is orthogonal (circular padding).
    """
    with torch.no_grad():
        for frame in frames:
            nn.init.orthogonal_(frame)


class BlockOrthogonalKernel(CachedParametrization):
    """Parametrization ``kernel = bcop_kernel(frames)``: ``(k_h + k_w) c x r`` frames in, kernel out.

    The second of the two parametrizations of :class:`BCOPConv2d`'s weight: it receives the frames that the
    first, a :class:`~lipnet.layers.bjorck.BjorckOrthonormal` with one group per frame, has
    orthonormalised (in training, possibly batched with the model's other Björck weights by
    :func:`~lipnet.layers.batching.batch_weights`), and builds the kernel in their dtype. In eval mode
    the frames arrive converged in float64 but rounded to the layer's dtype: they are orthonormalised
    again in float64 (``eval_tol``, a step or two from there), the kernel is built in float64, cast and
    cached, so that its rounding is the cast's alone. Guarantee: see :mod:`lipnet.layers.bcop` (a
    contraction for any frames with singular values in ``[0, 1]``; orthogonal with circular padding for
    orthonormal frames).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        *,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.order = order
        self.eval_max_iterations = eval_max_iterations
        self.eval_tol = eval_tol

    def compute(self, original: Tensor) -> Tensor:
        frames = _frame_stack(original, self.kernel_size)
        if not self.training:
            frames = bjorck_orthonormalize(
                frames.to(torch.float64), self.eval_max_iterations, self.order, self.eval_tol
            )
        kernel = bcop_kernel(frames, self.in_channels, self.out_channels, self.kernel_size)
        return kernel.to(original.dtype)

    def extra_repr(self) -> str:
        sizes = f"in_channels={self.in_channels}, out_channels={self.out_channels}"
        return f"{sizes}, kernel_size={self.kernel_size}"


class BCOPConv2d(BoundedConv2d):
    """Convolution with a BCOP kernel (:mod:`lipnet.layers.bcop`): 1-Lipschitz, orthogonal when circular.

    The kernel is built from ``2 + (k_h - 1) + (k_w - 1)`` projectors ``P = U U^T`` of rank ``c // 2``
    (``c = max(in_channels, out_channels)``), each ``U`` the Björck orthonormalisation of a raw
    ``c x (c // 2)`` matrix (Li et al., NeurIPS 2019): a rotation ``(I - 2P_a)(I - 2P_b)`` cropped to
    ``out x in``, then the 2-tap factors ``[P, I - P]`` along each axis. Guarantee: 1-Lipschitz in both
    modes for zero or circular padding, any stride and dilation (whether or not the Björck iteration
    has converged); orthogonal (isometric for ``out > in``, co-isometric for ``out < in``) with
    circular padding and stride 1 once converged, which eval mode ensures (frames converged and the
    kernel built in float64, then cast and cached: :class:`BlockOrthogonalKernel`). Zero padding
    gives a 1-Lipschitz layer that is orthogonal away from the border. After training, the kernel
    is an ordinary ``nn.Conv2d`` kernel (``export()``), one plain convolution per forward pass, and
    ``lipschitz_bound()`` is ``certify``'s float64 bound of that kernel as configured. ``groups``
    must be 1; ``reflect`` / ``replicate`` padding is refused (it reads border pixels twice, so the
    layer would not be 1-Lipschitz).
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
        padding_mode: PaddingMode = "zeros",
        *,
        train_iterations: int = 3,
        order: int = 2,
        eval_max_iterations: int = 100,
        eval_tol: float = 1e-12,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(f"BCOPConv2d supports groups=1 only, got groups={groups}")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(
                f"BCOPConv2d takes padding_mode 'zeros' or 'circular', got {padding_mode!r}: reflect and "
                "replicate padding read border pixels twice, so the layer would not be 1-Lipschitz"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        kh, kw = self.kernel_size
        channels = max(in_channels, out_channels)
        rank = max(1, channels // 2)
        # The raw weight is the stack of frames, not a kernel: the second parametrization changes the shape.
        del self.weight
        self.weight = nn.Parameter(torch.empty((kh + kw) * channels, rank, device=device, dtype=dtype))
        _orthonormal_frames_(_frame_stack(self.weight, self.kernel_size))
        frames = BjorckOrthonormal(
            groups=kh + kw,
            train_iterations=train_iterations,
            order=order,
            eval_max_iterations=eval_max_iterations,
            eval_tol=eval_tol,
        )
        parametrize.register_parametrization(self, "weight", frames)
        kernel = BlockOrthogonalKernel(
            in_channels,
            out_channels,
            (kh, kw),
            order=order,
            eval_max_iterations=eval_max_iterations,
            eval_tol=eval_tol,
        )
        parametrize.register_parametrization(self, "weight", kernel, unsafe=True)

    def reset_parameters(self) -> None:
        """Orthonormal raw frames (once the parametrization is attached) and a zero bias."""
        if parametrize.is_parametrized(self, "weight"):
            _orthonormal_frames_(self.frames)
            zero_bias(self)
            return
        # nn.Conv2d.__init__ calls this before the raw frames exist: its kernel is replaced right after.
        super().reset_parameters()

    @property
    def frames(self) -> Tensor:
        """The raw frames as ``(k_h + k_w, c, r)`` matrices: a view of the trained parameter
        ``parametrizations.weight.original`` (``(k_h + k_w) c x r``)."""
        parametrizations = cast(nn.ModuleDict, self.parametrizations)
        return _frame_stack(cast(Tensor, parametrizations["weight"].original), self.kernel_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frames={tuple(self.frames.shape)}"
