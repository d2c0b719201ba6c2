"""The in-memory image dataset every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ImageDataset"]


@dataclass(eq=False)
class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images and labels held as two tensors (a torch ``Dataset`` too).

    Attributes:
        images: float32 ``(N, C, H, W)`` with values in ``[0, 1]``.
        labels: int64 ``(N,)`` with values in ``[0, num_classes)``.
        num_classes: number of classes.
        classes: the class names, ``len(classes) == num_classes``.
        name: the dataset's registry name (``"cifar10"``, ...).
        masks: optional bool ``(N, H, W)``: the pixels of the labelled object (procedural datasets).
        attributes: optional per-sample tensors whose first dimension is ``N`` (procedural datasets:
            colour index, size, position, rotation).

    The constructor checks all of the above and raises ``ValueError`` / ``TypeError`` naming the
    offending field, so a malformed dataset fails where it is built rather than deep inside training.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    classes: list[str]
    name: str
    masks: Tensor | None = None
    attributes: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        where = f"ImageDataset {self.name!r}"
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise TypeError(
                f"{where}: images must be a float32 (N, C, H, W) tensor, got {_describe(self.images)}"
            )
        if not isinstance(self.labels, Tensor) or self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise TypeError(
                f"{where}: labels must be an int64 tensor of shape (N,), got {_describe(self.labels)}"
            )
        n = self.images.shape[0]
        if self.labels.shape[0] != n:
            raise ValueError(f"{where}: {n} images but {self.labels.shape[0]} labels")
        if self.num_classes < 1 or len(self.classes) != self.num_classes:
            raise ValueError(
                f"{where}: num_classes={self.num_classes} but {len(self.classes)} class names were given"
            )
        if n > 0:
            lo, hi = torch.aminmax(self.images)
            # Written as a negation so that NaN (for which every comparison is False) is caught too.
            if not (lo.item() >= 0.0 and hi.item() <= 1.0):
                raise ValueError(
                    f"{where}: image values must lie in [0, 1], found [{lo.item()}, {hi.item()}]"
                )
            lab_lo, lab_hi = torch.aminmax(self.labels)
            if lab_lo.item() < 0 or lab_hi.item() >= self.num_classes:
                found = f"[{lab_lo.item()}, {lab_hi.item()}]"
                raise ValueError(f"{where}: labels must lie in [0, {self.num_classes}), found {found}")
        if self.masks is not None:
            expected = (n, *self.images.shape[2:])
            if self.masks.dtype != torch.bool or tuple(self.masks.shape) != expected:
                raise TypeError(
                    f"{where}: masks must be a bool tensor of shape {expected}, got {_describe(self.masks)}"
                )
        for key, value in (self.attributes or {}).items():
            if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] != n:
                raise TypeError(
                    f"{where}: attribute {key!r} must be a tensor with first dimension {n}, "
                    f"got {_describe(value)}"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, index: slice | Tensor) -> ImageDataset:
        """A new dataset holding the selected samples (masks and attributes follow the selection)."""
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            num_classes=self.num_classes,
            classes=list(self.classes),
            name=self.name,
            masks=None if self.masks is None else self.masks[index],
            attributes=None if self.attributes is None else {k: v[index] for k, v in self.attributes.items()},
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
