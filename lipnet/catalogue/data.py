"""Task-level datasets built from ``shapes10``: the evaluation tasks of the attention catalogue.

Every builder is deterministic: the images come from :func:`~lipnet.data.shapes.load_shapes10` for the
given ``(split, seed)`` and any further randomness from a ``torch.Generator`` seeded with
``(seed, split)``, so the same arguments give the same tensors. Sizes are small by default (a few hundred
samples) so that tests and ``lipnet catalogue --quick`` run on a CPU in seconds. Every builder takes the
``shapes10`` ``difficulty`` setting (:func:`~lipnet.data.shapes.load_shapes10`; 1, the default, is the full
data set), which scales the nuisances of the source images and changes nothing else.

* :func:`attribute_task`: imbalanced multi-label attributes with controlled priors (2%-50%),
  Sarafianos et al. (ECCV 2018);
* :func:`mil_bags`: multiple-instance bags, positive iff a bag holds the target class (Ilse et al.,
  ICML 2018 protocol; Shi et al., AAAI 2020);
* :func:`multitask`: class + colour + segmentation-mask targets (MTAN, Liu et al., CVPR 2019);
* :func:`localisation_task`: image labels for training, object masks for weakly-supervised localisation
  (CAM, OAA: mIoU against the masks);
* :func:`scale_task`: the object rescaled over a wide range (attention to scale, Chen et al., CVPR 2016);
* :func:`cluttered_task`: a shrunken object translated anywhere in the frame over clutter (spatial
  transformer, Jaderberg et al., NeurIPS 2015).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lipnet.data.shapes import PALETTE, load_shapes10

__all__ = [
    "ATTRIBUTE_NAMES",
    "AttributeTask",
    "BagTask",
    "LocalisationTask",
    "MultiTask",
    "attribute_task",
    "cluttered_task",
    "localisation_task",
    "mil_bags",
    "multitask",
    "scale_task",
]

_SPLITS = {"train": 0, "test": 1}

#: Attribute ``k`` is "score_k above its (1 - prior_k) quantile"; the scores are uniform in the
#: generator (size ~ U(6, 11), centre x, y ~ U(11.5, 20.5) pixels), so the thresholds are exact.
ATTRIBUTE_NAMES = ("large", "small", "right", "left", "low", "high")
_ATTRIBUTE_SCORES = {
    "large": ("size", 6.0, 11.0, +1),
    "small": ("size", 6.0, 11.0, -1),
    "right": ("x", 11.5, 20.5, +1),
    "left": ("x", 11.5, 20.5, -1),
    "low": ("y", 11.5, 20.5, +1),
    "high": ("y", 11.5, 20.5, -1),
}
DEFAULT_PRIORS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _generator(seed: int, split: str, salt: int) -> torch.Generator:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * _SPLITS[split] + salt)


@dataclass(eq=False)
class AttributeTask:
    """Multi-label attributes. ``targets`` float ``(N, A)`` multi-hot; ``priors`` the designed frequencies;
    ``labels (N,)`` the shapes10 class of each image (not an attribute: kept so the images stay a
    labelled dataset)."""

    images: Tensor
    targets: Tensor
    names: list[str]
    priors: Tensor
    labels: Tensor


def attribute_task(
    n: int = 512,
    *,
    split: str = "train",
    seed: int = 0,
    priors: Sequence[float] = DEFAULT_PRIORS,
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> AttributeTask:
    """Imbalanced multi-label attributes of the shape: large, small, right, left, low, high.

    Attribute ``k`` holds when the shape's size (or centre coordinate) exceeds the ``1 - priors[k]``
    quantile of its uniform distribution in the generator, so its expected frequency is exactly
    ``priors[k]`` (each prior in ``(0, 1)``; up to six attributes, in the order of
    :data:`ATTRIBUTE_NAMES`). The default priors span 2% to 50%, as the imbalanced attribute sets
    (PETA, PA-100K) of Sarafianos et al. do.
    """
    _check_count("n", n)
    p = [float(v) for v in priors]
    if not 1 <= len(p) <= len(ATTRIBUTE_NAMES) or not all(0.0 < v < 1.0 for v in p):
        raise ValueError(
            f"priors must be 1 to {len(ATTRIBUTE_NAMES)} frequencies in (0, 1), got {list(priors)}"
        )
    ds = load_shapes10(split, n=n, seed=seed, data_dir=data_dir, difficulty=difficulty)
    attrs = ds.attributes or {}
    columns = []
    names = list(ATTRIBUTE_NAMES[: len(p)])
    for name, prior in zip(names, p, strict=True):
        key, lo, hi, sign = _ATTRIBUTE_SCORES[name]
        value = attrs[key].to(torch.float64)
        threshold = hi - prior * (hi - lo) if sign > 0 else lo + prior * (hi - lo)
        columns.append(value > threshold if sign > 0 else value < threshold)
    targets = torch.stack(columns, dim=1).to(torch.float32)
    return AttributeTask(ds.images, targets, names, torch.tensor(p, dtype=torch.float64), ds.labels)


@dataclass(eq=False)
class BagTask:
    """MIL bags, padded to ``K`` instances.

    ``instances (B, K, 3, H, W)``, ``mask (B, K)`` bool (True = real instance), ``bag_labels (B,)`` int64 in
    {0, 1}, ``instance_labels (B, K)`` int64 in {0, 1} (0 on padding).
    """

    instances: Tensor
    mask: Tensor
    bag_labels: Tensor
    instance_labels: Tensor


def mil_bags(
    n_bags: int = 64,
    *,
    split: str = "train",
    seed: int = 0,
    target: int = 9,
    mean_size: float = 6.0,
    std_size: float = 1.5,
    max_size: int = 10,
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> BagTask:
    """Bags of shapes10 images, positive iff the bag holds at least one image of class ``target``.

    Bag sizes are ``round(N(mean_size, std_size))`` clipped to ``[2, max_size]`` (Ilse et al. use
    ``N(10, 2)``); half of the bags (in expectation) are positive, each with 1 to ``ceil(size / 3)``
    target instances at random positions, so the bag label is balanced rather than set by the class
    frequency. Instances are drawn without replacement from a shapes10 split large enough to fill all bags.
    """
    _check_count("n_bags", n_bags)
    _check_count("max_size", max_size, 2)
    if not 0 <= target < 10:
        raise ValueError(f"target must be a shapes10 class in [0, 10), got {target!r}")
    g = _generator(seed, split, 11)
    sizes = (torch.randn(n_bags, generator=g, dtype=torch.float64) * std_size + mean_size).round()
    sizes = sizes.clamp(2, max_size).to(torch.int64)
    positive = torch.rand(n_bags, generator=g) < 0.5
    n_pos = torch.where(
        positive,
        1 + (torch.rand(n_bags, generator=g) * torch.ceil(sizes / 3.0)).floor().to(torch.int64),
        torch.zeros_like(sizes),
    )
    need_t, need_o = int(n_pos.sum()), int((sizes - n_pos).sum())
    # Ten classes with equal frequency: 12x the largest need (and some margin) always suffices.
    pool = 12 * max(need_t, need_o // 9 + 1) + 100
    ds = load_shapes10(split, n=pool, seed=seed, data_dir=data_dir, difficulty=difficulty)
    is_t = ds.labels == target
    t_idx, o_idx = torch.nonzero(is_t).squeeze(1), torch.nonzero(~is_t).squeeze(1)
    t_idx = t_idx[torch.randperm(len(t_idx), generator=g)]
    o_idx = o_idx[torch.randperm(len(o_idx), generator=g)]
    c, h, w = ds.images.shape[1:]
    instances = torch.zeros(n_bags, max_size, c, h, w)
    mask = torch.zeros(n_bags, max_size, dtype=torch.bool)
    inst_labels = torch.zeros(n_bags, max_size, dtype=torch.int64)
    ti = oi = 0
    for b in range(n_bags):
        k, kp = int(sizes[b]), int(n_pos[b])
        chosen = torch.cat([t_idx[ti : ti + kp], o_idx[oi : oi + k - kp]])
        lab = torch.cat([torch.ones(kp, dtype=torch.int64), torch.zeros(k - kp, dtype=torch.int64)])
        ti, oi = ti + kp, oi + k - kp
        order = torch.randperm(k, generator=g)
        instances[b, :k] = ds.images[chosen[order]]
        inst_labels[b, :k] = lab[order]
        mask[b, :k] = True
    return BagTask(instances, mask, positive.to(torch.int64), inst_labels)


@dataclass(eq=False)
class MultiTask:
    """Multi-task targets: ``labels (N,)`` shape class, ``colours (N,)`` palette index and
    ``masks (N, H, W)`` bool object masks."""

    images: Tensor
    labels: Tensor
    colours: Tensor
    masks: Tensor
    num_colours: int


def multitask(
    n: int = 512,
    *,
    split: str = "train",
    seed: int = 0,
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> MultiTask:
    """Shape class (10), colour (8 palette entries) and the object's segmentation mask of each image."""
    _check_count("n", n)
    ds = load_shapes10(split, n=n, seed=seed, data_dir=data_dir, difficulty=difficulty)
    assert ds.masks is not None and ds.attributes is not None  # shapes10 always carries both
    return MultiTask(ds.images, ds.labels, ds.attributes["colour"], ds.masks, len(PALETTE))


