"""Task metrics of the attention catalogue, clean and certified.

Clean metrics follow the papers' protocols: mean accuracy ``mA`` and F1 for attributes (Sarafianos et al.,
ECCV 2018), bag accuracy and instance AUC for multiple-instance learning (Ilse et al., ICML 2018; Shi et
al., AAAI 2020), mIoU for localisation (Jiang et al., ICCV 2019), per-task accuracy for multi-task
heads (Liu et al., CVPR 2019).

Certified metrics need a sound Lipschitz bound ``L`` of the map from the input to the logits used (e.g.
``certify.bounds.lipschitz_bound`` of the network or of one task's head composed with the backbone):

* single-label decisions (a class, a bag, one task's head): ``certify.radius.certified_radius``;
* per-attribute / per-pixel binary decisions ``sign(f_c)``: ``certify.radius.binary_radius``.

Both take the norms of the inputs that produced the logits (the scale of the forward pass's rounding);
no radius is computed here. A sample (attribute, pixel) counts as certified at ``eps`` when it is correct
**and** its radius is strictly greater than ``eps`` (``certify.radius.certified_accuracy``).

Proofs: ``docs/proofs/certificates.md#lemma-global-rule``, ``#lemma-sign-radius``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from certify.radius import binary_radius, certified_accuracy, certified_radius

__all__ = [
    "attribute_f1",
    "bag_accuracy",
    "certified_attribute_accuracy",
    "certified_per_task_accuracy",
    "certified_pixel_fraction",
    "instance_auc",
    "mean_accuracy",
    "mean_iou",
    "per_task_accuracy",
]


def _binary(name: str, value: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty")
    b = value.detach()
    if not bool(((b == 0) | (b == 1)).all()):
        raise ValueError(f"{name} must hold 0/1 (or bool) values")
    return b.bool()


def _scores(name: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point torch.Tensor")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty")
    s = value.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return s


def mean_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Label-based mean accuracy ``mA = mean_c (TPR_c + TNR_c) / 2`` of the decisions ``f_c > 0``.

    The PETA / PA-100K protocol (Li et al., ACPR 2015) used by Sarafianos et al. An attribute with no
    positive (or no negative) sample in the set is scored on the other half alone.
    """
    f = _scores("logits", logits)
    if f.ndim != 2:
        raise ValueError(f"logits must be (N, A), got {tuple(f.shape)}")
    t = _binary("targets", targets, tuple(f.shape))
    pred = f > 0
    pos, neg = t.sum(0).double(), (~t).sum(0).double()
    tpr = (pred & t).sum(0).double() / pos.clamp(min=1)
    tnr = (~pred & ~t).sum(0).double() / neg.clamp(min=1)
    per = torch.where(pos == 0, tnr, torch.where(neg == 0, tpr, (tpr + tnr) / 2))
    return float(per.mean())


def attribute_f1(logits: Tensor, targets: Tensor) -> float:
    """Example-based F1 (Li et al., ACPR 2015): ``2 P R / (P + R)`` with
    ``P = mean_i |pred_i & t_i| / |pred_i|`` and ``R = mean_i |pred_i & t_i| / |t_i|``; a sample with an
    empty prediction (or target) set contributes 1 to P (or R) when the other set is empty too, else 0."""
    f = _scores("logits", logits)
    if f.ndim != 2:
        raise ValueError(f"logits must be (N, A), got {tuple(f.shape)}")
    t = _binary("targets", targets, tuple(f.shape))
    pred = f > 0
    inter = (pred & t).sum(1).double()
    n_pred, n_true = pred.sum(1).double(), t.sum(1).double()
    both_empty = (n_pred == 0) & (n_true == 0)
    p = torch.where(n_pred > 0, inter / n_pred.clamp(min=1), both_empty.double())
    r = torch.where(n_true > 0, inter / n_true.clamp(min=1), both_empty.double())
    pm, rm = float(p.mean()), float(r.mean())
    return 0.0 if pm + rm == 0 else 2 * pm * rm / (pm + rm)


def bag_accuracy(bag_logits: Tensor, bag_labels: Tensor) -> float:
    """Fraction of bags whose arg-max class is the bag label (ties count as wrong)."""
    f = _scores("bag_logits", bag_logits)
    if (
        f.ndim != 2
        or f.shape[1] < 2
        or not isinstance(bag_labels, Tensor)
        or bag_labels.shape != (f.shape[0],)
    ):
        raise ValueError("bag_logits must be (B, C >= 2) and bag_labels (B,)")
    y = bag_labels.detach().to(torch.int64)
    top2 = f.topk(2, dim=1)
    correct = (top2.indices[:, 0] == y) & (top2.values[:, 0] > top2.values[:, 1])
    return float(correct.double().mean())


