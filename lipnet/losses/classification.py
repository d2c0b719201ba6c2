r"""Losses for 1-Lipschitz classifiers: temperature-scaled CE-type losses, hinge, KR and HKR.

Every loss is an ``nn.Module`` called as ``loss(logits, target)`` with ``logits`` of shape ``(N, C)``
(``C >= 2``) and ``target`` int class indices of shape ``(N,)`` (``TauBCE`` also takes a multi-hot
``(N, C)`` float target). It returns a scalar: the mean over the batch.

Conventions (see ``docs/design.md``):

* **Temperature.** ``tau`` *multiplies* the logits and every CE-type loss is divided by ``tau``,
  as in deel-torchlip and Béthune et al., "Pay attention to your loss: understanding misconceptions
  about 1-Lipschitz neural networks", NeurIPS 2022: ``tau-CE(f, y) = CE(tau f, y) / tau``. Code bases
  that speak of a temperature ``T`` (AOL, SLL, Prach et al.) use ``T = 1 / tau``.
* **Margin.** ``margin`` (hinge, HKR) and ``offset`` (CE-type losses) are in logit units. On an
  ``L``-Lipschitz network a logit margin ``m`` certifies the L2 radius ``m / (sqrt(2) L)``, so
  ``m = sqrt(2) L eps`` targets radius ``eps``.
* **Offset** (Lipschitz-margin training, Tsuzuku, Sato & Sugiyama, NeurIPS 2018). CE-type losses
  take ``offset = o >= 0``, added to every non-target logit before the loss
  (``f_j <- f_j + o`` for ``j != y``), so that a sample only becomes "confident" once its margin
  exceeds ``o``. For the per-class ``TauBCE`` the shift is ``f_c <- f_c - (2 t_c - 1) o``.

Numerics. The CE-type losses are written in terms of the *soft violation*
``a = logsumexp_{j != y}(tau f_j) - tau f_y + tau o``, for which
``-log p_y = softplus(a)``, ``1 - p_y = sigmoid(a)`` and ``log(1 - p_y) = logsigmoid(a)``
(``p = softmax`` of the offset, tau-scaled logits). Each of these is computed without cancellation and
has a finite gradient for any finite logits, so huge logits and extreme ``tau`` are safe. Half-precision
logits (bf16/fp16, e.g. under AMP) are upcast to float32 inside the loss.

Validation. Shape, dtype and device checks are free (host metadata) and always run. Checks on values
(NaN/Inf logits, labels out of range, multi-hot targets outside [0, 1]) need the data on the host,
which on an accelerator would force a device synchronisation every step. Every loss therefore takes
``validate``: ``None`` (default) checks values only when the logits live on the CPU, ``True`` always
checks (syncs on a GPU), ``False`` never checks. Bad hyper-parameters always raise ``ValueError`` at
construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipnet.losses.parameters import ALPHA, EPSILON, GAMMA, MARGIN, OFFSET, POS_WEIGHT, TAU, LossParameter

__all__ = [
    "HKR",
    "KR",
    "Focal",
    "LogitLoss",
    "MulticlassHinge",
    "Poly1",
    "PolyN",
    "TauBCE",
    "TauCrossEntropy",
]


def _real(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    return out


def _positive(owner: str, name: str, value: object) -> float:
    out = _real(owner, name, value)
    if out <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")
    return out


def _non_negative(owner: str, name: str, value: object) -> float:
    out = _real(owner, name, value)
    if out < 0:
        raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}")
    return out


def _softplus(x: Tensor) -> Tensor:
    # logaddexp(x, 0) = log(1 + e^x) without overflow and without the threshold approximation of
    # F.softplus, which would make tau-CE differ from CE by up to e^-20.
    return torch.logaddexp(x, x.new_zeros(()))


class LogitLoss(nn.Module):
    """Base class of the losses here: input checks shared by all of them.

    Args:
        validate: value checks (finite logits, label range): ``None`` = only for CPU tensors, so a GPU
            training step never waits for the device; ``True`` = always; ``False`` = never.

    ``sweepable`` lists the scalar constructor arguments ``lipnet sweep`` may vary, with their ranges
    (:mod:`lipnet.losses.parameters`); a subclass declares its own.
    """

    sweepable: ClassVar[tuple[LossParameter, ...]] = ()

    def __init__(self, validate: bool | None = None) -> None:
        super().__init__()
        if validate is not None and not isinstance(validate, bool):
            raise ValueError(f"{type(self).__name__}: validate must be None, True or False, got {validate!r}")
        self.validate = validate

    def _checks_values(self, logits: Tensor) -> bool:
        if self.validate is None:
            return logits.device.type == "cpu"
        return self.validate

    def _check_logits(self, logits: Tensor) -> Tensor:
        """Check shape/dtype (and values when enabled); return the logits in a precise enough dtype."""
        name = type(self).__name__
        if not isinstance(logits, Tensor):
            raise ValueError(f"{name}: logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
            raise ValueError(
                f"{name}: logits must have shape (N, C) with N >= 1 and C >= 2 classes, "
                f"got {tuple(logits.shape)}"
            )
        if not logits.dtype.is_floating_point:
            raise ValueError(f"{name}: logits must be floating point, got dtype {logits.dtype}")
        if self._checks_values(logits) and not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{name}: logits contain NaN or Inf")
        if logits.dtype in (torch.float16, torch.bfloat16):
            return logits.float()
        return logits

    def _check_labels(self, logits: Tensor, target: Tensor) -> Tensor:
        """Check int class indices of shape (N,) against (N, C) logits; return them as int64."""
        name = type(self).__name__
        if not isinstance(target, Tensor):
            raise ValueError(f"{name}: target must be a torch.Tensor, got {type(target).__name__}")
        n, c = logits.shape
        if target.shape != (n,):
            raise ValueError(
                f"{name}: target must hold one class index per sample, shape ({n},), "
                f"got {tuple(target.shape)} for logits of shape {tuple(logits.shape)}"
            )
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(f"{name}: target must be integer class indices, got dtype {target.dtype}")
        if target.device != logits.device:
            raise ValueError(f"{name}: target is on {target.device} but logits are on {logits.device}")
        if self._checks_values(logits):
            lo, hi = int(target.min()), int(target.max())
            if lo < 0 or hi >= c:
                raise ValueError(f"{name}: labels out of range: found values in [{lo}, {hi}] for {c} classes")
        return target.long()


def _target_mask(logits: Tensor, target: Tensor) -> Tensor:
    # scatter rather than F.one_hot: one_hot inspects the label values, which syncs on a GPU.
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, target.unsqueeze(1), True)


def _soft_violation(logits: Tensor, target: Tensor, tau: float, offset: float) -> Tensor:
    """``a_i = logsumexp_{j != y_i}(tau f_ij) - tau f_{i y_i} + tau offset``, shape (N,)."""
    z = logits * tau
    mask = _target_mask(z, target)
    rest = torch.logsumexp(z.masked_fill(mask, -math.inf), dim=1)
    return rest - z.gather(1, target.unsqueeze(1)).squeeze(1) + tau * offset


class TauCrossEntropy(LogitLoss):
    r"""Temperature-scaled cross-entropy, ``CE(tau f, y) / tau`` (Béthune et al., NeurIPS 2022).

    .. math::
        \ell(f, y) = \frac{1}{\tau}\,\mathrm{CE}(\tau f', y)
                   = \frac{1}{\tau}\log\sum_j e^{\tau (f'_j - f'_y)},
        \qquad f'_j = f_j + o\,[j \ne y].

    ``tau`` multiplies the logits (deel-torchlip ``TauCrossEntropyLoss``); AOL / SLL / Prach et al. use
    a temperature ``T = 1/tau`` instead. Dividing by ``tau`` keeps the logit gradient
    ``softmax(tau f') - e_y`` of norm <= sqrt(2) for every ``tau``.

    Limits, with ``h_o = max(0, max_{j != y} f_j + o - f_y)`` (the categorical hinge with margin ``o``;
    ``o = 0`` gives the zero-margin hinge) and ``R = max_j f_j - min_j f_j``:

    * ``h_o <= loss <= h_o + log(C) / tau``, so ``tau -> inf`` gives the hinge (accuracy-oriented);
    * ``0 <= loss - log(C) / tau - (mean_j f'_j - f_y) <= tau R'^2 / 8`` (``R'`` the range of ``f'``),
      so ``tau -> 0`` gives the linear, KR-like loss ``mean_j f'_j - f_y`` (robustness-oriented). The
      lower bound is convexity of log-sum-exp; the upper one is Taylor's theorem with the softmax
      variance <= R'^2 / 4 (Popoviciu).

    Label smoothing ``s`` (Szegedy et al., CVPR 2016) replaces the one-hot target by
    ``(1 - s) e_y + s / C``, as ``F.cross_entropy(tau f', y, label_smoothing=s) / tau``, which is

    .. math::
        \ell_s(f, y) = \ell(f, y) + s\,\big(f'_y - \tfrac1C \textstyle\sum_j f'_j\big),

    a linear penalty on the target logit's lead over the mean whose weight ``s`` does not depend on
    ``tau``. It caps the margin the loss asks for: the minimiser has ``tau (f'_y - f'_j) =
    log(1 + C (1 - s) / s)`` for every ``j != y`` (``9.0`` logit units at ``tau = 0.5``, ``0.9`` at
    ``tau = 5``, for ``C = 10``, ``s = 0.1``), hence a certified radius at most that over ``sqrt(2) L``:
    with a small ``tau`` the cap lies far beyond useful radii; with a large one it limits robustness.

    Args:
        tau: logit scale ``tau > 0``.
        offset: margin offset ``o >= 0`` in logit units added to the non-target logits (Tsuzuku et al.,
            NeurIPS 2018); ``o = sqrt(2) L eps`` targets radius ``eps``.
        label_smoothing: ``s`` in ``[0, 1]``; 0 (default) is the one-hot target.
        validate: see :class:`LogitLoss`.
    """

    sweepable = (TAU, OFFSET)

    def __init__(
        self, tau: float, offset: float = 0.0, label_smoothing: float = 0.0, validate: bool | None = None
    ) -> None:
        super().__init__(validate)
        self.tau = _positive(type(self).__name__, "tau", tau)
        self.offset = _non_negative(type(self).__name__, "offset", offset)
        self.label_smoothing = _non_negative(type(self).__name__, "label_smoothing", label_smoothing)
        if self.label_smoothing > 1:
            raise ValueError(
                f"{type(self).__name__}: label_smoothing must lie in [0, 1], got {label_smoothing!r}"
            )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        loss = _softplus(_soft_violation(logits, target, self.tau, self.offset))
        if self.label_smoothing:
            # s (z'_y - mean_j z'_j) on the scaled, offset logits z' = tau f' (class docstring); the offset
            # o [j != y] moves the mean by o (C - 1) / C and leaves z'_y alone
            z = logits * self.tau
            c = logits.shape[1]
            lead = (
                z.gather(1, target.unsqueeze(1)).squeeze(1)
                - z.mean(dim=1)
                - self.tau * self.offset * (c - 1) / c
            )
            loss = loss + self.label_smoothing * lead
        return loss.mean() / self.tau

    def extra_repr(self) -> str:
        smoothing = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        return f"tau={self.tau}, offset={self.offset}{smoothing}"


def _one_vs_all_hinge(logits: Tensor, mask: Tensor, margin: float) -> Tensor:
    """Per-sample ``(1/C) [(C-1) relu(m/2 - f_y) + sum_{j != y} relu(m/2 + f_j)]``, shape (N,)."""
    c = logits.shape[1]
    sign = mask.to(logits.dtype) * 2 - 1
    per_class = F.relu(margin / 2 - sign * logits)
    weight = torch.where(mask, float(c - 1), 1.0).to(logits.dtype)
    return (weight * per_class).mean(dim=1)


def _kr_estimate(logits: Tensor, mask: Tensor) -> Tensor:
    """``(1/C) sum_c (mean_{y_i = c} f_ic - mean_{y_i != c} f_ic)``, an empty group counting as 0."""
    pos = mask.to(logits.dtype)
    neg = 1 - pos
    n_pos = pos.sum(dim=0).clamp(min=1)
    n_neg = neg.sum(dim=0).clamp(min=1)
    per_class = (pos * logits).sum(dim=0) / n_pos - (neg * logits).sum(dim=0) / n_neg
    return per_class.mean()


class MulticlassHinge(LogitLoss):
    r"""One-vs-all multiclass hinge with logit margin ``m`` (Serrurier et al., CVPR 2021; deel-torchlip).

    .. math::
        \ell(f, y) = \frac{1}{C}\Big[(C-1)\,\mathrm{relu}\big(\tfrac m2 - f_y\big)
                     + \sum_{j\ne y}\mathrm{relu}\big(\tfrac m2 + f_j\big)\Big].

    The loss is zero iff ``f_y >= m/2`` and ``f_j <= -m/2`` for every ``j != y``; then the logit margin
    ``f_y - max_{j != y} f_j >= m`` and the certified radius is ``>= m / (sqrt(2) L)``. To target radius
    ``eps`` on a 1-Lipschitz network use ``m = sqrt(2) eps``. The condition is sufficient, not necessary:
    the loss also pins the logits around 0 (each class is a binary one-vs-all problem), which is what
    makes it pair with the KR term of :class:`HKR`.

    Same values as deel-torchlip 1.0.5 ``HingeMulticlassLoss(min_margin=m)`` with one-hot targets
    (positives re-weighted by ``C - 1``, mean over classes and batch); here the target is class indices.
    Older TensorFlow deel-lip releases put ``relu(m' - y f)`` on each side (so ``m = 2 m'``), later
    ones ``m/2`` as here: check the release you compare with.

    Args:
        margin: logit margin ``m >= 0``.
        validate: see :class:`LogitLoss`.
    """

    sweepable = (MARGIN,)

    def __init__(self, margin: float, validate: bool | None = None) -> None:
        super().__init__(validate)
        self.margin = _non_negative(type(self).__name__, "margin", margin)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        return _one_vs_all_hinge(logits, _target_mask(logits, target), self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class KR(LogitLoss):
    r"""Multiclass Kantorovich–Rubinstein loss: minus the batch estimate of the mean W1 distance.

    .. math::
        \ell = -\frac1C\sum_{c=1}^{C}\Big(\operatorname*{mean}_{i:\,y_i=c} f_c(x_i)
               - \operatorname*{mean}_{i:\,y_i\ne c} f_c(x_i)\Big).

    For a 1-Lipschitz ``f_c`` the bracket is a lower bound of the Wasserstein-1 distance between
    class ``c`` and the rest (KR duality), so minimising the loss maximises it (Serrurier et al.,
    "Achieving robustness in classification using optimal transport with hinge regularization",
    CVPR 2021). A class absent from the batch (or the batch being one class) contributes 0 for the
    missing group, as in deel-torchlip. The value depends on the whole batch, not on each sample alone;
    under DDP each process estimates it on its own shard.

    **Needs a hard Lipschitz constraint**: on an unconstrained network the loss is unbounded below.

    Sign: this is the loss to *minimise*, i.e. deel-torchlip's ``NegKRLoss`` / ``-KRMulticlassLoss``
    (deel-torchlip's ``KRMulticlassLoss`` returns the positive estimate).

    Args:
        validate: see :class:`LogitLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        return -_kr_estimate(logits, _target_mask(logits, target))


class HKR(LogitLoss):
    r"""Hinge-regularised Kantorovich–Rubinstein loss (Serrurier et al., CVPR 2021).

    .. math::
        \ell = \alpha\,\mathrm{hinge}_m - (1-\alpha)\,\mathrm{KR},\qquad \alpha\in[0, 1],

    with ``hinge_m`` the :class:`MulticlassHinge` and ``KR`` the estimate of :class:`KR` (so
    ``-KR`` is the :class:`KR` loss). Same definition as deel-torchlip 1.0.5 ``HKRMulticlassLoss``;
    ``alpha = 1`` is the hinge alone, ``alpha = 0`` the KR loss alone; larger ``alpha`` favours
    accuracy, smaller ``alpha`` robustness. The loss can be negative.

    deel-lip 1.2.0 (TensorFlow), which Béthune et al. (NeurIPS 2022) used, takes ``alpha' >= 0`` and
    computes ``alpha' hinge - KR``. Dividing it by ``1 + alpha'`` gives this loss with
    ``alpha = alpha' / (1 + alpha')`` (``alpha' = alpha / (1 - alpha)``); only the overall scale (the
    learning rate) differs. Its margin convention may differ too (see :class:`MulticlassHinge`).

    **Needs a hard Lipschitz constraint** (the KR term is unbounded otherwise).

    Args:
        alpha: weight of the hinge, in ``[0, 1]``.
        margin: logit margin ``m >= 0`` of the hinge.
        validate: see :class:`LogitLoss`.
    """

    sweepable = (ALPHA, MARGIN)

    def __init__(self, alpha: float, margin: float, validate: bool | None = None) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.alpha = _real(name, "alpha", alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"{name}: alpha must be in [0, 1], got {alpha!r}; deel-lip's alpha' >= 0 maps to "
                f"alpha = alpha' / (1 + alpha')"
            )
        self.margin = _non_negative(name, "margin", margin)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        mask = _target_mask(logits, target)
        hinge = _one_vs_all_hinge(logits, mask, self.margin).mean()
        return self.alpha * hinge - (1 - self.alpha) * _kr_estimate(logits, mask)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, margin={self.margin}"


class TauBCE(LogitLoss):
    r"""Per-class sigmoid binary cross-entropy on ``tau f``, divided by ``tau`` (one-vs-all).

    .. math::
        \ell = \frac{1}{N C\,\tau}\sum_{i,c}\Big[w\,t_{ic}\,\mathrm{softplus}(-z_{ic})
               + (1 - t_{ic})\,\mathrm{softplus}(z_{ic})\Big],
        \qquad z_{ic} = \tau\big(f_{ic} - (2t_{ic} - 1)\,o\big).

    The decoupled per-class sigmoid loss of Mask R-CNN (He et al., ICCV 2017), temperature-scaled as
    deel-torchlip's ``TauBCEWithLogitsLoss`` (same values for ``o = 0``, ``w = 1``). Targets ``t`` are
    class indices ``(N,)`` (one-hot, single label) or a multi-hot / soft ``(N, C)`` float tensor in
    ``[0, 1]`` (multi-label). ``tau -> inf`` gives the zero-margin one-vs-all hinge
    ``mean relu(-(2t - 1) f)``. Per-class certificate: class ``c``'s decision is stable within
    ``|f_c| / L_c``, so the offset ``o = L_c eps`` targets radius ``eps`` (no sqrt(2)).

    Args:
        tau: logit scale ``tau > 0``.
        offset: per-class margin offset ``o >= 0`` in logit units (positives are lowered and negatives
            raised by ``o`` before the loss).
        pos_weight: weight ``w > 0`` of the positive terms; ``C - 1`` balances single-label one-vs-all
            training, as the ``C - 1`` factor of :class:`MulticlassHinge` does.
        validate: see :class:`LogitLoss`.
    """

    sweepable = (TAU, OFFSET, POS_WEIGHT)

    def __init__(
        self, tau: float, offset: float = 0.0, pos_weight: float = 1.0, validate: bool | None = None
    ) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.tau = _positive(name, "tau", tau)
        self.offset = _non_negative(name, "offset", offset)
        self.pos_weight = _positive(name, "pos_weight", pos_weight)

    def _targets(self, logits: Tensor, target: Tensor) -> Tensor:
        name = type(self).__name__
        if isinstance(target, Tensor) and target.dtype.is_floating_point:
            if target.shape != logits.shape:
                raise ValueError(
                    f"{name}: a float (multi-hot) target must have the logits' shape "
                    f"{tuple(logits.shape)}, got {tuple(target.shape)}; or pass int64 class indices "
                    f"of shape ({logits.shape[0]},)"
                )
            if target.device != logits.device:
                raise ValueError(f"{name}: target is on {target.device} but logits are on {logits.device}")
            if self._checks_values(logits) and not bool(((target >= 0) & (target <= 1)).all()):
                raise ValueError(f"{name}: multi-hot target values must lie in [0, 1] (and not be NaN)")
            return target.to(logits.dtype)
        return _target_mask(logits, self._check_labels(logits, target)).to(logits.dtype)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        t = self._targets(logits, target)
        z = self.tau * (logits - (2 * t - 1) * self.offset)
        per_entry = self.pos_weight * t * _softplus(-z) + (1 - t) * _softplus(z)
        return per_entry.mean() / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, offset={self.offset}, pos_weight={self.pos_weight}"


class Focal(LogitLoss):
    r"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), class-weighted.

    .. math::
        \ell(f, y) = -\frac{\alpha_y}{\tau}\,(1 - p_y)^{\gamma}\log p_y,
        \qquad p = \mathrm{softmax}(\tau f'),\ f'_j = f_j + o\,[j\ne y].

    ``gamma = 0`` and no ``alpha`` give :class:`TauCrossEntropy`. The batch reduction is the plain mean
    (as Lin et al. normalise by the number of anchors, not by the sum of weights). On a 1-Lipschitz
    network ``1 - p_y ~ (C-1) exp(-tau margin)``, so ``gamma > 0`` stops pushing margins earlier than CE;
    pair it with ``offset`` so the focus is on samples not yet certified at the target radius.

    Args:
        gamma: focusing parameter ``gamma >= 0`` (Lin et al. use 2).
        alpha: optional per-class weights ``alpha_c >= 0`` (length ``C``); ``None`` weighs all classes 1.
        tau: logit scale ``tau > 0`` (``1`` is the classic focal loss).
        offset: margin offset ``o >= 0`` in logit units (see :class:`TauCrossEntropy`).
        validate: see :class:`LogitLoss`.
    """

    # alpha is a vector of class weights, not a scalar to sweep
    sweepable = (GAMMA, TAU, OFFSET)

    alpha: Tensor | None

    def __init__(
        self,
        gamma: float,
        alpha: Sequence[float] | Tensor | None = None,
        tau: float = 1.0,
        offset: float = 0.0,
        validate: bool | None = None,
    ) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.gamma = _non_negative(name, "gamma", gamma)
        self.tau = _positive(name, "tau", tau)
        self.offset = _non_negative(name, "offset", offset)
        weights = None
        if alpha is not None:
            try:
                weights = torch.as_tensor(alpha, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"{name}: alpha must be a sequence of class weights, got {alpha!r}") from err
            if weights.ndim != 1 or weights.numel() < 2:
                raise ValueError(f"{name}: alpha must be 1-D, one weight per class (C >= 2), got {alpha!r}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError(f"{name}: alpha weights must be finite and >= 0, got {alpha!r}")
            weights = weights.float()
        # A non-persistent buffer follows .to(device) but stays out of checkpoints (it is a hyper-parameter).
        self.register_buffer("alpha", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        if self.alpha is not None and self.alpha.numel() != logits.shape[1]:
            raise ValueError(
                f"{type(self).__name__}: alpha has {self.alpha.numel()} weights but the logits have "
                f"{logits.shape[1]} classes"
            )
        per_sample = _poly_per_sample(_soft_violation(logits, target, self.tau, self.offset), self.gamma, ())
        if self.alpha is not None:
            per_sample = self.alpha.to(device=logits.device, dtype=logits.dtype)[target] * per_sample
        return per_sample.mean() / self.tau

    def extra_repr(self) -> str:
        weights = None if self.alpha is None else [round(w, 6) for w in self.alpha.tolist()]
        return f"gamma={self.gamma}, alpha={weights}, tau={self.tau}, offset={self.offset}"


def _poly_epsilons(owner: str, epsilons: Sequence[float]) -> tuple[float, ...]:
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, Sequence) or len(epsilons) == 0:
        raise ValueError(f"{owner}: epsilons must be a non-empty sequence of numbers, got {epsilons!r}")
    out = tuple(_real(owner, f"epsilons[{j}]", e) for j, e in enumerate(epsilons))
    for j, e in enumerate(out, start=1):
        if e < -1.0 / j:
            raise ValueError(
                f"{owner}: epsilon_{j} = {e} is below -1/{j}: the coefficient of (1 - p_t)^{j} would turn "
                f"negative and the loss would reward lowering p_t"
            )
    return out


def _poly_per_sample(a: Tensor, gamma: float, eps: Sequence[float]) -> Tensor:
    """``(1-p)^gamma (-log p) + sum_j eps_j (1-p)^(j+gamma)`` per sample, from the soft violation ``a``."""
    log_rest = F.logsigmoid(a)
    per_sample = torch.exp(gamma * log_rest) * _softplus(a)
    for j, e in enumerate(eps, start=1):
        per_sample = per_sample + e * torch.exp((j + gamma) * log_rest)
    return per_sample


class PolyN(LogitLoss):
    r"""Poly-N loss (Leng et al., ICLR 2022): the first ``N`` polynomial coefficients of CE perturbed.

    .. math::
        \ell = \frac1\tau\Big[-(1-p_y)^\gamma\log p_y + \sum_{j=1}^{N}\epsilon_j\,(1 - p_y)^{j+\gamma}\Big],
        \qquad p = \mathrm{softmax}(\tau f'),\ f'_k = f_k + o\,[k\ne y].

    With ``gamma = 0``, ``-log p = sum_j (1-p)^j / j`` so ``epsilon_j`` shifts the j-th Taylor coefficient
    ``1/j`` of CE in ``(1 - p_y)``; ``epsilon_j = -1/j`` for ``j <= N`` removes the first ``N`` terms,
    leaving ``sum_{j>N} (1-p)^j / j``. ``epsilon_j >= -1/j`` is required (every coefficient stays
    non-negative). ``PolyN([e])`` equals ``Poly1(e)``.

    Args:
        epsilons: ``(epsilon_1, ..., epsilon_N)``, ``N >= 1``, ``epsilon_j >= -1/j``.
        tau: logit scale ``tau > 0``.
        gamma: focal exponent ``>= 0`` of the base loss (``0`` = cross-entropy).
        offset: margin offset ``o >= 0`` in logit units (see :class:`TauCrossEntropy`).
        validate: see :class:`LogitLoss`.
    """

    # annotated like LogitLoss's: a subclass (Poly1) declares a longer tuple
    sweepable: ClassVar[tuple[LossParameter, ...]] = (TAU, GAMMA, OFFSET)

    def __init__(
        self,
        epsilons: Sequence[float],
        tau: float = 1.0,
        gamma: float = 0.0,
        offset: float = 0.0,
        validate: bool | None = None,
    ) -> None:
        super().__init__(validate)
        name = type(self).__name__
        self.epsilons = _poly_epsilons(name, epsilons)
        self.tau = _positive(name, "tau", tau)
        self.gamma = _non_negative(name, "gamma", gamma)
        self.offset = _non_negative(name, "offset", offset)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = self._check_logits(logits)
        target = self._check_labels(logits, target)
        a = _soft_violation(logits, target, self.tau, self.offset)
        return _poly_per_sample(a, self.gamma, self.epsilons).mean() / self.tau

    def extra_repr(self) -> str:
        return f"epsilons={list(self.epsilons)}, tau={self.tau}, gamma={self.gamma}, offset={self.offset}"


class Poly1(PolyN):
    r"""Poly-1 loss (Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions", ICLR 2022), on tau-scaled logits.

    .. math::
        \ell = \frac1\tau\Big[-\log p_y + \epsilon\,(1 - p_y)\Big]\quad(\gamma = 0),\qquad
        \ell = \frac1\tau\Big[-(1-p_y)^\gamma\log p_y + \epsilon\,(1 - p_y)^{\gamma+1}\Big]
        \quad(\text{Poly-1 focal}),

    with ``p = softmax(tau f')``, ``f'_j = f_j + o [j != y]``. Since
    ``-log p = sum_{j>=1} (1-p)^j / j``, ``epsilon`` perturbs the leading polynomial coefficient;
    ``epsilon = 0`` gives :class:`TauCrossEntropy` (or :class:`Focal`). The logit gradient of the true
    class is ``-(1 - p_y)(1 + epsilon p_y)`` (``gamma = 0``, ``tau = 1``): ``epsilon > 0`` keeps pushing
    confident samples (larger margins). ``epsilon >= -1`` is required, which keeps the leading
    coefficient non-negative and the loss decreasing in ``p_y``. It is :class:`PolyN` with
    ``epsilons = [epsilon]``.

    Args:
        epsilon: Poly-1 coefficient ``>= -1`` (positive values push margins further).
        tau: logit scale ``tau > 0``.
        gamma: focal exponent ``>= 0``; ``0`` is the cross-entropy base, ``> 0`` Poly-1 focal.
        offset: margin offset ``o >= 0`` in logit units (see :class:`TauCrossEntropy`).
        validate: see :class:`LogitLoss`.
    """

    sweepable = (EPSILON, TAU, GAMMA, OFFSET)

    def __init__(
        self,
        epsilon: float,
        tau: float = 1.0,
        gamma: float = 0.0,
        offset: float = 0.0,
        validate: bool | None = None,
    ) -> None:
        super().__init__([_real(type(self).__name__, "epsilon", epsilon)], tau, gamma, offset, validate)
        self.epsilon = self.epsilons[0]

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, tau={self.tau}, gamma={self.gamma}, offset={self.offset}"
