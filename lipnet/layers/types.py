"""Type aliases shared by the layer modules' signatures (one definition, so they cannot drift apart)."""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
from torch import nn

__all__ = ["Device", "Padding", "PaddingMode", "PlainLayer", "Size2"]

#: Where a layer's parameters are created, as ``nn.Conv2d`` / ``nn.Linear`` accept it.
Device = torch.device | str | None
#: A kernel size, stride or dilation: one int for both dimensions, or ``(height, width)``.
Size2 = int | tuple[int, int]
#: ``nn.Conv2d``'s padding: ``"same"`` / ``"valid"``, one int, or ``(height, width)``.
Padding = str | int | tuple[int, int]
#: ``nn.Conv2d``'s padding modes (each layer says which it accepts and why).
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
#: The plain torch layer a functional constraint (``aol(layer)``, ``bjorck(layer)``) attaches to and returns.
PlainLayer = TypeVar("PlainLayer", nn.Conv2d, nn.Linear)
