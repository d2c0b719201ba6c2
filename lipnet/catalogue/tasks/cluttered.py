"""The ``cluttered`` task: objects over clutter, bounded spatial transformers and the soft glimpse."""

from __future__ import annotations

from typing import Any

from torch import nn

from lipnet.catalogue import data as task_data
from lipnet.catalogue.networks import image_network
from lipnet.catalogue.tasks.base import BASELINE, TaskData, TaskSettings, attention_class, labelled
from lipnet.catalogue.tasks.classification import ClassificationTask

__all__ = ["ClutteredTask"]


class ClutteredTask(ClassificationTask):
    """Objects at 3/4 size anywhere over clutter (spatial transformer, Jaderberg et al., NeurIPS 2015).

    Three bounded spatial modules; each pays ``price = 0.5`` for its input-dependent part (its
    localisation net or score vector is normalised to that price: ``transform_bound`` /
    ``attention_bound``), and each projects its input onto the ball of radius ``R`` = the median norm of
    the training images (the identity on half of the images; the late feature maps, norm ~4.5 once
    trained, stay inside it):

    * a translation STN and an RA-CNN zoom (Fu et al., CVPR 2017; scale in ``[3/4, 1]``, the objects'
      size) on the last ``(2w, 8, 8)`` feature map, before the dense layer, which is not translation
      invariant; a shift of at most one pixel there moves the content by up to four image pixels (the
      STN paper inserts its module anywhere in a network). Raw bounds ``1 + 0.5`` and
      ``Phi(3/4) + 0.5 = 2`` (the zoomed sampling reads pixels up to 1.5 times);
    * the soft glimpse (the expected ``28 x 28`` glimpse, stride 2, under a softmax over its 9
      locations: the Lipschitz relaxation of RAM/DRAM's hard glimpses) on the image, the backbone
      reading the glimpse; raw bound at most ``1 + 0.5``.

    The price caps what the input can change: for two inputs in the ball the shift differs by at most
    ``0.5 ||U - U'|| / (2 sqrt 2 R) <= 0.35`` map pixels, and the glimpse scores (on ``32 x 32``
    images) by at most 0.47, so each module is close to an input-independent transform (the
    localisation bias; for the glimpse, nearly the mean of its 9 crops) plus a small input-dependent
    part. Left unnormalised, the weights grow under Adam within an epoch, the raw bounds reach
    75-1000, the normalised output shrinks by as much and no row learns. Certificate as in
    classification.
    """

    name = "cluttered"
    scale = 0.75
    METHODS = (BASELINE, "BoundedTranslation", "BoundedZoom", "SoftGlimpse")
    glimpse = 28
    glimpse_stride = 2
    #: Lipschitz price of each module's input-dependent part (the term added to its input-independent bound).
    price = 0.5
    #: Largest shift on the ``8 x 8`` map, in its pixels.
    max_shift = 1.0

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        t = task_data.cluttered_task(n, split=split, seed=seed, scale=self.scale, difficulty=difficulty)
        norms = t.images.flatten(1).norm(dim=1)
        return TaskData(
            labelled(t.images, t.labels, "shapes10_cluttered"), info={"radius": float(norms.median())}
        )

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        c, side, _ = train.input_shape
        if method == BASELINE:
            return image_network(k, w, side=side)
        cls: Any = attention_class(method)
        r = train.info["radius"]
        if method == "SoftGlimpse":
            front = cls(
                c,
                self.glimpse,
                stride=self.glimpse_stride,
                radius=r,
                normalize=True,
                attention_bound=self.price,
            )
            return image_network(k, w, side=side, front=front, front_side=self.glimpse)
        extra = {"min_scale": self.scale} if method == "BoundedZoom" else {}
        late = cls(
            2 * w,
            side // 4,
            max_shift=self.max_shift,
            radius=r,
            normalize=True,
            transform_bound=self.price,
            **extra,
        )
        return image_network(k, w, side=side, late=late)
