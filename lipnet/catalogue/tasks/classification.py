"""The ``classification`` task: ``shapes10`` with feature-map and token attention (tau-CE)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lipnet.catalogue.networks import PixelTokens, image_network
from lipnet.catalogue.tasks.base import (
    BASELINE,
    CatalogueTask,
    TaskData,
    TaskSettings,
    attention_class,
    shapes_data,
)

__all__ = ["ClassificationTask"]


def _middle(cls_name: str, width: int) -> nn.Module:
    cls: Any = attention_class(cls_name)
    if cls_name in ("SqueezeExcitation", "CBAM", "ResidualAttention"):
        return cls(width, normalize=True)
    if cls_name == "FeedbackGating":
        return cls(width, width, normalize=True)
    if cls_name == "AttentionToScale":
        # Scales 1 and 1/4: the module normalises by its bound in every forward, and at scale 1/2 the
        # exact dense norm of the 8 x 8 trunk (1024 x 1024) would make a step six times slower.
        return cls(width, width, hidden=8, scales=(1.0, 0.25), normalize=True)
    raise ValueError(f"no feature-map placement for {cls_name!r}")


class ClassificationTask(CatalogueTask):
    """``shapes10`` classification, tau-CE: feature-map attention between the backbone's two blocks.

    Token attention (bounded-token, L2 multi-head, memory) treats the ``8 x 8`` pixels of the last
    feature map as tokens (:class:`~lipnet.catalogue.networks.PixelTokens`; two heads, in a residual
    average ``(x + A(x)) / 2``, except the memory attention, which is residual itself).
    Certificate: :func:`certify.certify`'s, the last-layer rule ``min_j margin_j / (L_body ||w_y - w_j||)``
    (every network here ends in a dense layer), at least ``margin / (sqrt 2 L)``.
    """

    name = "classification"
    metric = "accuracy"
    METHODS: tuple[str, ...] = (  # annotated like CatalogueTask's: subclasses list other methods
        BASELINE,
        "SqueezeExcitation",
        "CBAM",
        "ResidualAttention",
        "FeedbackGating",
        "BoundedDotProductAttention",
        "L2MultiheadAttention",
        "MemoryAttention",
    )

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        return shapes_data(split, n, seed, difficulty)

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        if method == BASELINE:
            return image_network(k, w)
        cls: Any = attention_class(method)
        if method in ("BoundedDotProductAttention", "L2MultiheadAttention"):
            return image_network(k, w, late=PixelTokens(cls(2 * w, heads=2, normalize=True), residual=True))
        if method == "MemoryAttention":
            # Already residual (x - t W^T softmax(.)), so no averaging around it.
            return image_network(k, w, late=PixelTokens(cls(2 * w, slots=16), residual=False))
        return image_network(k, w, middle=_middle(method, w))
