"""The ``scale`` task: objects zoomed out at random positions, attention to scale."""

from __future__ import annotations

from lipnet.catalogue import data as task_data
from lipnet.catalogue.tasks.base import BASELINE, TaskData, labelled
from lipnet.catalogue.tasks.classification import ClassificationTask

__all__ = ["ScaleTask"]


class ScaleTask(ClassificationTask):
    """Objects zoomed out by 1x to 2.5x at random positions (attention to scale, Chen et al., CVPR 2016).

    Attention to scale fuses a shared trunk's outputs at scales 1 and 1/4 of the first block's
    feature map with a per-pixel softmax. Certificate as in classification.
    """

    name = "scale"
    scale_range = (0.4, 1.0)
    METHODS = (BASELINE, "AttentionToScale")

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        t = task_data.scale_task(
            n, split=split, seed=seed, scale_range=self.scale_range, difficulty=difficulty
        )
        return TaskData(labelled(t.images, t.labels, "shapes10_scale"))
