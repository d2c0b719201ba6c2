"""Sound float64 upper bounds of the L2 operator norm of convolutions and transposed convolutions.

On import this registers (:func:`certify.contract.register_bound`) bounds for the plain torch
modules ``nn.Conv1d``/``nn.Conv2d`` and ``nn.ConvTranspose1d``/``nn.ConvTranspose2d``. A subclass
that overrides ``forward`` or ``_conv_forward`` (deel-torchlip's ``PadConv2d`` for instance) is
refused with :class:`~certify.contract.UnboundableModuleError`, and a module with forward hooks
with a ``ValueError``: the map such a module computes is not the one bounded here.

Every value is an upper bound of the Lipschitz constant of the layer as configured, computed in
float64 on CPU from the actual weights and multiplied by ``1 + FLOAT64_SLACK``. Without an input
shape it holds for every input size; with one (per sample, ``(C, H, W)`` or ``(C, L)``) it holds
for that size and is usually tighter: exact when the dense matrix is small, and within 1e-8 of
exact for reflect, replicate and circular padding up to a work limit (item 7).

Convolutions (notation per spatial axis: kernel k, dilation d, stride s, padding (l, r), input
size n, padded size n_pad = n + l + r, span K = d (k - 1) + 1):

1. Polyphase. On the infinite grid ``y[t] = sum_j W_j x[t s + j d]`` (the padding offset is a
   shift, an isometry there). Writing ``j d = q s + r`` makes this the stride-1 convolution of the
   s phases ``x_r[m] = x[m s + r]`` (a permutation of the input) with a kernel of ``ceil(K / s)``
   taps and ``c_in s`` channels: its norm equals, and is not merely bounded by, the norm of that
   stride-1 convolution. With ``g = gcd(s, d)`` only every g-th pixel is read, so (s, d) may be
   replaced by (s / g, d / g); at stride 1 the dilation drops out (``K^(w) -> K^(d w)`` keeps the
   sup). Groups make the operator block diagonal: the norm is the max over groups.
2. Every input size, zero padding. The layer is ``R T E``: E embeds the padded input in Z^nd
   (isometry), T is the convolution there, R keeps the output coordinates, so
   ``||layer|| <= ||T|| = sup_w sigma_max(K(w))``, ``K(w) = sum_q W'_q exp(-i <q, w>)`` the
   c_out x c_in' symbol. The sup over the continuous torus is certified by branch and bound
   (:func:`certify.rules.conv_symbol.continuum_sup`; the proof is in that module's docstring).
3. Known size, zero padding: put the padded input, rounded up to a multiple of s, on a circle of
   ``L = ceil(n_pad / s)`` phase samples; no window wraps, so the layer is ``R C_L E`` with C_L a
   circular convolution whose norm is exactly the max over the L-point DFT grid of sigma_max
   (Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019).
4. Circular padding with ``l + r = K - 1`` on every axis is the circular convolution ``S_s C_n``
   (up to a circular shift of the input): for s | n its norm is exactly the max over the
   (n / s)-point grid of the polyphase symbol, otherwise at most ``||C_n||`` (stride 1).
5. Other padding: the layer is ``conv_valid(P x)`` where P copies input pixel i ``m_i`` times
   (``P^T P = diag(m)``), so ``||layer|| <= ||conv_valid|| sqrt(max_i m_i)``, m a product over
   axes, counted exactly for a known size. Worst case over all sizes per axis: circular and
   reflect ``1 + [l > 0] + [r > 0]``, replicate ``1 + l + r`` (an input of size 1).
6. Known size with a small dense matrix (``in_dim * out_dim <= _DENSE_ENTRIES``): the exact norm
   from :mod:`certify.exact`; this is what makes reflect / replicate / extra circular padding tight.
   A pointwise convolution (every span 1, zero or no padding) is exact without it: each output
   pixel reads one distinct input pixel or a zero pad, so the norm is the largest ``||W_g||``
   (0 when every output pixel reads a pad).
7. Known size, larger, with reflect, replicate or circular padding (where items 4 and 5 give a
   product of norms, up to ``sqrt(copies)`` loose: 2.0 for a norm of 4/3): the norm certified
   within about 1e-8 through the banded Gram matrix on the cheaper side, per group
   (:func:`certify.rules.conv_gram.banded_gram_norm`: Lanczos estimate, then a block Cholesky
   factorisation of ``nu I - G`` with its rounding bounded), when its cost is at most
   ``_GRAM_WORK``; else item 4 or 5. Zero padding keeps item 3, which the Gram matrix would
   improve little at a much higher cost.

Transposed convolutions: ``conv_transpose(stride s, padding p, output_padding q)`` on an input of
spatial size ``m`` is exactly the adjoint of ``conv(stride s, padding p)`` (zero padding) on inputs
of size ``n = (m - 1) s - 2p + d (k - 1) + q + 1``, with the same weight read as a convolution
kernel; an operator and its adjoint have the same norm (:func:`transposed_conv_bound`).

Proofs: ``docs/proofs/convolutions.md`` (``#lemma-polyphase``, ``#lemma-padding-copies``,
``#lemma-pointwise-conv``, ``#lemma-transposed-conv``), ``docs/proofs/frequency-bounds.md``
(``#lemma-zero-padding``, ``#lemma-circular-padding``) and ``docs/proofs/numerics.md#lemma-conv-gram``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import (
    Shape,
    UnboundableModuleError,
    finite_float64,
    matrix_spectral_norm,
    register_bound,
    require_plain,
)
from certify.exact import dense_operator_norm
from certify.rules.conv_gram import banded_gram_norm, gram_work, padding_copies
from certify.rules.conv_symbol import continuum_sup, dilate, infinite_grid_kernel, polyphase, symbol_bound
from certify.rules.shapes import per_axis, positive

__all__ = ["configured_conv_bound", "conv_module_bound", "conv_operator_bound", "transposed_conv_bound"]

#: Dense exact norm when the matrix has at most this many entries and its smaller side at most
#: _DENSE_SIDE (the Gram eigenproblem is cubic in that side).
_DENSE_ENTRIES = 1 << 22
_DENSE_SIDE = 1024
#: The banded Gram certificate (item 7) is used for reflect, replicate and circular padding when its
#: factorisation costs at most this much (certify.rules.conv_gram.gram_work, summed over groups): a
#: 16-channel 3x3 convolution on 32x32 inputs (1.7e10, about 8 s of one core) fits, a 32-channel
#: one (1.4e11) does not.
_GRAM_WORK = 2 * 10**10


# ---------------------------------------------------------------------------------------------
# Geometry: padding, groups


@dataclass(frozen=True)
class _Geometry:
    """How a convolution is configured, per spatial axis."""

    kernel: Shape
    stride: Shape
    dilation: Shape
    pads: tuple[tuple[int, int], ...]
    mode: str

    @property
    def spans(self) -> Shape:
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))

    @property
    def padded(self) -> bool:
        return any(left or right for left, right in self.pads)

    @property
    def full_circular(self) -> bool:
        """Circular padding of ``span - 1`` on every axis: the circular convolution itself."""
        pairs = zip(self.pads, self.spans, strict=True)
        return self.mode == "circular" and all(left + right == span - 1 for (left, right), span in pairs)


def _resolve_pads(
    padding: str | int | Sequence[int], kernel: Shape, dilation: Shape, stride: Shape
) -> tuple[tuple[int, int], ...]:
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions (torch refuses it too)"
                )
            # torch puts the odd extra pixel of 'same' padding on the right (end) side.
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    pads = per_axis(padding, nd, "padding")
    if any(p < 0 for p in pads):
        raise ValueError(f"padding must be >= 0, got {pads}")
    return tuple((p, p) for p in pads)


def _grouped(weight: Tensor, groups: int) -> Tensor:
    """``(out, in/g, *k)`` -> ``(g, out/g, in/g, *k)``: one block of the block-diagonal operator per group."""
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide out_channels={weight.shape[0]}")
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


# ---------------------------------------------------------------------------------------------
# Convolutions


def _conv_map(weight: Tensor, geo: _Geometry, groups: int) -> Callable[[Tensor], Tensor]:
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    flat = [p for pair in reversed(geo.pads) for p in pair]
    pad_mode = "constant" if geo.mode == "zeros" else geo.mode

    def apply(x: Tensor) -> Tensor:
        if any(flat):
            x = F.pad(x, flat, mode=pad_mode)
        return conv(x, weight, None, geo.stride, 0, geo.dilation, groups)

    return apply


def _worst_copies(pads: tuple[int, int], mode: str) -> int:
    """Max of :func:`certify.rules.conv_gram.padding_copies` over every size.

    Each pad side copies a pixel at most once for circular and reflect padding; replicate copies
    the single pixel of a size-1 input into all ``l + r`` pads.
    """
    left, right = pads
    if mode == "replicate":
        return 1 + left + right
    return 1 + int(left > 0) + int(right > 0)


def _all_sizes_bound(kernel: Tensor, geo: _Geometry) -> float:
    infinite = continuum_sup(infinite_grid_kernel(kernel, geo.stride, geo.dilation))
    if not geo.padded or geo.mode == "zeros":
        return infinite
    product = infinite * math.sqrt(math.prod(_worst_copies(p, geo.mode) for p in geo.pads))
    if not geo.full_circular:
        return product
    if all(s == 1 for s in geo.stride):
        return infinite
    # ||S_s C_n|| <= ||C_n||: the stride-1 circular convolution, for sizes the stride does not divide.
    return min(continuum_sup(infinite_grid_kernel(kernel, (1,) * len(geo.stride), geo.dilation)), product)


def _zero_padded_sized(kernel: Tensor, geo: _Geometry, padded: Shape) -> float:
    """Bound of the zero-padded convolution whose padded input has size ``padded`` (item 3)."""
    grid = tuple(-(-n // s) for n, s in zip(padded, geo.stride, strict=True))
    phases = polyphase(dilate(kernel, geo.dilation), geo.stride)
    return symbol_bound(phases, grid, infinite_grid_kernel(kernel, geo.stride, geo.dilation))


def _banded_exact(kernel: Tensor, geo: _Geometry, input_shape: Shape) -> float | None:
    """Item 7: the certified norm from the banded Gram matrix (max over groups), or None past its cost."""
    sizes = input_shape[1:]
    work = kernel.shape[0] * gram_work(kernel[0], geo.stride, geo.dilation, geo.pads, geo.mode, sizes)
    if work > _GRAM_WORK:
        return None
    values = [
        banded_gram_norm(
            block,
            stride=geo.stride,
            dilation=geo.dilation,
            pads=geo.pads,
            mode=geo.mode,
            input_shape=(block.shape[1], *sizes),
            max_work=_GRAM_WORK,
        )
        for block in kernel
    ]
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


def _sized_bound(weight: Tensor, kernel: Tensor, geo: _Geometry, groups: int, input_shape: Shape) -> float:
    spatial = input_shape[1:]
    padded = tuple(n + left + right for n, (left, right) in zip(spatial, geo.pads, strict=True))
    if any(n < k for n, k in zip(padded, geo.spans, strict=True)):
        raise ValueError(
            f"input of spatial size {spatial} is smaller than the convolution's span {geo.spans}"
        )
    for n, (left, right) in zip(spatial, geo.pads, strict=True):
        if geo.mode == "reflect" and max(left, right) >= n:
            raise ValueError(f"reflect padding {(left, right)} needs inputs larger than it, got size {n}")
        if geo.mode == "circular" and max(left, right) > n:
            raise ValueError(f"circular padding {(left, right)} cannot exceed the input size {n}")
    out = tuple((n - k) // s + 1 for n, k, s in zip(padded, geo.spans, geo.stride, strict=True))
    if all(k == 1 for k in geo.spans) and (not geo.padded or geo.mode == "zeros"):
        reads = all(
            any(left <= o * s < left + n for o in range(m))
            for n, (left, _), s, m in zip(spatial, geo.pads, geo.stride, out, strict=True)
        )
        return max(matrix_spectral_norm(block) for block in kernel) if reads else 0.0
    in_dim = math.prod(input_shape)
    out_dim = weight.shape[0] * math.prod(out)
    if in_dim * out_dim <= _DENSE_ENTRIES and min(in_dim, out_dim) <= _DENSE_SIDE:
        return dense_operator_norm(_conv_map(weight, geo, groups), input_shape)
    if not geo.padded or geo.mode == "zeros":
        return _zero_padded_sized(kernel, geo, padded)
    dilated = dilate(kernel, geo.dilation)
    if geo.full_circular and all(n % s == 0 for n, s in zip(spatial, geo.stride, strict=True)):
        grid = tuple(n // s for n, s in zip(spatial, geo.stride, strict=True))
        infinite = infinite_grid_kernel(kernel, geo.stride, geo.dilation)
        return symbol_bound(polyphase(dilated, geo.stride), grid, infinite)
    exact = _banded_exact(kernel, geo, input_shape)
    if exact is not None:
        return exact
    copies = math.prod(padding_copies(n, p, geo.mode) for n, p in zip(spatial, geo.pads, strict=True))
    product = _zero_padded_sized(kernel, geo, padded) * math.sqrt(copies)
    if geo.full_circular:
        stride_one = infinite_grid_kernel(kernel, (1,) * len(spatial), geo.dilation)
        return min(symbol_bound(dilated, spatial, stride_one), product)
    return product


def conv_operator_bound(
    weight: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    input_shape: Sequence[int] | None = None,
) -> float:
    """Sound float64 upper bound of the L2 operator norm of a 1-D or 2-D convolution (no bias).

    ``weight`` is ``(out, in / groups, k)`` (Conv1d) or ``(out, in / groups, kh, kw)`` (Conv2d);
    the other arguments mean what they mean for ``nn.Conv1d`` / ``nn.Conv2d`` (padding an int, a
    tuple, ``"same"`` or ``"valid"``; ``padding_mode`` one of zeros, reflect, replicate, circular).
    Without ``input_shape`` the bound holds for every input size; with it (per sample, ``(C, L)``
    or ``(C, H, W)``) for that size, exact when the dense matrix is small. The methods and their
    proofs are in the module docstring.
    """
    if weight.ndim not in (3, 4):
        raise ValueError(
            f"weight must be (out, in/groups, k) or (out, in/groups, kh, kw), got {tuple(weight.shape)}"
        )
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
    nd = weight.ndim - 2
    w = finite_float64(weight, "convolution weight")
    kernel_size = tuple(w.shape[2:])
    stride_t = positive(per_axis(stride, nd, "stride"), "stride")
    dilation_t = positive(per_axis(dilation, nd, "dilation"), "dilation")
    geo = _Geometry(
        kernel=kernel_size,
        stride=stride_t,
        dilation=dilation_t,
        pads=_resolve_pads(padding, kernel_size, dilation_t, stride_t),
        mode=padding_mode,
    )
    kernel = _grouped(w, groups)
    if input_shape is None:
        return _all_sizes_bound(kernel, geo)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != nd + 1 or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must be (channels, {', '.join(['size'] * nd)}) per sample, got {input_shape!r}"
        )
    if shape[0] != w.shape[1] * groups:
        raise ValueError(
            f"input_shape has {shape[0]} channels but the convolution expects {w.shape[1] * groups}"
        )
    return _sized_bound(w, kernel, geo, groups, shape)


def conv_module_bound(conv: nn.Module, input_shape: Sequence[int] | None = None) -> float:
    """Sound bound of the Lipschitz constant of a plain ``nn.Conv1d`` / ``nn.Conv2d`` as configured.

    The bias does not change the Lipschitz constant. Parametrized weights
    (``torch.nn.utils.parametrize``) are evaluated; a subclass that overrides ``forward`` or
    ``_conv_forward`` is refused, and so is any other module. See :func:`conv_operator_bound`.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        raise UnboundableModuleError(conv)
    require_plain(conv, nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d)
    return configured_conv_bound(conv, input_shape)


