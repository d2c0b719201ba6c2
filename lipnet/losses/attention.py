r"""Losses of the attention catalogue: weighted focal and attention variance (Sarafianos et al.), MIL
instance and consistency terms (Shi et al.), Dynamic Weight Average (Liu et al.), the OAA+ hybrid loss
(Jiang et al.), the task-partition loss and the RA-CNN rank loss (Fu et al.).

Same conventions as :mod:`lipnet.losses.classification` (``tau`` multiplies the logits, the loss is
divided by ``tau``, ``validate`` controls value checks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.losses.classification import (
    LogitLoss,
    _non_negative,
    _positive,
    _real,
    _soft_violation,
    _softplus,
)

__all__ = [
    "AttentionVariance",
    "Consistency",
    "DynamicWeightAverage",
    "MILInstance",
    "OAAHybrid",
    "RankLoss",
    "TaskPartition",
    "WeightedFocal",
]


def _check_float(owner: str, name: str, value: object, ndim: int, validate: bool) -> Tensor:
    """A floating-point tensor with ``ndim`` dimensions (finite when ``validate``), half precision upcast."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim or value.numel() == 0:
        raise ValueError(
            f"{owner}: {name} must be a non-empty {ndim}-D tensor, got shape {tuple(value.shape)}"
        )
    if not value.dtype.is_floating_point:
        raise ValueError(f"{owner}: {name} must be floating point, got dtype {value.dtype}")
    if validate and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{owner}: {name} contains NaN or Inf")
    if value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_unit_interval(owner: str, name: str, value: Tensor, validate: bool) -> None:
    if validate and not bool(((value >= 0) & (value <= 1)).all()):
        raise ValueError(f"{owner}: {name} values must lie in [0, 1] (and not be NaN)")