def instance_auc(scores: Tensor, instance_labels: Tensor, mask: Tensor | None = None) -> float:
    """ROC AUC of instance ``scores`` (e.g. attention weights) against 0/1 instance labels.

    The Mann-Whitney statistic: the probability that a random positive instance scores above a random
    negative one, ties counting one half. Padding instances (``mask`` False) are ignored. Raises
    ``ValueError`` when either class is absent (the AUC is undefined).
    """
    s = _scores("scores", scores)
    y = _binary("instance_labels", instance_labels, tuple(s.shape))
    keep = torch.ones_like(y) if mask is None else _binary("mask", mask, tuple(s.shape))
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("instance AUC needs both positive and negative instances")
    # Average ranks (1-based) handle ties exactly.
    sorted_s, order = torch.sort(s)
    ranks = torch.empty_like(s)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def mean_iou(pred_masks: Tensor, true_masks: Tensor) -> float:
    """mIoU over the two classes {background, foreground}, pooled over all pixels of the set (the
    PASCAL VOC convention that CAM/OAA papers report, here with one object class)."""
    p = _binary("pred_masks", pred_masks)
    t = _binary("true_masks", true_masks, tuple(p.shape))
    ious = []
    for a, b in ((p, t), (~p, ~t)):
        union = int((a | b).sum())
        ious.append(1.0 if union == 0 else int((a & b).sum()) / union)
    return sum(ious) / 2


def per_task_accuracy(logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, float]:
    """Arg-max accuracy of each task's head: ``{task: accuracy}`` (ties count as wrong)."""
    if set(logits) != set(labels):
        raise ValueError(f"tasks differ: logits for {sorted(logits)}, labels for {sorted(labels)}")
    return {k: bag_accuracy(logits[k], labels[k]) for k in logits}


def certified_attribute_accuracy(
    logits: Tensor,
    targets: Tensor,
    lipschitz: float | Sequence[float] | Tensor,
    eps: float | str,
    *,
    input_norms: Tensor | float,
) -> list[float]:
    """Per-attribute certified accuracy at ``eps``: for each attribute ``c``, the fraction of samples whose
    decision ``f_c > 0`` is right and whose :func:`certify.radius.binary_radius` (``L_c = lipschitz[c]``,
    the inputs' norms ``input_norms``) is ``> eps``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be (N, A), got {got}")
    radius = binary_radius(logits, targets, lipschitz, input_norms=input_norms)
    return [certified_accuracy(radius[:, c], eps) for c in range(radius.shape[1])]


def certified_pixel_fraction(
    pixel_logits: Tensor,
    true_masks: Tensor,
    lipschitz: float,
    eps: float | str,
    *,
    input_norms: Tensor | float,
) -> float:
    """Fraction of pixels whose fore/background decision ``p_j > 0`` is right and certified at ``eps``:
    :func:`certify.radius.binary_radius` of ``pixel_logits (N, H, W)`` with ``L = lipschitz`` (a bound of
    every pixel's logit) and the norms ``input_norms`` of the images, ``> eps``."""
    if not isinstance(pixel_logits, Tensor) or not isinstance(true_masks, Tensor):
        raise ValueError("pixel_logits and true_masks must be torch.Tensors")
    radius = binary_radius(pixel_logits[:, None], true_masks[:, None], lipschitz, input_norms=input_norms)
    return certified_accuracy(radius.flatten(), eps)


def certified_per_task_accuracy(
    logits: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    lipschitz: Mapping[str, float],
    eps: float | str,
    *,
    input_norms: Tensor | float,
) -> dict[str, float]:
    """Certified accuracy of each task's head at ``eps`` (``certify.radius.certified_radius`` with that
    head's sound bound ``lipschitz[task]`` and the inputs' norms ``input_norms``, required: they set the
    scale of the forward pass's rounding). Also the certified bag accuracy."""
    if set(logits) != set(labels) or set(logits) != set(lipschitz):
        raise ValueError("logits, labels and lipschitz must name the same tasks")
    out = {}
    for k in logits:
        lip = float(lipschitz[k])
        if not math.isfinite(lip) or lip <= 0:
            raise ValueError(f"task {k!r}: the Lipschitz bound must be finite and > 0, got {lip!r}")
        radii = certified_radius(logits[k].detach(), labels[k], lip, input_norms=input_norms)
        out[k] = certified_accuracy(radii, eps)
    return out
