"""Adaptive orthogonal convolution (AOC) through orthogonium, with an eval cache and a sound bound.

Boissin, Mamalet, Fel, Picard, Massena & Serrurier, "An Adaptive Orthogonal Convolution Scheme
for Efficient and Flexible CNN Architectures", 2025 (arXiv:2501.07930), implemented by the
``orthogonium`` package (optional extra ``bench``: ``pip install orthogonium``). AOC builds an
explicit ``k x k`` kernel (BCOP block convolutions, RKO for ``kernel_size == stride``, or both for
native striding) that is orthogonal as a circular convolution once its orthogonalisation has
converged. This module wraps ``orthogonium.layers.AdaptiveOrthoConv2d`` and adds what a
certified model needs:

* the kernel is computed once in eval mode and reused while the raw parameters are unchanged,
  so an eval forward is one plain convolution;
* ``padding_mode`` 'reflect' and 'replicate' are refused: they read border pixels twice, and
  orthogonium accepts them silently although the layer's norm is then far above 1;
* the orthogonaliser is pre-scaled by a sound bound of the spectral norm (Gram iteration,
  :func:`~lipnet.layers.bjorck.gram_norm_bound`) instead of orthogonium's default power
  iteration, a lower estimate that can leave singular values outside Björck's region of
  convergence and that changes the kernel on every evaluation;
* ``lipschitz_bound()`` is :func:`certify.rules.conv.conv_operator_bound` of the actual kernel as
  configured, never an assumed 1.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from certify.contract import redefines_behaviour
from certify.rules.conv import conv_operator_bound
from lipnet.layers.base import eval_mode, frozen_conv2d, zero_bias
from lipnet.layers.bjorck import gram_norm_bound

__all__ = ["AOC_BJORCK_ITERATIONS", "AOCConv2d", "GramPrescale"]

#: Björck steps of the default AOC orthogonaliser (orthogonium's default is 12, which leaves ill-conditioned
#: weights unconverged: smallest singular value 0.17 after 12 steps, 1.00 after 25, Gaussian 256x256).
AOC_BJORCK_ITERATIONS = 25

_Key = tuple[tuple[int, int, int, torch.device, torch.dtype], ...]


def _orthogonium(submodule: str) -> ModuleType:
    try:
        return importlib.import_module(f"orthogonium.{submodule}")
    except ImportError as err:
        raise ImportError(
            "AOCConv2d needs the optional package orthogonium: pip install orthogonium "
            "(or pip install 'lipnet[bench]')"
        ) from err


class GramPrescale(nn.Module):
    """Divides each matrix of a batch ``(..., m, n)`` by a sound upper bound of its spectral norm.

    The bound is ``sqrt(gram_norm_bound(G, steps))`` on the smaller Gram matrix ``G`` (Gram
    iteration, Delattre et al. ICML 2023), so every singular value of the result is at most 1 and
    the Björck iteration that follows converges. Deterministic: no state is updated. Used as
    orthogonium's ``spectral_normalizer`` (it receives the weight shape, which it does not need).
    """

    def __init__(self, weight_shape: tuple[int, ...] | None = None, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, w: Tensor) -> Tensor:
        gram = w @ w.mT if w.shape[-2] <= w.shape[-1] else w.mT @ w
        bound = gram_norm_bound(gram, self.steps).clamp_min(torch.finfo(w.dtype).tiny)
        return w / bound.sqrt()[..., None, None]

    def right_inverse(self, w: Tensor) -> Tensor:
        return w


class AOCConv2d(nn.Module):
    """orthogonium's ``AdaptiveOrthoConv2d`` as a cached, soundly bounded convolution.

    Guarantee: with circular padding the kernel is that of an orthogonal convolution up to the
    convergence of the Björck orthogonalisation (:data:`AOC_BJORCK_ITERATIONS` = 25 iterations, as in
    orthogonium's tests);
    with zero padding it is a compression of that operator (1-Lipschitz, not orthogonal at the
    borders). The actual constant is whatever ``lipschitz_bound()`` measures on the actual kernel.
    Arguments are those of ``nn.Conv2d`` (square kernel and stride, ``kernel_size >= stride``);
    ``ortho_params`` (an ``orthogonium.reparametrizers.OrthoParams``) replaces the default
    Gram-prescaled Björck orthogonalisation. The orthogonium layer is ``self.conv``; in eval mode
    its kernel is cached (see :class:`~lipnet.layers.parametrization.CachedParametrization` for
    when the cache is bypassed), so an eval forward is one ``conv2d``. The bias starts at zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "circular",
        *,
        ortho_params: Any = None,
    ) -> None:
        super().__init__()
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(
                f"AOCConv2d supports padding_mode 'circular' (orthogonal) or 'zeros' (1-Lipschitz), got "
                f"{padding_mode!r}: reflect and replicate padding read border pixels twice, which raises the "
                "norm far above 1 (orthogonium accepts them silently)"
            )
        for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AOCConv2d: {name} must be a positive int, got {value!r}")
        if kernel_size < stride:
            raise ValueError(f"AOCConv2d needs kernel_size >= stride, got {kernel_size} < {stride}")
        layers = _orthogonium("layers")
        if ortho_params is None:
            reparametrizers = _orthogonium("reparametrizers")
            classparam = _orthogonium("model_factory.classparam")
            ortho_params = reparametrizers.OrthoParams(
                spectral_normalizer=GramPrescale,
                orthogonalizer=classparam.ClassParam(
                    reparametrizers.BatchedBjorckOrthogonalization, beta=0.5, niters=AOC_BJORCK_ITERATIONS
                ),
            )
        self.conv: nn.Conv2d = layers.AdaptiveOrthoConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            ortho_params=ortho_params,
        )
        zero_bias(self.conv)  # as every lipnet layer (lipnet.layers.base.zero_bias); orthogonium's is uniform
        self._cache_key: _Key | None = None
        self._cache_value: Tensor | None = None

    def _sources(self) -> list[Tensor]:
        """Every tensor the kernel is computed from (all of ``self.conv``'s state but the bias)."""
        bias = self.conv.bias
        tensors = [p for p in self.conv.parameters() if p is not bias]
        return tensors + list(self.conv.buffers())

    @staticmethod
    def _key(sources: list[Tensor]) -> _Key:
        return tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in sources)

    def kernel(self) -> Tensor:
        """The ``(out, in / groups, k, k)`` kernel the layer applies, cached in eval mode."""
        if self.training:
            return self.conv.weight
        # walking orthogonium's parametrized module is most of a warm eval forward's overhead: once
        sources = self._sources()
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return self.conv.weight
        if self._cache_value is None or self._cache_key != self._key(sources):
            value = self.conv.weight.detach()
            # the key is taken after the computation, which may update state it reads
            self._cache_value, self._cache_key = value, self._key(self._sources())
        return self._cache_value

    def clear_cache(self) -> None:
        """Forget the cached kernel (it is recomputed on the next eval-mode forward)."""
        self._cache_key = None
        self._cache_value = None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv._conv_forward(x, self.kernel(), self.conv.bias)

    def export(self) -> nn.Module:
        """A plain ``nn.Conv2d`` configured as ``self.conv`` holding the kernel this layer uses in eval mode.

        The layer applies its kernel through ``self.conv._conv_forward``; when the wrapped class redefines
        it, no plain layer is known to compute the same, and the layer itself is returned.
        """
        if "_conv_forward" in redefines_behaviour(type(self.conv), nn.Conv2d):
            return self
        with eval_mode(self):
            return frozen_conv2d(self.conv, self.kernel())

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Sound float64 bound (``conv_operator_bound``) of the current kernel's norm, as configured."""
        with torch.no_grad():
            weight = self.kernel()
        return conv_operator_bound(
            weight,
            stride=self.conv.stride,
            padding=self.conv.padding,
            dilation=self.conv.dilation,
            groups=self.conv.groups,
            padding_mode=self.conv.padding_mode,
            input_shape=input_shape,
        )