def configured_conv_bound(conv: nn.Conv1d | nn.Conv2d, input_shape: Sequence[int] | None = None) -> float:
    """:func:`conv_operator_bound` of ``conv.weight`` with ``conv``'s stride, padding, dilation, groups
    and padding mode.

    Unlike :func:`conv_module_bound` it does not check that ``conv`` computes ``nn.Conv``'s
    forward: it is for callers that know it does (the library's own parametrized convolutions,
    whose forward hooks a user may add) or that bound the rest of the computation themselves.
    """
    return conv_operator_bound(
        conv.weight,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        padding_mode=conv.padding_mode,
        input_shape=input_shape,
    )


def transposed_conv_bound(module: nn.Module, input_shape: Shape | None) -> float:
    """``ConvTranspose{1,2}d``: the norm of the convolution it is the adjoint of (module docstring).

    ``conv_transpose(stride s, padding p, output_padding q)`` on an input of spatial size ``m``
    produces size ``n = (m - 1) s - 2p + d (k - 1) + q + 1`` and is exactly the adjoint of
    ``conv(stride s, padding p)`` (zero padding) on inputs of size ``n`` (``q < s`` makes the
    forward convolution of size ``n`` return size ``m``), with the same weight tensor read as a
    convolution kernel ``(C_in_T, C_out_T / groups, k...)``. An operator and its adjoint have the
    same norm, so the bound of that convolution applies.
    """
    if not isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        raise UnboundableModuleError(module)
    if module.padding_mode != "zeros":
        raise ValueError(f"{type(module).__name__} only supports zero padding, got {module.padding_mode!r}")
    # ConvTranspose takes int or tuple padding only (never a string like Conv's "same").
    padding = cast(tuple[int, ...], module.padding)
    conv_shape: Shape | None = None
    if input_shape is not None:
        spatial = input_shape[1:]
        sizes = []
        for i, m in enumerate(spatial):
            k = module.kernel_size[i]
            n = (
                (m - 1) * module.stride[i]
                - 2 * padding[i]
                + module.dilation[i] * (k - 1)
                + module.output_padding[i]
                + 1
            )
            sizes.append(n)
        conv_shape = (module.out_channels, *sizes)
    return conv_operator_bound(
        module.weight,
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode="zeros",
        input_shape=conv_shape,
    )


for _conv in (nn.Conv1d, nn.Conv2d):
    register_bound(_conv, conv_module_bound)
for _transposed in (nn.ConvTranspose1d, nn.ConvTranspose2d):
    register_bound(_transposed, transposed_conv_bound)
