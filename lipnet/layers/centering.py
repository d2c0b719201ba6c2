"""Batch centering: the part of batch normalisation that keeps a network 1-Lipschitz."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BatchCentering"]


class BatchCentering(nn.Module):
    """Subtract a per-channel mean (and add an optional learned bias); never divide.

    ``y = x - mu + b`` along the channel dimension 1 of ``(N, C, *)`` inputs. In eval mode ``mu``
    is the running mean, so the layer is a translation: 1-Lipschitz and norm-preserving on
    differences (``||y - y'|| = ||x - x'||``). In training mode ``mu`` is the batch mean over all
    dimensions but 1 (and the running mean is updated with ``momentum``); as a map of the whole
    batch this is an orthogonal projection, hence also 1-Lipschitz. Batch normalisation's
    division by the standard deviation is what breaks the bound, and is left out (as in
    deel-torchlip's ``BatchCentering`` and orthogonium's ``BatchCentering2D``).
    """

    running_mean: Tensor

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.1,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features = num_features
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchCentering({self.num_features}) expects input of shape (N, {self.num_features}, ...), "
                f"got {tuple(x.shape)}"
            )
        view = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            mean = x.mean(dim=[d for d in range(x.ndim) if d != 1])
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        y = x - mean.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return y

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a translation in eval mode, an orthogonal projection of the batch in training."""
        return 1.0

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}"
