"""Random crop (zero padding) and horizontal flip of a whole batch at once, in plain torch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Augment"]


class Augment:
    """Per-sample random crop with zero padding and random horizontal flip, applied to a batch.

    Equivalent to torchvision's ``RandomCrop(size, padding=crop_padding)`` followed by
    ``RandomHorizontalFlip()`` on every sample, but done as one gather on the batch's device. The
    random draws (one offset pair and one coin per sample) are made on the CPU with the given
    ``torch.Generator``, so the same generator state gives the same augmentation on every device.

    Args:
        crop_padding: zero padding on each side before cropping back to the input size; 0 disables
            the crop.
        flip: flip each sample horizontally with probability 1/2.
    """

    def __init__(self, crop_padding: int = 4, flip: bool = True) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.flip = flip

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, flip={self.flip})"

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``images`` of shape ``(B, C, H, W)``; ``generator`` (a CPU generator) drives the draws.

        Without a generator torch's global CPU generator is used.
        """
        if images.ndim != 4:
            raise ValueError(
                f"Augment expects a batch of shape (B, C, H, W), got shape {tuple(images.shape)}"
            )
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                f"Augment draws on the CPU; pass a CPU torch.Generator, not one on {generator.device}"
            )
        b, c, h, w = images.shape
        p = self.crop_padding
        shift = torch.randint(0, 2 * p + 1, (2, b), generator=generator) - p
        flips = (
            torch.randint(0, 2, (b,), generator=generator).bool()
            if self.flip
            else torch.zeros(b, dtype=torch.bool)
        )
        device = images.device
        shift, flips = shift.to(device), flips.to(device)
        # Output pixel (i, j) reads input pixel (i + dy, j' + dx), with j' = j, or w - 1 - j when flipped
        # (crop first, then flip the crop, as torchvision does); reads outside the input are the padding.
        ar_h = torch.arange(h, device=device)
        ar_w = torch.arange(w, device=device)
        rows = ar_h[None, :] + shift[0, :, None]
        cols = torch.where(flips[:, None], (w - 1) - ar_w[None, :], ar_w[None, :]) + shift[1, :, None]
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        flat = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
        gathered = images.reshape(b, c, h * w).gather(2, flat.reshape(b, 1, h * w).expand(b, c, h * w))
        return torch.where(inside[:, None], gathered.reshape(b, c, h, w), images.new_zeros(()))