@dataclass(eq=False)
class LocalisationTask:
    """Image labels for training and object masks ``(N, H, W)`` for evaluation; ``scales (N,)`` the zoom
    applied to each image (1 = none)."""

    images: Tensor
    labels: Tensor
    masks: Tensor
    scales: Tensor


def localisation_task(
    n: int = 512,
    *,
    split: str = "train",
    seed: int = 0,
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> LocalisationTask:
    """Weakly supervised localisation: train on ``labels``, score CAM/OAA maps against ``masks`` (mIoU)."""
    _check_count("n", n)
    ds = load_shapes10(split, n=n, seed=seed, data_dir=data_dir, difficulty=difficulty)
    assert ds.masks is not None
    return LocalisationTask(ds.images, ds.labels, ds.masks, torch.ones(n))


def _place(
    images: Tensor, masks: Tensor, scales: Tensor, corners: Tensor, canvas: Tensor
) -> tuple[Tensor, Tensor]:
    """Shrink each image (and its mask) by ``scales[i]`` and paste it at ``corners[i]`` on ``canvas[i]``."""
    out, out_masks = canvas.clone(), torch.zeros_like(masks)
    side = images.shape[-1]
    for i in range(images.shape[0]):
        s = max(2, round(side * float(scales[i])))
        img = F.interpolate(
            images[i : i + 1], size=(s, s), mode="bilinear", antialias=True, align_corners=False
        )
        msk = F.interpolate(masks[i : i + 1, None].float(), size=(s, s), mode="bilinear", antialias=True)
        r, c = int(corners[i, 0]), int(corners[i, 1])
        out[i, :, r : r + s, c : c + s] = img[0].clamp(0, 1)
        out_masks[i, r : r + s, c : c + s] = msk[0, 0] >= 0.5
    return out, out_masks


def scale_task(
    n: int = 512,
    *,
    split: str = "train",
    seed: int = 0,
    scale_range: tuple[float, float] = (0.25, 1.0),
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> LocalisationTask:
    """The shapes10 image zoomed out by a factor ``s ~ U(scale_range)`` and pasted at a random position on
    a canvas of its own mean colour: objects from 1/4 to full size (with the masks transformed alike)."""
    _check_count("n", n)
    lo, hi = scale_range
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range}")
    ds = load_shapes10(split, n=n, seed=seed, data_dir=data_dir, difficulty=difficulty)
    assert ds.masks is not None
    g = _generator(seed, split, 23)
    scales = lo + (hi - lo) * torch.rand(n, generator=g)
    side = ds.images.shape[-1]
    sizes = (side * scales).round().clamp(min=2)
    corners = (torch.rand(n, 2, generator=g) * (side - sizes[:, None] + 1)).floor()
    canvas = ds.images.mean(dim=(2, 3), keepdim=True).expand_as(ds.images)
    images, masks = _place(ds.images, ds.masks, scales, corners, canvas)
    return LocalisationTask(images, ds.labels, masks, scales)


def cluttered_task(
    n: int = 512,
    *,
    split: str = "train",
    seed: int = 0,
    scale: float = 0.5,
    clutter: int = 4,
    data_dir: str | Path | None = None,
    difficulty: float = 1.0,
) -> LocalisationTask:
    """Translated, cluttered objects (the cluttered-MNIST protocol of the spatial transformer paper): the
    image shrunk by ``scale`` and pasted anywhere in the frame, over ``clutter`` random 8x8 crops of other
    images on a dark background."""
    _check_count("n", n)
    _check_count("clutter", clutter, 0)
    if not 0.1 <= scale <= 1.0:
        raise ValueError(f"scale must lie in [0.1, 1], got {scale!r}")
    ds = load_shapes10(split, n=n, seed=seed, data_dir=data_dir, difficulty=difficulty)
    assert ds.masks is not None
    g = _generator(seed, split, 37)
    side = ds.images.shape[-1]
    canvas = torch.full_like(ds.images, 0.1)
    patch = 8
    for _ in range(clutter):
        src = torch.randint(0, n, (n,), generator=g)
        at = torch.randint(0, side - patch + 1, (n, 4), generator=g)
        for i in range(n):
            r, c, sr, sc = (int(v) for v in at[i])
            canvas[i, :, r : r + patch, c : c + patch] = ds.images[
                src[i], :, sr : sr + patch, sc : sc + patch
            ]
    s = max(2, round(side * scale))
    corners = torch.randint(0, side - s + 1, (n, 2), generator=g)
    scales = torch.full((n,), s / side)
    images, masks = _place(ds.images, ds.masks, scales, corners, canvas)
    return LocalisationTask(images, ds.labels, masks, scales)