def _same_device(owner: str, name: str, value: Tensor, ref: Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{owner}: {name} is on {value.device} but the logits are on {ref.device}")


def _prior_weights(owner: str, priors: Sequence[float] | Tensor) -> Tensor:
    """``w_c = exp(-a_c)`` from prior positive frequencies ``a_c`` in ``[0, 1]``, float64 on the CPU."""
    try:
        a = torch.as_tensor(priors, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{owner}: priors must be a sequence of frequencies, got {priors!r}") from err
    if a.ndim != 1 or a.numel() < 1:
        raise ValueError(
            f"{owner}: priors must be 1-D, one frequency per attribute, got shape {tuple(a.shape)}"
        )
    if not bool(((a >= 0) & (a <= 1)).all()):
        raise ValueError(f"{owner}: priors are positive frequencies and must lie in [0, 1], got {priors!r}")
    return torch.exp(-a)


def _focal_bce_terms(z: Tensor, t: Tensor, gamma: float) -> Tensor:
    """``(1-s)^g t softplus(-z) + s^g (1-t) softplus(z)``, ``s = sigmoid(z)``, without cancellation."""
    # (1 - s)^g = exp(g logsigmoid(-z)) and s^g = exp(g logsigmoid(z)): finite for any finite z.
    pos = torch.exp(gamma * F.logsigmoid(-z)) * _softplus(-z)
    neg = torch.exp(gamma * F.logsigmoid(z)) * _softplus(z)
    return t * pos + (1 - t) * neg


class WeightedFocal(LogitLoss):
    r"""Weighted focal loss for imbalanced multi-label attributes (Sarafianos, Xu & Kakadiaris, "Deep
    Imbalanced Attribute Classification using Visual Attention Aggregation", ECCV 2018), on ``tau f``.

    .. math::
        \ell = \frac{1}{N C \tau}\sum_{i,c} w_c\Big[t_{ic}(1-s_{ic})^{\gamma}\,\mathrm{softplus}(-z_{ic})
               + (1-t_{ic})\,s_{ic}^{\gamma}\,\mathrm{softplus}(z_{ic})\Big],
        \qquad z = \tau f,\ s = \sigma(z),\ w_c = e^{-a_c},

    with ``a_c`` the prior positive frequency of attribute ``c`` in the training set, so rare attributes
    weigh more (``softplus(-z) = -log s``). Sarafianos et al. sum over attributes; the mean here keeps the
    scale of :class:`TauBCE`, to which the loss reduces for ``gamma = 0`` and ``a = 0``. Dividing by
    ``tau`` keeps the logit gradient scale ``tau``-free; ``tau -> inf`` gives the weighted zero-margin
    one-vs-all hinge ``mean w_c relu(-(2t - 1) f)``. Per-attribute certificate: ``|f_c| / L_c``.

    Call as ``loss(logits, target)`` with ``logits (N, C)`` and a multi-hot (or soft) float target
    ``(N, C)`` in ``[0, 1]``.

    Args:
        priors: prior positive frequency ``a_c`` in ``[0, 1]`` of each of the ``C`` attributes.
        gamma: focusing parameter ``gamma >= 0`` (``0`` = weighted tau-BCE).
        tau: logit scale ``tau > 0``.
        validate: see :class:`LogitLoss`.
    """

    weights: Tensor

    def __init__(
        self,
        priors: Sequence[float] | Tensor,
        gamma: float = 2.0,
        tau: float = 1.0,
        validate: bool | None = None,
    ) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.gamma = _non_negative(name, "gamma", gamma)
        self.tau = _positive(name, "tau", tau)
        self.register_buffer("weights", _prior_weights(name, priors), persistent=False)

    def _entries(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-entry weighted focal terms ``(N, C)``, not yet divided by ``tau``."""
        name = type(self).__name__
        logits = self._check_logits_any_c(logits)
        if (
            not isinstance(target, Tensor)
            or not target.dtype.is_floating_point
            or target.shape != logits.shape
        ):
            raise ValueError(
                f"{name}: target must be a float multi-hot tensor of the logits' shape "
                f"{tuple(logits.shape)}, got {_describe(target)}"
            )
        _same_device(name, "target", target, logits)
        _check_unit_interval(name, "target", target, self._checks_values(logits))
        if self.weights.numel() != logits.shape[1]:
            raise ValueError(
                f"{name}: {self.weights.numel()} priors were given but the logits have "
                f"{logits.shape[1]} attributes"
            )
        w = self.weights.to(device=logits.device, dtype=logits.dtype)
        return w * _focal_bce_terms(self.tau * logits, target.to(logits.dtype), self.gamma)

    def _check_logits_any_c(self, logits: Tensor) -> Tensor:
        # One attribute (C = 1) is a valid multi-label problem, unlike the single-label losses' C >= 2.
        name = type(self).__name__
        if isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[1] == 1 and logits.shape[0] >= 1:
            return _check_float(name, "logits", logits, 2, self._checks_values(logits))
        return self._check_logits(logits)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self._entries(logits, target).mean() / self.tau

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, tau={self.tau}, attributes={self.weights.numel()}"


class AttentionVariance(WeightedFocal):
    r"""Attention loss of Sarafianos et al. (ECCV 2018): the weighted focal loss of an attention branch,
    each entry re-weighted by how much that branch's prediction for the sample has varied.

    .. math::
        \ell = \frac{1}{N C \tau}\sum_{i,c}\big(1 + \lambda\,\mathrm{sd}_{ic}\big)\,
               w_c\,\mathrm{FL}_\gamma(\tau f_{ic}, t_{ic}),

    where ``FL`` is the bracket of :class:`WeightedFocal` and ``sd_ic`` is the standard deviation of the
    branch's past predicted probabilities ``sigma(tau f_ic)`` for sample ``i`` over its last ``window``
    visits (0 until the sample has been seen twice). Samples whose attention-branch prediction keeps
    changing are emphasised, the variance-based emphasis of Chang, Learned-Miller & McCallum ("Active
    Bias", NeurIPS 2017) that Sarafianos et al. build on. The standard deviations are detached (they are
    weights, not a target) and the history is updated *after* the loss is computed, from the detached
    probabilities, only in training mode. Each occurrence of a sample in a batch is one visit: a batch
    holding sample ``i`` twice records two entries for it, in batch order (both rows are weighted by the
    deviation recorded before the batch). This is the form implemented here; the paper's exact
    bookkeeping (per-iteration vs per-epoch history) is not specified beyond that.

    Call as ``loss(logits, target, index)`` with ``index`` the int64 dataset indices ``(N,)`` of the
    batch's samples, in ``[0, num_samples)``.

    Args:
        priors: prior positive frequency ``a_c`` in ``[0, 1]`` of each attribute.
        num_samples: size of the training set (rows of the history).
        window: number of past predictions kept per sample (``>= 2``).
        strength: ``lambda >= 0``; ``0`` gives :class:`WeightedFocal`.
        gamma: focusing parameter ``gamma >= 0``.
        tau: logit scale ``tau > 0``.
        validate: see :class:`LogitLoss`.
    """

    history: Tensor
    seen: Tensor

    def __init__(
        self,
        priors: Sequence[float] | Tensor,
        num_samples: int,
        window: int = 5,
        strength: float = 1.0,
        gamma: float = 2.0,
        tau: float = 1.0,
        validate: bool | None = None,
    ) -> None:
        super().__init__(priors, gamma=gamma, tau=tau, validate=validate)
        name = type(self).__name__
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{name}: num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"{name}: window must be an int >= 2 (a deviation needs two values), got {window!r}"
            )
        self.strength = _non_negative(name, "strength", strength)
        self.window = window
        c = self.weights.numel()
        # Persistent: the history is training state and must survive a checkpoint/resume.
        self.register_buffer("history", torch.zeros(num_samples, window, c))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.int64))

    def deviations(self, index: Tensor) -> Tensor:
        """Standard deviation ``(N, C)`` of each listed sample's recorded probabilities (0 if seen < 2)."""
        k = self.seen[index].clamp(max=self.window)
        valid = (torch.arange(self.window, device=k.device)[None, :] < k[:, None]).to(self.history.dtype)
        h = self.history[index]
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (h * valid[:, :, None]).sum(dim=1) / count
        var = (((h - mean[:, None, :]) ** 2) * valid[:, :, None]).sum(dim=1) / count
        return torch.where((k >= 2)[:, None], var.sqrt(), torch.zeros_like(var))

    def forward(self, logits: Tensor, target: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        name = type(self).__name__
        entries = self._entries(logits, target)
        n = entries.shape[0]
        if not isinstance(index, Tensor) or index.shape != (n,) or index.dtype != torch.int64:
            raise ValueError(f"{name}: index must be an int64 tensor of shape ({n},), got {_describe(index)}")
        if index.device != self.history.device:
            raise ValueError(
                f"{name}: index is on {index.device} but the history is on {self.history.device}"
            )
        if self._checks_values(entries):
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.history.shape[0]:
                raise ValueError(
                    f"{name}: sample indices must lie in [0, {self.history.shape[0]}), found [{lo}, {hi}]"
                )
        sd = self.deviations(index).to(device=entries.device, dtype=entries.dtype)
        out = ((1 + self.strength * sd) * entries).mean() / self.tau
        if self.training:
            with torch.no_grad():
                self._record(index, torch.sigmoid(self.tau * logits.detach()).to(self.history.dtype))
        return out

    def _record(self, index: Tensor, probs: Tensor) -> None:
        # Every occurrence of a sample in the batch is one visit, recorded in batch order. The
        # occurrence rank r (0 for a sample's first row in the batch) gives each visit its own slot,
        # (seen + r) mod window; of more than `window` occurrences only the last `window` are kept,
        # as sequential recording would, so no two writes hit the same slot.
        n = index.shape[0]
        same = index[:, None] == index[None, :]
        rank = torch.tril(same, diagonal=-1).sum(dim=1)
        count = same.sum(dim=1)
        keep = rank >= count - self.window
        slot = (self.seen[index] + rank) % self.window
        self.history[index[keep], slot[keep]] = probs.to(self.history.device)[keep]
        self.seen.index_add_(0, index, torch.ones(n, dtype=self.seen.dtype, device=index.device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, strength={self.strength}"


def _tau_ce_rows(z: Tensor, target: Tensor, tau: float) -> Tensor:
    """``CE(tau z_r, y_r) / tau`` for every row of ``z (R, C)``, ``target (R,)``, shape (R,)."""
    return _softplus(_soft_violation(z, target, tau, 0.0)) / tau


class MILInstance(LogitLoss):
    r"""Instance regulariser of loss-based attention for multiple-instance learning (Shi, Xing, Xu, Chen,
    Yang, "Loss-Based Attention for Deep Multiple Instance Learning", AAAI 2020), on ``tau z``.

    .. math::
        \ell = \frac{\lambda}{B}\sum_{b=1}^{B}\sum_{k=1}^{K_b}\alpha_{bk}\,
               \frac{1}{\tau}\,\mathrm{CE}\big(\tau z_{bk}, Y_b\big),

    the attention-weighted tau-cross-entropy of each instance's logits ``z_bk`` (from the classifier the
    bag shares) against its bag label ``Y_b``; Shi et al. add it to the bag loss with ``lambda = 2``. The
    gradient flows through ``alpha`` as well, so the attention is pushed towards instances the classifier
    already explains (the "loss-based" part). Padding instances (``mask`` False) must carry zero weight.
    Loss-only: it does not change the network's Lipschitz bound.

    Call as ``loss(instance_logits, attention, bag_labels, mask=None)`` with ``instance_logits (B, K, C)``,
    ``attention (B, K)`` non-negative, summing to 1 over the valid instances of each bag, ``bag_labels (B,)``
    int class indices and ``mask (B, K)`` bool (True = real instance).

    Args:
        tau: logit scale ``tau > 0``.
        lam: weight ``lambda >= 0``.
        validate: see :class:`LogitLoss`.
    """

    def __init__(self, tau: float = 1.0, lam: float = 2.0, validate: bool | None = None) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.tau = _positive(name, "tau", tau)
        self.lam = _non_negative(name, "lam", lam)

    def forward(
        self, instance_logits: Tensor, attention: Tensor, bag_labels: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        name = type(self).__name__
        check = self._checks_values(instance_logits) if isinstance(instance_logits, Tensor) else True
        z = _check_float(name, "instance_logits", instance_logits, 3, check)
        b, k, c = z.shape
        if c < 2:
            raise ValueError(f"{name}: instance_logits need C >= 2 classes, got shape {tuple(z.shape)}")
        a = _check_float(name, "attention", attention, 2, check)
        if a.shape != (b, k):
            raise ValueError(f"{name}: attention must have shape ({b}, {k}), got {tuple(a.shape)}")
        _same_device(name, "attention", a, z)
        if mask is None:
            mask = torch.ones(b, k, dtype=torch.bool, device=z.device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (b, k):
            raise ValueError(f"{name}: mask must be a bool tensor of shape ({b}, {k}), got {_describe(mask)}")
        if check:
            if bool((a < 0).any()) or bool((a.masked_fill(mask, 0) != 0).any()):
                raise ValueError(f"{name}: attention must be >= 0 and zero on padding instances")
            if not torch.allclose(a.sum(dim=1), torch.ones(b, dtype=a.dtype, device=a.device), atol=1e-4):
                raise ValueError(f"{name}: the attention of each bag must sum to 1 over its instances")
        y = self._check_labels(z[:, 0, :], bag_labels)
        per_instance = _tau_ce_rows(z.reshape(b * k, c), y.repeat_interleave(k), self.tau).view(b, k)
        per_instance = per_instance.masked_fill(~mask, 0.0)
        return self.lam * (a.to(z.dtype) * per_instance).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"tau={self.tau}, lam={self.lam}"


class Consistency(LogitLoss):
    r"""Consistency cost of Shi et al. (AAAI 2020): squared distance between the current class
    probabilities and a reference prediction of the same sample (an earlier epoch's, or another
    augmentation's), as in temporal ensembling (Laine & Aila, ICLR 2017).

    .. math::
        \ell = \frac{1}{N\tau}\sum_i \big\|\mathrm{softmax}(\tau f_i) - \mathrm{softmax}(\tau g_i)\big\|_2^2,

    with ``g`` the reference logits, detached (the target does not move). The value lies in ``[0, 2/tau]``;
    dividing by ``tau`` keeps the logit gradient (which carries a factor ``tau`` from the softmax) of a
    ``tau``-free scale. Note that on an ``L``-Lipschitz network consistency under perturbations of norm
    ``delta`` is already guaranteed up to ``L delta``: the cost matters for large augmentations only.

    Call as ``loss(logits, reference_logits)``, both ``(N, C)``.

    Args:
        tau: logit scale ``tau > 0``.
        validate: see :class:`LogitLoss`.
    """

    def __init__(self, tau: float = 1.0, validate: bool | None = None) -> None:
        super().__init__(validate)
        self.tau = _positive(type(self).__name__, "tau", tau)

    def forward(self, logits: Tensor, reference_logits: Tensor) -> Tensor:
        name = type(self).__name__
        logits = self._check_logits(logits)
        ref = _check_float(name, "reference_logits", reference_logits, 2, self._checks_values(logits))
        if ref.shape != logits.shape:
            raise ValueError(
                f"{name}: reference_logits must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(ref.shape)}"
            )
        _same_device(name, "reference_logits", ref, logits)
        target = torch.softmax(self.tau * ref.detach().to(logits.dtype), dim=1)
        p = torch.softmax(self.tau * logits, dim=1)
        return ((p - target) ** 2).sum(dim=1).mean() / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class DynamicWeightAverage(nn.Module):
    r"""Dynamic Weight Average for multi-task training (Liu, Johns & Davison, "End-to-End Multi-Task
    Learning with Attention", CVPR 2019), with a positive surrogate for losses that can be <= 0.

    .. math::
        \lambda_k(t) = \frac{K\,\exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)},\qquad
        r_k(t-1) = \frac{s_k(t-1)}{s_k(t-2)},

    with ``s_k`` the epoch-averaged training loss of task ``k`` (recorded with :meth:`record_epoch`) and
    ``lambda_k = 1`` for the first two epochs. ``forward(task_losses)`` returns ``sum_k lambda_k L_k``
    (weights detached).

    **Surrogate.** Liu et al. use ``s_k = L_k``, which needs ``L_k > 0``: the HKR and KR losses of
    1-Lipschitz training are often negative and the hinge reaches 0, where the ratio is undefined or
    changes sign. With ``surrogate="shifted"`` (default) the ratio is taken of

    .. math::
        s_k(u) = L_k(u) - m_k + \delta\,\max\big(|L_k(t-1)|, |L_k(t-2)|\big),\qquad
        m_k = \min_{u \le t-1} L_k(u),

    the loss shifted above its lowest recorded value plus a cushion ``delta`` relative to the task's
    scale, so ``s_k > 0`` whenever the task's loss is not identically 0 (otherwise ``r_k = 1``). Like the
    original ratio it is invariant to rescaling a task's loss, equals 1 for a flat loss and falls below 1
    when the loss drops, the more so the faster it drops. ``surrogate="raw"`` is the paper's form and
    raises ``ValueError`` on a loss <= 0. Either way the ratio is clipped to ``[1/clip, clip]`` so that one
    noisy epoch cannot hand all the weight to one task. Loss-only: the Lipschitz bound is unchanged.

    Args:
        num_tasks: ``K >= 1``.
        temperature: ``T > 0`` (Liu et al. use 2).
        surrogate: ``"shifted"`` (any sign) or ``"raw"`` (positive losses only).
        delta: relative cushion ``delta > 0`` of the shifted surrogate.
        clip: ratio clip ``>= 1``.
    """

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        surrogate: str = "shifted",
        delta: float = 0.1,
        clip: float = 10.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"{name}: num_tasks must be an int >= 1, got {num_tasks!r}")
        if surrogate not in ("shifted", "raw"):
            raise ValueError(f"{name}: surrogate must be 'shifted' or 'raw', got {surrogate!r}")
        self.num_tasks = num_tasks
        self.temperature = _positive(name, "temperature", temperature)
        self.surrogate = surrogate
        self.delta = _positive(name, "delta", delta)
        self.clip = _real(name, "clip", clip)
        if self.clip < 1:
            raise ValueError(f"{name}: clip must be >= 1, got {clip!r}")
        self.history: list[list[float]] = []

    def record_epoch(self, losses: Sequence[float] | Tensor) -> None:
        """Append one epoch's averaged training loss of each task (``K`` finite numbers)."""
        name = type(self).__name__
        values = torch.as_tensor(losses, dtype=torch.float64).detach().cpu().reshape(-1).tolist()
        if len(values) != self.num_tasks:
            raise ValueError(f"{name}: expected {self.num_tasks} task losses, got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}: task losses must be finite, got {values}")
        if self.surrogate == "raw" and min(values) <= 0:
            raise ValueError(
                f"{name}: the raw DWA ratio needs positive losses, got {values}; use surrogate='shifted' "
                f"for hinge/KR/HKR losses"
            )
        self.history.append(values)

    def ratios(self) -> list[float]:
        """``r_k(t-1)`` of every task (all 1 before two epochs are recorded)."""
        if len(self.history) < 2:
            return [1.0] * self.num_tasks
        prev, before = self.history[-1], self.history[-2]
        out = []
        for k in range(self.num_tasks):
            if self.surrogate == "raw":
                r = prev[k] / before[k]
            else:
                scale = max(abs(prev[k]), abs(before[k]))
                if scale == 0.0:
                    r = 1.0
                else:
                    low = min(row[k] for row in self.history)
                    r = (prev[k] - low + self.delta * scale) / (before[k] - low + self.delta * scale)
            out.append(min(max(r, 1.0 / self.clip), self.clip))
        return out

    def weights(self) -> Tensor:
        """``lambda_k`` as a float64 tensor ``(K,)`` summing to ``K``."""
        r = torch.tensor(self.ratios(), dtype=torch.float64)
        return self.num_tasks * torch.softmax(r / self.temperature, dim=0)

    def forward(self, task_losses: Tensor | Sequence[Tensor]) -> Tensor:
        name = type(self).__name__
        losses = torch.stack(list(task_losses)) if not isinstance(task_losses, Tensor) else task_losses
        if losses.shape != (self.num_tasks,):
            raise ValueError(
                f"{name}: expected {self.num_tasks} scalar task losses, got shape {tuple(losses.shape)}"
            )
        return (self.weights().to(device=losses.device, dtype=losses.dtype) * losses).sum()

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, temperature={self.temperature}, surrogate={self.surrogate!r}, "
            f"delta={self.delta}, clip={self.clip}"
        )


class OAAHybrid(LogitLoss):
    r"""Hybrid enhance/constraint loss of the OAA+ integral attention model (Jiang, Hou, Cao, Cheng, Wei,
    Xiong, "Integral Object Mining via Online Attention Accumulation", ICCV 2019), on ``tau p``.

    .. math::
        \ell = \frac{1}{\tau}\Big[\frac{1}{|P|}\sum_{j\in P} q_j\,\mathrm{softplus}(-\tau p_j)
               + \frac{1}{|\bar P|}\sum_{j\notin P}\mathrm{softplus}(\tau p_j)\Big],
        \qquad P = \{j : q_j > \theta\},

    over every pixel ``j`` of the batch, with ``q`` the accumulated attention maps (targets in ``[0, 1]``)
    and ``p`` the attention model's per-pixel logits; ``softplus(-x) = -log sigmoid(x)``. The first
    (enhance) term pulls pixels that the accumulated maps ever marked towards foreground, weighted by their
    attention; the second (constraint) term pushes every other pixel to background. ``theta = 0.001`` is
    the released code's threshold; an empty ``P`` or complement contributes 0. Per-pixel certificate of the
    trained model: ``|p_j| / Lip(p_j)``.

    Call as ``loss(logits, target)`` with two tensors of the same shape ``(N, ...)``.

    Args:
        tau: logit scale ``tau > 0``.
        threshold: ``theta`` in ``[0, 1)``.
        validate: see :class:`LogitLoss`.
    """

    def __init__(self, tau: float = 1.0, threshold: float = 0.001, validate: bool | None = None) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.tau = _positive(name, "tau", tau)
        self.threshold = _non_negative(name, "threshold", threshold)
        if self.threshold >= 1:
            raise ValueError(f"{name}: threshold must be < 1, got {threshold!r}")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(logits, Tensor) or logits.ndim < 2:
            raise ValueError(f"{name}: logits must be score maps of shape (N, ...) , got {_describe(logits)}")
        check = self._checks_values(logits)
        p = _check_float(name, "logits", logits, logits.ndim, check)
        q = _check_float(name, "target", target, p.ndim, check)
        if q.shape != p.shape:
            raise ValueError(
                f"{name}: target must have the logits' shape {tuple(p.shape)}, got {tuple(q.shape)}"
            )
        _same_device(name, "target", q, p)
        _check_unit_interval(name, "target", q, check)
        q = q.to(p.dtype)
        z = self.tau * p
        pos = q > self.threshold
        n_pos = pos.sum().clamp(min=1)
        n_neg = (~pos).sum().clamp(min=1)
        enhance = torch.where(pos, q * _softplus(-z), torch.zeros_like(z)).sum() / n_pos
        constraint = torch.where(pos, torch.zeros_like(z), _softplus(z)).sum() / n_neg
        return (enhance + constraint) / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, threshold={self.threshold}"


class TaskPartition(LogitLoss):
    r"""Task-partition loss gated by an attention map: each task is trained on the pixels the attention
    map assigns to it.

    .. math::
        \ell = \sum_{t=1}^{T}\frac{\sum_{n,j} a_{ntj}\,\ell_{ntj}}{\max\big(\sum_{n,j} a_{ntj},\ 1\big)},
        \qquad a_{ntj}\ge 0,\ \sum_t a_{ntj} \le 1,

    with ``ell (N, T, H, W)`` the per-pixel loss of each task and ``a (N, T, H, W)`` the gate: a soft
    partition of each pixel among the tasks (e.g. ``a = [A, 1 - A]`` for a foreground attention map ``A``
    that sends object pixels to one task and background pixels to another, as the task-specific attention
    masks of MTAN (Liu et al., CVPR 2019) select per-task features). Each task's term is its
    gate-weighted mean loss, so a task is not drowned by the area the other tasks cover; a task whose gate
    is (near) empty contributes (near) 0. The gate is detached when ``detach_gate`` (default), so the loss
    trains the task heads and not the partition; with ``detach_gate=False`` the attention could lower the
    loss by moving mass away from hard pixels. The per-pixel losses should themselves be tau-scaled (e.g.
    ``TauBCE``/``TauCrossEntropy`` computed with ``reduction`` per pixel). Loss-only.

    Call as ``loss(per_pixel_losses, gate)``.

    Args:
        detach_gate: stop the gradient into the gate.
        validate: see :class:`LogitLoss`.
    """

    def __init__(self, detach_gate: bool = True, validate: bool | None = None) -> None:
        super().__init__(validate)
        if not isinstance(detach_gate, bool):
            raise ValueError(f"{type(self).__name__}: detach_gate must be True or False, got {detach_gate!r}")
        self.detach_gate = detach_gate

    def forward(self, per_pixel_losses: Tensor, gate: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(per_pixel_losses, Tensor):
            raise ValueError(
                f"{name}: per_pixel_losses must be a torch.Tensor, got {_describe(per_pixel_losses)}"
            )
        check = self._checks_values(per_pixel_losses)
        ell = _check_float(name, "per_pixel_losses", per_pixel_losses, 4, check)
        a = _check_float(name, "gate", gate, 4, check)
        if a.shape != ell.shape:
            raise ValueError(
                f"{name}: gate must have the losses' shape {tuple(ell.shape)}, got {tuple(a.shape)}"
            )
        _same_device(name, "gate", a, ell)
        if check and (bool((a < 0).any()) or bool((a.sum(dim=1) > 1 + 1e-6).any())):
            raise ValueError(
                f"{name}: the gate must be >= 0 and sum to at most 1 over the tasks at each pixel"
            )
        if self.detach_gate:
            a = a.detach()
        a = a.to(ell.dtype)
        mass = a.sum(dim=(0, 2, 3))
        return ((a * ell).sum(dim=(0, 2, 3)) / mass.clamp(min=1.0)).sum()

    def extra_repr(self) -> str:
        return f"detach_gate={self.detach_gate}"


class RankLoss(LogitLoss):
    r"""Inter-scale pairwise ranking loss of RA-CNN (Fu, Zheng & Mei, "Look Closer to See Better:
    Recurrent Attention Convolutional Neural Network for Fine-grained Image Recognition", CVPR 2017).

    .. math::
        \ell = \frac{1}{N\tau}\sum_{i}\sum_{s=1}^{S-1}
               \max\big(0,\ p^{(s)}_{i,y_i} - p^{(s+1)}_{i,y_i} + \mathrm{margin}\big),
        \qquad p^{(s)} = \mathrm{softmax}(\tau f^{(s)}),

    which asks each finer scale (the next zoomed-in attended region) to be more confident in the true
    class than the coarser one by ``margin`` (Fu et al. use 0.05). Probabilities are taken of the
    tau-scaled logits, and the loss is divided by ``tau`` because the softmax brings a factor ``tau`` into
    the logit gradient. The paper trains the ranking loss and the per-scale classification losses in
    alternation; here it is only the ranking term. Loss-only.

    Call as ``loss(scale_logits, target)`` with ``scale_logits (S, N, C)`` (``S >= 2`` scales, coarse to
    fine) and ``target (N,)`` int class indices.

    Args:
        margin: probability margin in ``[0, 1)``.
        tau: logit scale ``tau > 0``.
        validate: see :class:`LogitLoss`.
    """

    def __init__(self, margin: float = 0.05, tau: float = 1.0, validate: bool | None = None) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.margin = _non_negative(name, "margin", margin)
        if self.margin >= 1:
            raise ValueError(f"{name}: margin is a probability gap and must be < 1, got {margin!r}")
        self.tau = _positive(name, "tau", tau)

    def forward(self, scale_logits: Tensor, target: Tensor) -> Tensor:
        name = type(self).__name__
        check = self._checks_values(scale_logits) if isinstance(scale_logits, Tensor) else True
        f = _check_float(name, "scale_logits", scale_logits, 3, check)
        if f.shape[0] < 2 or f.shape[2] < 2:
            raise ValueError(
                f"{name}: scale_logits must be (S, N, C) with S >= 2 and C >= 2, got {tuple(f.shape)}"
            )
        y = self._check_labels(f[0], target)
        p = (
            torch.softmax(self.tau * f, dim=2)
            .gather(2, y[None, :, None].expand(f.shape[0], -1, 1))
            .squeeze(2)
        )
        gaps = F.relu(p[:-1] - p[1:] + self.margin)
        return gaps.sum(dim=0).mean() / self.tau

    def extra_repr(self) -> str:
        return f"margin={self.margin}, tau={self.tau}"
