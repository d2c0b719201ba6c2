"""Batch centering: the part of batch normalisation that keeps a network 1-Lipschitz.

:class:`BatchCentering` subtracts a per-channel mean and adds a learned bias; it never divides by a
standard deviation (the division is what makes batch normalisation's constant ``max_c 1 / sigma_c``
unbounded). Under ``torch.distributed`` the training batch mean is that of the global batch (every
process's samples, as ``nn.SyncBatchNorm``); the running mean and the sample counter
``num_batches_tracked`` are buffers, saved in and loaded from a ``state_dict``; ``export()`` gives
the plain ``nn.BatchNorm1d`` / ``2d`` / ``3d`` that computes the same eval-mode map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lipnet.layers.base import InputSizeUnknownError

__all__ = ["BatchCentering"]

#: The plain batch normalisation of each input rank (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...).
_PLAIN_NORMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _synchronised() -> bool:
    """Whether a training batch spans several processes: ``torch.distributed`` initialised, world > 1."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class BatchCentering(nn.Module):
    """Subtract a per-channel mean and add an optional learned bias: ``y = x + (b - mu)``; never divide.

    Inputs are ``(N, C, *)`` with ``C = num_features``; ``mu`` and ``b`` act along dimension 1.

    * **Eval mode**: ``mu`` is the running mean, so the layer is a translation by the constant
      ``b - mu``: ``||y - y'|| = ||x - x'||`` for any two inputs, of any size. Its Lipschitz constant
      is exactly 1, and :meth:`lipschitz_bound` returns 1.0.
    * **Training mode**: ``mu`` is the mean of the batch over every dimension but 1 (under
      ``torch.distributed`` with more than one process, and ``sync=True``: the mean of the global
      batch, all processes' samples, by one differentiable all-reduce of the per-channel sums and the
      counts). Per channel this maps the vector ``v`` of the channel's ``M`` batch entries to
      ``P v + b`` with ``P = I - 1 1^T / M``, an orthogonal projection (``||P||_2 = 1``): the layer is
      1-Lipschitz **as a map of the whole batch** (L2 norm over all samples; under DDP over the
      global batch). In particular, when one sample alone changes, its own output moves by at most
      that change. It is not a map of one sample: a sample's output depends on the rest of the batch
      (adding the same ``d`` to each of the ``N - 1`` other samples moves it by up to
      ``(1 - 1/N) ||d||``, exactly that when ``d`` is constant over positions, although it did not
      change), so a certificate is a statement about the eval-mode network only.

    The running mean is updated in training as batch normalisation's: ``lerp(mu_run, mu, momentum)``,
    or, with ``momentum=None``, the cumulative average ``1 / num_batches_tracked`` of all batch
    means. A ``state_dict`` holds ``running_mean``, ``num_batches_tracked`` and ``bias``; one saved
    before the counter existed loads with the counter at 0. Eval mode adds ``b - mu`` to ``x`` in one
    rounding, the computation of the plain :meth:`export`. As in deel-torchlip's ``BatchCentering``
    and orthogonium's ``BatchCentering2D``, only the centering of batch normalisation is kept.
    """

    running_mean: Tensor
    num_batches_tracked: Tensor
    # 2: num_batches_tracked added; a version-1 state_dict (without it) loads with the counter at 0
    _version = 2

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        bias: bool = True,
        *,
        sync: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum}")
        self.num_features = num_features
        self.momentum = momentum
        self.sync = sync
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # the rank of the last input (not state): export() builds the plain layer of that rank
        self._input_ndim: int | None = None

    def _batch_mean(self, x: Tensor) -> Tensor:
        """Per-channel mean of the training batch; of the global batch when it spans processes."""
        dims = [d for d in range(x.ndim) if d != 1]
        if not (self.sync and _synchronised()):
            return x.mean(dim=dims)
        from torch.distributed.nn.functional import all_reduce

        # one collective for the sums (differentiable: its backward all-reduces the gradient, which is
        # the gradient of the summed losses of all processes) and the count (a constant), summed in
        # float32 at least (a bf16 input under autocast would round both)
        acc = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        count = torch.full((1,), x.numel() // x.shape[1], dtype=acc, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=dims, dtype=acc), count]))
        return total[:-1] / total[-1]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchCentering({self.num_features}) expects input of shape (N, {self.num_features}, ...), "
                f"got {tuple(x.shape)}"
            )
        self._input_ndim = x.ndim
        if self.training:
            mean = self._batch_mean(x)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
        else:
            mean = self.running_mean
        shift = -mean if self.bias is None else self.bias - mean
        return x + shift.view((1, -1) + (1,) * (x.ndim - 2))

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        """Exactly 1.0: a translation in eval mode (for every input size), and in training mode an
        orthogonal projection of the whole batch (see the class docstring for what that claims)."""
        return 1.0

    def export(self) -> nn.modules.batchnorm._BatchNorm:
        """The plain ``nn.BatchNorm1d`` / ``2d`` / ``3d`` (by the rank of the inputs seen) of the eval map.

        It holds ``running_mean = mu``, ``running_var = 1``, ``eps = 0``, ``weight = 1`` and
        ``bias = b`` (0 without a bias), frozen, so in eval mode it computes
        ``(x - mu) / sqrt(1 + 0) * 1 + b = x + (b - mu)``: on the CPU exactly this layer's eval output
        (torch folds it into ``x * 1 + (b - mu * 1)``, one rounding, as here); elsewhere within one
        rounding of it. Like every exported layer it is meant for eval mode (in training mode a
        BatchNorm would divide by the batch's standard deviation). ``certify`` bounds it by
        ``max |weight| / sqrt(var + eps) = 1``, or folds it into the layer before it.

        Raises :class:`~lipnet.layers.InputSizeUnknownError` before the first forward pass (the rank
        of the inputs is not known; ``lipnet.export(model, input_shape=...)`` runs one).
        """
        if self._input_ndim is None:
            raise InputSizeUnknownError(
                "BatchCentering exports to the BatchNorm of its inputs' rank (1d, 2d or 3d), which it "
                "learns from a forward pass: run the model once"
            )
        if self._input_ndim not in _PLAIN_NORMS:
            raise ValueError(f"BatchCentering has no plain torch form for {self._input_ndim}-D inputs")
        mean = self.running_mean.detach()
        out = _PLAIN_NORMS[self._input_ndim](
            self.num_features, eps=0.0, momentum=None, device=mean.device, dtype=mean.dtype
        )
        # Built with track_running_stats (the default), so the three buffers exist; mypy sees Optional.
        assert out.running_mean is not None and out.running_var is not None
        assert out.num_batches_tracked is not None
        with torch.no_grad():
            out.running_mean.copy_(mean)
            out.running_var.fill_(1.0)
            out.num_batches_tracked.copy_(self.num_batches_tracked)
            out.weight.fill_(1.0)
            out.bias.copy_(self.bias.detach() if self.bias is not None else torch.zeros_like(mean))
        out.requires_grad_(False)
        return out.eval()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "num_batches_tracked"
        version = local_metadata.get("version")
        if (version is None or version < 2) and key not in state_dict:
            # saved before the counter existed (or without metadata, as safetensors files are)
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}" + (
            "" if self.sync else ", sync=False"
        )
