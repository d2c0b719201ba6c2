"""``lipnet.export(model)``: a copy of a trained model made of plain layers with frozen weights.

What becomes what (each new layer holds the values the source layer uses in eval mode, computed
once at export, so no parametrization, eval cache or weight rescaling is left to run):

* a parametrized ``nn.Conv2d`` / ``nn.Linear`` (Björck, AOL, orthogonal, linear-residual, ...) ->
  a plain ``nn.Conv2d`` / ``nn.Linear`` with the same stride, padding, padding mode, dilation and
  groups;
* :class:`~lipnet.layers.AOCConv2d` -> a plain ``nn.Conv2d`` holding its orthogonalised kernel;
* :class:`~lipnet.layers.SLLConv2d` / :class:`~lipnet.layers.CPLConv2d` (``x - W diag(s)
  relu(W^T x + b)``, ``s`` the per-unit step) -> :class:`PotentialStep` of a plain ``nn.Conv2d``
  holding the layer's kernel ``W^T`` and bias, and a plain ``nn.ConvTranspose2d`` holding the
  rescaled kernel ``diag(s) W^T`` (the layer's ``step_weight()``), which applies its adjoint; the
  dense :class:`~lipnet.layers.SLLLinear` / :class:`~lipnet.layers.CPLLinear` ->
  :class:`PotentialStep` of two plain ``nn.Linear``;
* :class:`~lipnet.layers.CayleyConv2d` -> :class:`FourierConv2d`, its frequency matrices applied
  by FFT. Torch has no plain layer that computes it exactly and fast: as an ``nn.Conv2d`` with
  circular padding the kernel covers the whole image, which measured (batch 32, one thread, the
  ``lipconvnet_xs`` grids 32, 16, 8, 4 and 2 with 16 to 256 channels) 1.5 to 47 times slower than
  the FFT and up to 2.6e-5 away from it in float32 (accumulation over 33 x 33 taps);
* a model with ``split_head()`` (:class:`~lipnet.models.lipconvnet.LipConvNet`, whose logits are
  the first rows of a square head selected by ``FirstChannels``) -> ``nn.Sequential`` of its body
  and its ``nn.Linear`` head, so that :func:`certify.radius.split_head` finds the same head in the
  copy and ``certify`` gives it the same last-layer certificate. The copy computes only the rows
  that produce logits, so its global bound can be below the model's (for AOL and Björck heads, the
  norm of those rows instead of that of the square matrix);
* :class:`~lipnet.models.sequential.LipschitzSequential` -> ``nn.Sequential``;
* everything else (activations, pooling, channel padding and selection, a module holding any of
  the above) is deep-copied, with its children converted.

Every layer of the copy is a plain torch module or has a ``lipschitz_bound`` computed from the
weights it holds, so :func:`certify.bounds.lipschitz_bound` bounds the copy from its own weights.
A subclass of one of the converted classes that redefines ``forward`` (or ``_conv_forward``)
computes something else than its base class and is copied unchanged rather than converted.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.bounds import FLOAT64_SLACK, matrix_spectral_norm
from certify.conv_norm import conv_operator_bound
from lipnet.layers import AOCConv2d, CayleyConv2d, CPLConv2d, CPLLinear, SLLConv2d, SLLLinear
from lipnet.layers.cayley import fourier_conv2d, frequency_matrices_bound
from lipnet.models.sequential import LipschitzSequential

__all__ = ["FourierConv2d", "PotentialStep", "export"]

_BEHAVIOUR = ("forward", "_conv_forward")
_Layer = TypeVar("_Layer", nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
#: Unit roundoff of float64.
_UNIT_ROUNDOFF = 2.0**-53


class FourierConv2d(nn.Module):
    """A circular convolution on a fixed grid, applied by FFT with fixed frequency matrices.

    ``y = irfft2(Q(f) rfft2(x')(f)) + bias`` with ``x' = pixel_unshuffle(x, stride)`` (the input
    itself at stride 1) and ``Q`` the ``(h', w' // 2 + 1, c_out, c_in')`` complex matrices on the
    ``h' x w'`` grid of ``x'`` (:func:`~lipnet.layers.cayley.fourier_conv2d`), held as their real
    view ``(..., 2)`` in the buffer ``symbol`` so that ``.to(dtype)`` / ``.double()`` convert them.
    This is the frozen form of :class:`~lipnet.layers.CayleyConv2d` (Trockman & Kolter, ICLR 2021), whose
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

        Computed by :func:`~lipnet.layers.cayley.frequency_matrices_bound`; ``input_shape`` (per
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


class PotentialStep(nn.Module):
    """Residual block ``y = x - outer(relu(inner(x)))`` with ``outer`` the rescaled adjoint of ``inner``.

    ``inner`` is ``x -> Q x + b`` (an ``nn.Linear``, or an ``nn.Conv2d`` with odd kernel, stride 1,
    zero 'same' padding), ``outer`` is ``z -> P^T z`` (an ``nn.Linear`` without bias holding
    ``P^T``, or an ``nn.ConvTranspose2d`` without bias and with the same geometry, the exact adjoint
    of the convolution with kernel ``P`` on inputs of the block's size), and ``steps`` ``s >= 0``
    (one per inner unit) with ``P = diag(s) Q + E``, ``E`` the rounding of the product. For
    ``E = 0`` this is the gradient step ``x - grad V(x)`` on the convex potential
    ``V(x) = sum_i s_i relu(q_i^T x + b_i)^2 / 2``: the frozen form of the SLL blocks (Araujo et
    al., ICLR 2023, ``s = 2 / (t + eps)``) and of the convex potential layers (Meunier et al., ICML
    2022, ``s = 2 / h^2``), whose eval forward it reproduces operation for operation.

    Guarantee: Lipschitz with constant at most ``max(1, a^2 - 1) + e q`` for ``a >= ||diag(s)^(1/2)
    Q||``, ``e >= ||E||``, ``q >= ||Q||``. Proof: ``relu(u) - relu(v) = S (u - v)`` with ``S``
    diagonal in ``[0, 1]``, so ``y - y' = (I - P^T S Q)(x - x')`` and ``P^T S Q = M^T S M + E^T S Q``
    with ``M = diag(s)^(1/2) Q`` (diagonal matrices commute); ``M^T S M`` has eigenvalues in
    ``[0, a^2]``, so ``I - M^T S M`` has norm at most ``max(1, a^2 - 1)``, and ``||E^T S Q|| <= e q``.
    For the blocks it comes from, ``a^2 <= 2`` (their theorems), so the block is 1-Lipschitz up to
    ``e q``, of the order of the float32 unit roundoff. Not orthogonal.
    """

    steps: Tensor

    def __init__(
        self, inner: nn.Linear | nn.Conv2d, outer: nn.Linear | nn.ConvTranspose2d, steps: Tensor
    ) -> None:
        super().__init__()
        m = inner.out_features if isinstance(inner, nn.Linear) else inner.out_channels
        if type(inner) is nn.Linear and type(outer) is nn.Linear:
            if (outer.in_features, outer.out_features) != (m, inner.in_features) or outer.bias is not None:
                raise ValueError(
                    f"outer must be nn.Linear({m}, {inner.in_features}, bias=False) for this inner layer, "
                    f"got {outer}"
                )
        elif type(inner) is nn.Conv2d and type(outer) is nn.ConvTranspose2d:
            same = tuple(k // 2 for k in inner.kernel_size)
            plain = dict(stride=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros", padding=same)
            if any(k % 2 == 0 for k in inner.kernel_size) or any(
                getattr(inner, key) != value for key, value in plain.items()
            ):
                raise ValueError(
                    f"inner must be an nn.Conv2d with odd kernel, stride 1, no dilation or groups and zero "
                    f"'same' padding, got {inner}"
                )
            if (
                any(getattr(outer, key) != value for key, value in plain.items())
                or outer.output_padding != (0, 0)
                or outer.kernel_size != inner.kernel_size
                or (outer.in_channels, outer.out_channels) != (m, inner.in_channels)
                or outer.bias is not None
            ):
                raise ValueError(
                    "outer must be the nn.ConvTranspose2d of inner's geometry from its output to its input "
                    f"channels, without bias, got {outer}"
                )
        else:
            raise TypeError(
                "PotentialStep takes (nn.Linear, nn.Linear) or (nn.Conv2d, nn.ConvTranspose2d), got "
                f"({type(inner).__name__}, {type(outer).__name__})"
            )
        if tuple(steps.shape) != (m,):
            raise ValueError(f"steps must have shape ({m},), one per inner unit, got {tuple(steps.shape)}")
        self.inner = inner
        self.outer = outer
        self.register_buffer("steps", steps.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x - self.outer(F.relu(self.inner(x)))

    def _operator_bound(self, weight: Tensor, input_shape: tuple[int, ...] | None, *, tight: bool) -> float:
        """Sound float64 bound of the norm of ``inner``'s linear map with ``weight`` in place of its own.

        Without ``input_shape`` and ``tight``, a convolution gets the cheap every-size bound
        ``sqrt(k_h k_w) ||K_r||_2`` (``K_r`` the reshaped ``c_out x c_in k_h k_w`` kernel: the symbol is
        ``K_r`` times a vector of ``k_h k_w`` unit phases) instead of ``conv_operator_bound``'s search.
        """
        if isinstance(self.inner, nn.Linear):
            return matrix_spectral_norm(weight)
        if input_shape is None and not tight:
            return math.sqrt(math.prod(self.inner.kernel_size)) * matrix_spectral_norm(weight)
        return conv_operator_bound(
            weight,
            stride=1,
            padding=self.inner.padding,
            dilation=1,
            groups=1,
            padding_mode="zeros",
            input_shape=input_shape,
        )

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound ``max(1, a^2 - 1) + e q`` of the class docstring, from the weights held.

        ``a``, ``e`` and ``q`` are operator-norm bounds (``conv_operator_bound`` for that input size;
        without ``input_shape``, for every size: ``conv_operator_bound`` for ``a``, the reshaped-kernel
        bound for the rounding term ``e q``; float64 SVD for dense blocks) of ``diag(s)^(1/2) Q``,
        ``E = P - diag(s) Q`` and ``Q``, computed in float64. Each entry of ``diag(s) Q``, of ``E``
        (one subtraction) and of ``diag(s)^(1/2) Q`` is within ``2 u`` (relative, ``u`` the float64
        unit roundoff) of the exact one (the product ``s_i Q_ij`` is even exact for float32
        weights), so ``2 u sqrt(k_h k_w)`` times their Frobenius norms (a bound of a convolution's
        norm by that of its reshaped kernel) is added to ``a`` and ``e``.
        """
        if isinstance(self.inner, nn.Linear):
            if input_shape is not None and tuple(input_shape) != (self.inner.in_features,):
                raise ValueError(
                    f"PotentialStep takes inputs of shape ({self.inner.in_features},), "
                    f"got {tuple(input_shape)}"
                )
            taps = 1
        else:
            if input_shape is not None and (
                len(input_shape) != 3 or input_shape[0] != self.inner.in_channels
            ):
                raise ValueError(
                    f"PotentialStep takes per-sample inputs (C, H, W) with C={self.inner.in_channels}, "
                    f"got {tuple(input_shape)}"
                )
            taps = math.prod(self.inner.kernel_size)
        with torch.no_grad():
            q_w = self.inner.weight.detach().to(device="cpu", dtype=torch.float64)
            p_w = self.outer.weight.detach().to(device="cpu", dtype=torch.float64)
            s = self.steps.detach().to(device="cpu", dtype=torch.float64)
            if isinstance(self.outer, nn.Linear):
                p_w = p_w.T
            tensors = (q_w, p_w, s)
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise ValueError("PotentialStep has NaN or Inf weights or steps: no Lipschitz bound exists")
            if bool((s < 0).any()):
                raise ValueError(
                    "PotentialStep has negative steps: the bound of its class docstring needs s >= 0"
                )
            shape = (-1, *(1,) * (q_w.ndim - 1))
            scaled = s.reshape(shape) * q_w
            m_w = s.sqrt().reshape(shape) * q_w
            rounding = 2.0 * _UNIT_ROUNDOFF * math.sqrt(taps)
            a = self._operator_bound(m_w, input_shape, tight=True) + rounding * float(m_w.norm())
            error = p_w - scaled
            e = self._operator_bound(error, input_shape, tight=False)
            e += rounding * float(scaled.norm() + error.norm())
            q = self._operator_bound(q_w, input_shape, tight=False)
        return (max(1.0, a * a - 1.0) + e * q) * (1.0 + FLOAT64_SLACK)

    def extra_repr(self) -> str:
        return "y = x - outer(relu(inner(x)))"


def _plain_behaviour(module: nn.Module, base: type[nn.Module], methods: tuple[str, ...] = _BEHAVIOUR) -> bool:
    """Whether ``module`` computes what ``base`` computes with the same weight: no class in between
    redefines one of ``methods`` (torch's generated ``Parametrized...`` class only adds properties)."""
    for klass in type(module).__mro__:
        if klass is base:
            return True
        if any(name in klass.__dict__ for name in methods):
            return False
    return False


def _filled(out: _Layer, weight: Tensor, bias: Tensor | None) -> _Layer:
    """``out`` holding copies of ``weight``, in its memory layout (strides), and of ``bias``.

    The layout is kept because it selects the kernel: a dense residual block applies the transposed
    view ``step_weight().mT``, and ``F.linear`` with that view runs another BLAS product, with
    another summation order, than with a contiguous copy (1 float32 ulp apart on the blocks' outputs,
    measured). With the source's layout the copy repeats the source's operations bit for bit.
    """
    with torch.no_grad():
        # clone keeps the strides of a non-overlapping dense tensor (such as a transposed view)
        out.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def _plain_conv(layer: nn.Conv2d, weight: Tensor) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` configured as ``layer``, holding ``weight`` and ``layer``'s bias."""
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
        device=weight.device,
        dtype=weight.dtype,
    )
    return _filled(out, weight, layer.bias)


def _plain_linear(layer: nn.Linear) -> nn.Linear:
    weight = layer.weight.detach()
    out = nn.Linear(
        layer.in_features,
        layer.out_features,
        layer.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    return _filled(out, weight, layer.bias)


def _potential_step(block: SLLConv2d | CPLConv2d | SLLLinear | CPLLinear) -> PotentialStep:
    weight, bias = block.weight.detach(), block.bias.detach()
    kw = {"device": weight.device, "dtype": weight.dtype}
    inner_units, features = weight.shape[:2]
    inner: nn.Linear | nn.Conv2d
    outer: nn.Linear | nn.ConvTranspose2d
    if weight.ndim == 2:
        inner = _filled(nn.Linear(features, inner_units, **kw), weight, bias)
        outer = _filled(nn.Linear(inner_units, features, bias=False, **kw), block.step_weight().mT, None)
    else:
        k, p = block.kernel_size, block.padding
        inner = _filled(nn.Conv2d(features, inner_units, k, padding=p, **kw), weight, bias)
        transposed = nn.ConvTranspose2d(inner_units, features, k, padding=p, bias=False, **kw)
        outer = _filled(transposed, block.step_weight(), None)
    return PotentialStep(inner, outer, block.step_sizes())


def _fourier(layer: CayleyConv2d, path: str) -> FourierConv2d:
    size = layer._known_size()
    if size is None:
        raise ValueError(
            f"CayleyConv2d at '{path}' does not know its input size yet, so its frequency matrices cannot be "
            "frozen: pass export(model, input_shape=(C, H, W)), build it with input_size, or run a forward"
        )
    return FourierConv2d(layer.frequency_matrices(), layer.bias, layer.stride, size)


def _convert(module: nn.Module, path: str) -> nn.Module:
    split = getattr(module, "split_head", None)
    parts = split() if callable(split) else None
    if parts is not None:
        # model(x) == head(body(x)) (the split_head contract); the copy is that composition
        body, head = parts
        layers = [*(body.children() if type(body) is nn.Sequential else [body]), head]
        return nn.Sequential(*(_convert(m, _child(path, str(i))) for i, m in enumerate(layers)))
    if isinstance(module, nn.Conv2d) and _plain_behaviour(module, nn.Conv2d):
        return _plain_conv(module, module.weight.detach())
    if isinstance(module, nn.Linear) and _plain_behaviour(module, nn.Linear):
        return _plain_linear(module)
    if (
        isinstance(module, AOCConv2d)
        and _plain_behaviour(module, AOCConv2d)
        and _plain_behaviour(module.conv, nn.Conv2d, ("_conv_forward",))
    ):
        # AOCConv2d applies its kernel through the wrapped layer's _conv_forward
        return _plain_conv(module.conv, module.kernel())
    if isinstance(module, CayleyConv2d) and _plain_behaviour(module, CayleyConv2d):
        return _fourier(module, path)
    for base in (SLLConv2d, CPLConv2d, SLLLinear, CPLLinear):
        if isinstance(module, base) and _plain_behaviour(module, base):
            return _potential_step(module)
    if isinstance(module, LipschitzSequential):
        # the family classes only add the product bound, which certify composes on its own
        children = module.named_children()
        return nn.Sequential(
            OrderedDict((name, _convert(child, _child(path, name))) for name, child in children)
        )
    for name, child in module.named_children():
        setattr(module, name, _convert(child, _child(path, name)))
    return module


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def export(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A deep copy of ``model`` in eval mode made of plain layers (see the module docstring).

    Each converted layer holds the values that ``model``'s layer uses in eval mode (computed once
    here, under ``torch.no_grad``), in the memory layout the layer passes them to its product (a
    dense residual block's transposed ``step_weight().mT`` included), so it repeats its source's
    operations and the copy's eval outputs equal ``model``'s bit for bit, except at a
    ``split_head`` head: the copy computes only the logit rows, another product whose float32
    rounding can differ (each logit of both stays within ``gamma_(n+1) (|W| |g| + |b|)`` of the
    exact one, ``n`` the head's input features; Higham 2002, section 3.1). ``model`` itself is not
    modified.

    ``input_shape`` (per sample, e.g. ``(3, 32, 32)``; default: ``model.input_shape`` when the model
    declares one, as lipnet's model families do) is used only when a
    :class:`~lipnet.layers.CayleyConv2d` has not seen an input yet: one forward pass of a zero batch
    through the copy fixes its size. Without it such a layer raises ``ValueError``.
    """
    copied = copy.deepcopy(model)
    copied.eval()
    with torch.no_grad():
        if any(isinstance(m, CayleyConv2d) and m._known_size() is None for m in copied.modules()):
            shape = input_shape if input_shape is not None else getattr(copied, "input_shape", None)
            if shape is not None:
                ref = next(iter(copied.parameters()))
                copied(torch.zeros((1, *shape), device=ref.device, dtype=ref.dtype))
        exported = _convert(copied, "")
    exported.eval()
    return exported
