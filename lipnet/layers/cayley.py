"""Exactly orthogonal convolutions by the Cayley transform in the Fourier domain.

Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021.
A circular convolution on an ``h x w`` grid is block diagonalised by the 2-D DFT: it multiplies
the DFT of the input at each frequency ``f`` by the ``c_out x c_in`` matrix ``W(f)``, the DFT of
the kernel, and its singular values are those of the ``W(f)`` over all frequencies (Sedghi,
Gupta & Long, ICLR 2019). Replacing each ``W(f)`` by a matrix with orthonormal columns (or rows)
therefore gives an orthogonal (or semi-orthogonal) convolution.

Generalised Cayley transform (derived here for ``p x q`` matrices, ``p >= q``). Write
``W = [U; V]`` with ``U`` the top ``q x q`` block, and let ``A = U - U^H + V^H V``, so that
``A + A^H = 2 V^H V`` is positive semi-definite and ``I + A`` is invertible. Then

    Q = [(I - A)(I + A)^(-1); -2 V (I + A)^(-1)]

satisfies ``Q^H Q = (I + A)^(-H) [(I - A)^H (I - A) + 4 V^H V] (I + A)^(-1) = I`` because
``(I - A)^H (I - A) + 4 V^H V = I + A^H A + (A + A^H) = (I + A)^H (I + A)``. For square ``W`` this
is the classical Cayley transform of the skew-Hermitian ``U - U^H``; for ``p < q`` the transform
of ``W^H`` is conjugate-transposed, giving orthonormal rows. ``Q`` is obtained by one linear solve
per frequency (never an explicit inverse). A real kernel has ``W(-f) = conj(W(f))``, and the
transform commutes with conjugation, so only the half spectrum of ``rfft2`` is transformed and the
result is the spectrum of a real operator.

:class:`FourierConv2d` is the frozen form of :class:`CayleyConv2d` (``export()``): the frequency
matrices applied by FFT. Torch has no plain layer that computes it exactly and fast: as an
``nn.Conv2d`` with circular padding the kernel covers the whole image, which measured (batch 32,
one thread, the ``lipconvnet_xs`` grids 32, 16, 8, 4 and 2 with 16 to 256 channels) 1.5 to 47 times
slower than the FFT and up to 2.6e-5 away from it in float32 (accumulation over 33 x 33 taps).

Proofs: ``docs/proofs/convolutions.md#lemma-cayley`` and ``#lemma-fourier-conv``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.contract import FLOAT64_SLACK
from lipnet.layers.base import InputSizeUnknownError, eval_mode
from lipnet.layers.parametrization import CachedParametrization
from lipnet.layers.types import Device, Size2

__all__ = ["CayleyConv2d", "FourierConv2d", "cayley_transform", "fourier_conv2d", "frequency_matrices_bound"]


def _pair(value: Size2, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair[0], pair[1]


def cayley_transform(matrices: Tensor) -> Tensor:
    """Generalised Cayley transform of each complex matrix of a batch ``(..., p, q)``; differentiable.

    Returns ``Q`` of the same shape with orthonormal columns when ``p >= q`` and orthonormal rows
    otherwise (exactly, up to rounding); see the module docstring for the formula and its proof.
    """
    if matrices.shape[-2] < matrices.shape[-1]:
        return cayley_transform(matrices.mH).mH
    q = matrices.shape[-1]
    top, rest = matrices[..., :q, :], matrices[..., q:, :]
    a = top - top.mH + rest.mH @ rest
    eye = torch.eye(q, dtype=matrices.dtype, device=matrices.device)
    rhs = torch.cat((eye - a, -2.0 * rest), dim=-2)
    # X (I + A) = rhs: both blocks share one factorisation of I + A.
    if matrices.device.type == "cpu" and torch.get_num_threads() > 1 and q >= 128:
        # torch's batched CPU LU returns wrong factors with several threads at this size
        # (pytorch/pytorch#142815): solve one matrix at a time there.
        lhs = (eye + a).reshape(-1, q, q)
        flat = rhs.reshape(-1, *rhs.shape[-2:])
        solved = [torch.linalg.solve(m, r, left=False) for m, r in zip(lhs, flat, strict=True)]
        return torch.stack(solved).reshape(rhs.shape)
    return torch.linalg.solve(eye + a, rhs, left=False)


def _wrap(weight: Tensor, n: int, dim: int) -> Tensor:
    """The ``n x k`` 0/1 matrix that sends tap ``t`` of axis ``dim`` to pixel ``(t - k // 2) mod n``."""
    k = weight.shape[dim]
    taps = torch.arange(k, device=weight.device)
    out = torch.zeros(n, k, dtype=weight.dtype, device=weight.device)
    out[(taps - k // 2) % n, taps] = 1.0
    return out


def _frequency_matrices(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """``(h, w // 2 + 1, c_out, c_in)``: the Cayley transform of the kernel's DFT on an ``h x w`` grid."""
    h, w = size
    # Tap t goes to pixel (t - k // 2) mod n: centred on pixel 0, the layer is a 'same' convolution
    # (no spatial shift), and taps beyond a small grid alias as they do in a circular convolution.
    wrapped = torch.einsum("ocab,ia,jb->ocij", weight, _wrap(weight, h, -2), _wrap(weight, w, -1))
    q = cayley_transform(torch.fft.rfft2(wrapped).permute(2, 3, 0, 1))
    # irfft2 reads columns 0 and w/2 of the half spectrum as conjugate-symmetric along the first
    # axis; rounding breaks that symmetry slightly, so it is restored exactly: the layer is then
    # the circular convolution whose symbol is this Q, and its singular values are Q's.
    cols = [0] + ([w // 2] if w % 2 == 0 and w > 1 else [])
    index = torch.tensor(cols, device=q.device)
    mirror = (-torch.arange(h, device=q.device)) % h
    selected = q.index_select(1, index)
    return q.index_copy(1, index, 0.5 * (selected + selected[mirror].conj()))


def fourier_conv2d(x: Tensor, q: Tensor) -> Tensor:
    """The circular convolution of ``x`` ``(N, c_in, h, w)`` whose DFT symbol is ``q``.

    ``q`` has shape ``(h, w // 2 + 1, c_out, c_in)``; the result is ``irfft2(Q(f) rfft2(x)(f))``, one
    ``c_out x c_in`` by ``c_in x N`` product per frequency of the half spectrum: the forward pass of
    :class:`CayleyConv2d` (after any space-to-depth step).
    """
    h, w2 = q.shape[:2]
    # frequencies flattened in front, so that one batched product covers them all
    spectrum = torch.fft.rfft2(x).flatten(2).permute(2, 1, 0)
    product = (q.flatten(0, 1) @ spectrum).permute(2, 1, 0).reshape(x.shape[0], -1, h, w2)
    return torch.fft.irfft2(product, s=x.shape[-2:])


def frequency_matrices_bound(q: Tensor) -> float:
    """Sound float64 bound of ``max_f sigma_max(Q(f))``: the norm of the circular convolution of symbol ``q``.

    The matrices are converted to complex128; the largest eigenvalue of each Gram matrix (smaller
    side) is computed in float64 and the result multiplied by ``1 + FLOAT64_SLACK``. It bounds the
    operator :func:`fourier_conv2d` applies for any ``q``: by Parseval each frequency's output is
    ``Q(f)`` times its input, and on the columns ``0`` and ``w / 2``, which ``irfft2`` reads as
    conjugate-symmetric, a ``q`` that is not (rounding) is projected orthogonally onto such columns,
    a contraction. For a symmetric ``q`` (:func:`_frequency_matrices` makes it so) it is the norm.
    """
    q64 = q.detach().to(device="cpu", dtype=torch.complex128)
    if not torch.isfinite(torch.view_as_real(q64)).all():
        raise ValueError("the frequency matrices contain NaN or Inf: no Lipschitz bound exists")
    gram = q64.mH @ q64 if q64.shape[-1] <= q64.shape[-2] else q64 @ q64.mH
    top = torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0.0).item()
    return math.sqrt(top) * (1.0 + FLOAT64_SLACK)


class _CayleySpectrum(CachedParametrization):
    """The frequency matrices of the layer for its grid size, cached in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.size: tuple[int, int] | None = None

    def compute(self, original: Tensor) -> Tensor:
        if self.size is None:
            raise RuntimeError("the spatial size of the Cayley layer is not known yet")
        return _frequency_matrices(original, self.size)


class CayleyConv2d(nn.Module):
    """Orthogonal convolution under circular padding by the Cayley transform (Trockman & Kolter 2021).

    ``y = irfft2(Q(f) rfft2(x)(f)) + bias`` with ``Q(f)`` the generalised Cayley transform (module
    docstring) of the DFT of a raw ``c_out x c_in' x k_h x k_w`` kernel on the input grid, so the
    layer is a circular convolution whose kernel covers the whole image (it is not a ``k x k``
    convolution: ``k`` only sets the number of raw parameters). Guarantee: with ``c_in' = in_channels
    * stride^2``, the linear part is orthogonal when ``out_channels == c_in'``, an isometry
    (norm-preserving, orthonormal columns) when ``out_channels > c_in'``, and a co-isometry
    (orthonormal rows, ``A A^T = I``, 1-Lipschitz) when ``out_channels < c_in'``.

    Stride ``s > 1`` is native striding as in the paper: an invertible space-to-depth
    downsampling (``pixel_unshuffle``, a permutation) to ``in_channels * s^2`` channels on an
    ``h / s x w / s`` grid, then the stride-1 Cayley convolution on that grid.

    The frequency matrices depend on the spatial size. It is given as ``input_size`` (``(h, w)`` of
    the layer's input, before any striding) or fixed by the first forward pass; it is kept in the
    ``input_size`` buffer (``(0, 0)`` while unknown, so it survives a state_dict round trip) and an
    input of another size is refused. In eval mode the frequency matrices are cached until the raw
    kernel changes, so an eval forward costs two FFTs and one batched complex matrix product.
    """

    input_size: Tensor  # buffer: (h, w) of the input, (0, 0) while unknown

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Size2,
        stride: int = 1,
        bias: bool = True,
        *,
        input_size: Size2 | None = None,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = stride
        fan_in = in_channels * stride * stride
        self.weight = nn.Parameter(
            torch.empty(out_channels, fan_in, *self.kernel_size, device=device, dtype=dtype)
        )
        # torch's default Conv2d initialisation, as in the paper's experiments.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self.register_buffer("input_size", torch.zeros(2, dtype=torch.long, device=device))
        self.spectrum = _CayleySpectrum()
        if input_size is not None:
            self._set_size(_pair(input_size, "input_size"))

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        h, w = size
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"CayleyConv2d with stride {self.stride} needs H and W divisible by it, got {size}"
            )
        return (h // self.stride, w // self.stride)

    def _known_size(self) -> tuple[int, int] | None:
        h, w = (int(v) for v in self.input_size.tolist())
        return (h, w) if h > 0 else None

    def _set_size(self, size: tuple[int, int]) -> None:
        grid = self._grid(size)
        with torch.no_grad():
            self.input_size.copy_(torch.tensor(size))
        self.spectrum.size = grid
        self.spectrum.clear_cache()

    def _check_size(self, size: tuple[int, int]) -> None:
        known = self._known_size()
        if known is None:
            self._set_size(size)
        elif known != size:
            raise ValueError(
                f"CayleyConv2d was built for {known[0]}x{known[1]} inputs, got {size[0]}x{size[1]}; its "
                "frequency matrices depend on the size (build one layer per size)"
            )
        elif self.spectrum.size != self._grid(known):
            # the size came in through load_state_dict
            self.spectrum.size = self._grid(known)
            self.spectrum.clear_cache()

    def frequency_matrices(self) -> Tensor:
        """The ``(h', w' // 2 + 1, c_out, c_in')`` complex matrices applied per frequency (cached in eval)."""
        known = self._known_size()
        if known is None:
            raise ValueError(
                "CayleyConv2d: the input size is unknown; pass input_size or run a forward first"
            )
        self._check_size(known)
        return self.spectrum(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CayleyConv2d expects (N, {self.in_channels}, H, W) inputs, got shape {tuple(x.shape)}"
            )
        self._check_size((x.shape[2], x.shape[3]))
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        y = fourier_conv2d(x, self.frequency_matrices())
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound: ``max_f sigma_max(Q(f))`` of the frequency matrices the layer applies.

        The matrices are those of the current mode (the eval cache, or the same deterministic
        computation as the training forward), bounded by :func:`frequency_matrices_bound`. It is 1
        up to the rounding of the Cayley transform in the layer's dtype. The bound is for the layer's
        input size (``input_shape``, per sample ``(C, H, W)``, must match it when both are known).
        """
        known = self._known_size()
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(shape) != 3 or shape[0] != self.in_channels:
                raise ValueError(f"input_shape must be ({self.in_channels}, H, W), got {input_shape!r}")
            size = (shape[1], shape[2])
            if known is not None and known != size:
                raise ValueError(f"CayleyConv2d was built for {known} inputs, input_shape has {size}")
        elif known is None:
            raise ValueError(
                "CayleyConv2d: input size unknown; pass input_shape, input_size, or run a forward first"
            )
        else:
            size = known
        with torch.no_grad():
            if known is None:
                q = _frequency_matrices(self.weight, self._grid(size))
            else:
                q = self.frequency_matrices()
        return frequency_matrices_bound(q)

    def export(self) -> FourierConv2d:
        """:class:`FourierConv2d` holding the frequency matrices this layer applies in eval mode and its bias.

        Raises :class:`~lipnet.layers.base.InputSizeUnknownError` while the input size is unknown
        (:func:`lipnet.export` then runs a forward pass when it knows the input shape).
        """
        size = self._known_size()
        if size is None:
            raise InputSizeUnknownError(
                "CayleyConv2d does not know its input size yet, so its frequency matrices cannot be frozen: "
                "build it with input_size, or run a forward"
            )
        with eval_mode(self):
            return FourierConv2d(self.frequency_matrices(), self.bias, self.stride, size)

    def extra_repr(self) -> str:
        known = self._known_size()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"bias={self.bias is not None}, input_size={known}"
        )


class FourierConv2d(nn.Module):
    """A circular convolution on a fixed grid, applied by FFT with fixed frequency matrices.

    ``y = irfft2(Q(f) rfft2(x')(f)) + bias`` with ``x' = pixel_unshuffle(x, stride)`` (the input
    itself at stride 1) and ``Q`` the ``(h', w' // 2 + 1, c_out, c_in')`` complex matrices on the
    ``h' x w'`` grid of ``x'`` (:func:`fourier_conv2d`), held as their real
    view ``(..., 2)`` in the buffer ``symbol`` so that ``.to(dtype)`` / ``.double()`` convert them.
    This is the frozen form of :class:`CayleyConv2d` (its ``export()``) (Trockman & Kolter, ICLR 2021), whose
    eval forward it reproduces operation for operation. Guarantee: none by construction; the
    Lipschitz constant is ``max_f sigma_max(Q(f))`` (the operator norm; Sedghi, Gupta & Long, ICLR
    2019), which ``lipschitz_bound`` computes from the buffer (1 up to rounding for an export of an
    orthogonal Cayley layer). Only inputs of ``input_size`` are accepted.
    """

    symbol: Tensor
    bias: Tensor | None

    def __init__(self, symbol: Tensor, bias: Tensor | None, stride: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = input_size
        if stride < 1 or h % stride or w % stride:
            raise ValueError(f"stride must be >= 1 and divide the input size {input_size}, got {stride}")
        grid = (h // stride, w // stride)
        if (
            not symbol.is_complex()
            or symbol.ndim != 4
            or tuple(symbol.shape[:2]) != (grid[0], grid[1] // 2 + 1)
        ):
            raise ValueError(
                f"symbol must be complex of shape ({grid[0]}, {grid[1] // 2 + 1}, c_out, c_in) for inputs "
                f"of size {input_size} at stride {stride}, got {symbol.dtype} {tuple(symbol.shape)}"
            )
        if symbol.shape[3] % (stride * stride):
            raise ValueError(f"the symbol's {symbol.shape[3]} input channels are not a multiple of stride^2")
        if bias is not None and tuple(bias.shape) != (symbol.shape[2],):
            raise ValueError(f"bias must have shape ({symbol.shape[2]},), got {tuple(bias.shape)}")
        self.in_channels = symbol.shape[3] // (stride * stride)
        self.out_channels = symbol.shape[2]
        self.stride = stride
        self.input_size = (h, w)
        self.register_buffer("symbol", torch.view_as_real(symbol.detach()).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"FourierConv2d expects (N, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}) "
                f"inputs, got shape {tuple(x.shape)}"
            )
        if self.stride > 1:
            x = F.pixel_unshuffle(x, self.stride)
        y = fourier_conv2d(x, torch.view_as_complex(self.symbol))
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max_f sigma_max(Q(f))`` of the buffer ``symbol``.

        Computed by :func:`frequency_matrices_bound`; ``input_shape`` (per
        sample), when given, must be the layer's ``(C, H, W)``.
        """
        if input_shape is not None and tuple(input_shape) != (self.in_channels, *self.input_size):
            raise ValueError(
                f"FourierConv2d takes inputs of shape {(self.in_channels, *self.input_size)}, "
                f"got input_shape={tuple(input_shape)}"
            )
        with torch.no_grad():
            return frequency_matrices_bound(torch.view_as_complex(self.symbol))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, input_size={self.input_size}, "
            f"bias={self.bias is not None}"
        )
