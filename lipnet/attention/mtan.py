"""Lipschitz-bounded multi-task attention network (MTAN; Liu, Johns & Davison, CVPR 2019).

In MTAN every task owns soft attention masks ``a = sigmoid(.)`` applied elementwise to the
features of a shared backbone, ``a (.) p``: a product of two input-dependent maps, hence not
Lipschitz (the squeeze-and-excitation counterexample applies per element), and the published
masks use BatchNorm, which is not 1-Lipschitz either. The bounded variant removes BatchNorm,
soft-clamps the multiplicand and bounds every task stream by Lemma 1, recursively over the blocks,
so that each task gets its own constant (``docs/proofs/attention.md#lemma-mtan``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from lipnet.activations import MaxMin
from lipnet.attention._bounds import (
    SLACK,
    NormalizedModule,
    check_int,
    check_maxmin_channels,
    check_positive,
    sigmoid_gate_bound_tensor,
    soft_clamp,
    spectral_norm,
)
from lipnet.layers import BjorckConv2d

__all__ = ["MultiTaskAttentionNetwork"]


class MultiTaskAttentionNetwork(NormalizedModule):
    """MTAN: task-specific soft attention on a shared 1-Lipschitz backbone, certified per task.

    Shared backbone: ``p_j = MaxMin(conv_j(p_{j-1}))``, ``p_{-1} = x``, ``j = 0 .. depth-1``
    (zero-padded 3x3 :class:`~lipnet.layers.BjorckConv2d`, one resolution). Task ``t``, block ``j``:
    ``a_j = sigmoid(G2 relu(G1 [p_j; ahat_{j-1}]))`` (1x1 convolutions, no BatchNorm; block 0
    reads ``p_0`` alone; the paper's shared 3x3 ``f^(j)`` on ``ahat_{j-1}`` is the identity here
    because every block keeps the resolution), ``ahat_j = a_j * B tanh(p_j / B)``. Head: a 1x1
    :class:`~lipnet.layers.BjorckConv2d` ``channels -> task_channels[t]`` on ``ahat_{depth-1}``,
    giving a per-pixel map (a classification task pools it with a 1-Lipschitz pooling).

    Bound (Lemma 1 with scalar blocks: ``|a| <= 1``, ``|B tanh| <= B``), recursively. With
    ``P_j = prod_{k <= j} ||conv_k||`` (operator-norm bounds from the actual kernels), the gate
    input is ``P_0``- resp. ``sqrt(P_j^2 + T_{j-1}^2)``-Lipschitz (a concatenation), the gate
    logits are ``l_j = ||G2|| ||G1||`` times that (exact float64 norms of the 1x1 kernels, which
    are the per-pixel matrices), and

        T_j = min(P_j + B l_j / 4, sigmoid-refined value),   L_t = ||head_t|| T_{depth-1}.

    Guarantee: task ``t``'s output is ``L_t``-Lipschitz on all of R^n (``lipschitz_bound(task=t)``),
    for the given input size or for every size; the whole output (the task maps concatenated
    along channels, what ``forward`` returns) is ``sqrt(sum_t L_t^2)``-Lipschitz
    (``lipschitz_bound()``). With ``normalize=True`` every task's output is divided by its own
    ``L_t``: each task is at most 1-Lipschitz (up to the rounding of ``L_t``) and the concatenation
    at most ``sqrt(#tasks)``-Lipschitz. Certify task ``t`` with ``lipschitz_bound(task=t)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        task_channels: Sequence[int],
        depth: int = 2,
        clamp: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_maxmin_channels("channels", channels)
        check_int("depth", depth)
        task_channels = tuple(task_channels)
        if not task_channels:
            raise ValueError("task_channels must name at least one task")
        self.task_channels = tuple(check_int("task_channels entry", c) for c in task_channels)
        self.in_channels, self.channels, self.depth = in_channels, channels, depth
        self.clamp = check_positive("clamp", clamp)
        self.normalize = bool(normalize)
        self.convs = nn.ModuleList(
            BjorckConv2d(in_channels if j == 0 else channels, channels, 3, padding=1) for j in range(depth)
        )
        self.act = MaxMin()
        self.gate_in = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(channels if j == 0 else 2 * channels, channels, 1) for j in range(depth))
            for _ in self.task_channels
        )
        self.gate_out = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(depth)) for _ in self.task_channels
        )
        self.heads = nn.ModuleList(BjorckConv2d(channels, c, 1) for c in self.task_channels)

    @property
    def num_tasks(self) -> int:
        return len(self.task_channels)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def _task(self, task: int | None) -> int | None:
        if task is not None and (
            isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks
        ):
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        return task

    def _gates(self, t: int, j: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        """Task ``t``'s input and output gate convolutions at block ``j``.

        The casts restore what ``__init__`` put in the nested module lists, which torch types as
        holding ``Module``.
        """
        gate_in = cast(nn.ModuleList, self.gate_in[t])[j]
        gate_out = cast(nn.ModuleList, self.gate_out[t])[j]
        return cast(nn.Conv2d, gate_in), cast(nn.Conv2d, gate_out)

    def _raw_outputs(self, x: Tensor) -> list[Tensor]:
        self._check(x)
        features = []
        p = x
        for conv in self.convs:
            p = self.act(conv(p))
            features.append(p)
        outputs = []
        for t in range(self.num_tasks):
            attended: Tensor | None = None
            for j, p in enumerate(features):
                inp = p if attended is None else torch.cat([p, attended], dim=1)
                gate_in, gate_out = self._gates(t, j)
                mask = gate_out(gate_in(inp).relu()).sigmoid()
                attended = mask * soft_clamp(p, self.clamp)
            assert attended is not None
            outputs.append(self.heads[t](attended))
        return outputs

    def task_outputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """One map ``(N, task_channels[t], H, W)`` per task (each divided by its ``L_t`` if normalising)."""
        outputs = self._raw_outputs(x)
        if not self.normalize:
            return tuple(outputs)
        bounds = self._divisor(tuple(x.shape[1:])).unbind()
        return tuple(y / b.to(device=y.device, dtype=y.dtype) for y, b in zip(outputs, bounds, strict=True))

    def _divisor_value(self, input_shape: tuple[int, ...] | None) -> Tensor:
        """Every task is divided by its own ``L_t``: the float64 vector of them, on the weights' device."""
        device = next(self.parameters()).device
        return torch.stack([b.to(device) for b in self._task_raw_bounds(input_shape)])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.task_outputs(x), dim=1)

    def _task_raw_bounds(self, input_shape: tuple[int, ...] | None) -> list[Tensor]:
        """``L_t`` for every task, as float64 tensors differentiable in the gate weights."""
        spatial = None if input_shape is None else tuple(input_shape[1:])
        inner = None if spatial is None else (self.channels, *spatial)
        shared, prefix = [], 1.0
        # nn.ModuleList is typed as holding Module; these hold the BjorckConv2d built in __init__.
        convs = cast("list[BjorckConv2d]", list(self.convs))
        heads = cast("list[BjorckConv2d]", list(self.heads))
        for j, conv in enumerate(convs):
            prefix *= conv.lipschitz_bound(input_shape if j == 0 else inner)
            shared.append(prefix)
        bounds = []
        for t in range(self.num_tasks):
            stream: Tensor | None = None
            for j, p_lip in enumerate(shared):
                p_t = torch.tensor(p_lip, dtype=torch.float64)
                inp = p_t if stream is None else torch.sqrt(p_t * p_t + stream * stream) * SLACK
                gate_in, gate_out = self._gates(t, j)
                logits = spectral_norm(gate_out.weight) * spectral_norm(gate_in.weight) * inp
                stream = sigmoid_gate_bound_tensor(p_t, self.clamp * logits)
            assert stream is not None
            bounds.append(heads[t].lipschitz_bound(inner) * stream)
        return bounds

    def _raw_bound(self, input_shape: tuple[int, ...] | None) -> Tensor:
        # the float64 zero start makes the sum a Tensor for the type checker; 0 + b^2 == b^2 exactly
        start = torch.zeros((), dtype=torch.float64)
        return torch.sqrt(sum((b * b for b in self._task_raw_bounds(input_shape)), start)) * SLACK

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None, task: int | None = None) -> float:
        """Sound float64 bound of task ``task``'s Lipschitz constant, or of the whole output if ``None``."""
        task = self._task(task)
        shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        with torch.no_grad():
            raw = [float(b) for b in self._task_raw_bounds(shape)]
            if self.normalize:
                # each task is divided by fl(L_t) in the module dtype: its bound is L_t / fl(L_t)
                if shape is None:
                    raw = [1.0 / (1.0 - torch.finfo(self._dtype()).eps / 2.0)] * len(raw)
                else:
                    raw = [r / float(torch.tensor(r, dtype=torch.float64).to(self._dtype())) for r in raw]
        if task is not None:
            return raw[task]
        return math.sqrt(sum(r * r for r in raw)) * SLACK

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, task_channels={self.task_channels}, "
            f"depth={self.depth}, clamp={self.clamp}, normalize={self.normalize}"
        )
