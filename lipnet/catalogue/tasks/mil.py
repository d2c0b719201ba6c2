"""The ``mil`` task: multiple-instance bags, attention and LSE poolings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lipnet.activations import GroupSort
from lipnet.attention import LossAttentionMIL
from lipnet.catalogue import data as task_data
from lipnet.catalogue.metrics import bag_accuracy, instance_auc
from lipnet.catalogue.networks import BagNetwork, CentredPooling, InstanceMean, dense_head, stem
from lipnet.catalogue.tasks.base import (
    BASELINE,
    CatalogueTask,
    Evaluation,
    State,
    TaskData,
    TaskSettings,
    attention_class,
    batched_logits,
    classification_scores,
)
from lipnet.data import ImageDataset
from lipnet.layers import BjorckConv2d, BjorckLinear
from lipnet.losses import MILInstance, TauCrossEntropy
from lipnet.pooling import ScaledL2NormPool2d

__all__ = ["MILTask"]


def _bag_network(model: nn.Module) -> BagNetwork:
    """The network :meth:`MILTask.build` made (the task's methods receive it typed as a plain module)."""
    return cast(BagNetwork, model)


class MILTask(CatalogueTask):
    """Multiple-instance bags of 4 images, positive iff one is a ring (Ilse et al., ICML 2018 protocol).

    A bag is its instances stacked on channels, ``(4 * 3, 32, 32)``; every instance goes through the
    same encoder (the backbone, its dense layers ending in 32 features), then a MIL pooling and a 2-class bag
    classifier (:class:`~lipnet.catalogue.networks.BagNetwork`). Methods: mean pooling (baseline), LSE
    pooling of the instance logits, soft attention pooling of the instance features, and loss-based
    attention (Shi et al., AAAI 2020) trained with its instance regulariser (:class:`MILInstance`,
    ``lambda = 2``). Bag sizes are fixed (no padding: the MIL modules have no mask argument).

    Both attention poolings project onto balls of radius ``rho = 4``, above the norms their values
    take (trained: deviations from the bag mean ~0.75, instance logits ~0.5; none was clipped on the
    test bags), so the projection only guards the bound; the attention's price is
    ``rho Lip(scores) / sqrt 2``. Soft attention pools the deviations from the bag mean
    (:class:`CentredPooling`: the same weighted sum with the ball centred on the bag mean; centred on
    the origin, the encoder's common offset grows to norm ~30, every instance is projected onto the
    sphere and the pooled output is nearly constant). Loss-based attention has ``beta = sqrt 2 / rho``,
    so its raw bound is ``||W|| (1 + beta rho / sqrt 2) = 2 ||W||`` (with ``beta = rho = 1`` the
    features drift the same way and the output is nearly constant too).
    Metrics: bag accuracy (task metric, clean accuracy), instance AUC of the attention weights (or of
    the instance margins without attention), certified bag accuracy ``margin / (sqrt 2 L)`` with ``L``
    the whole network's bound on a bag (:func:`certify.certify`: a bag network has no linear head to
    split off), PGD on whole bags.
    """

    name = "mil"
    metric = "bag accuracy"
    METHODS = (BASELINE, "LSEPooling", "SoftAttentionPooling", "LossAttentionMIL")
    bag_size = 4
    # "ring", the class the baseline classifier recognises best: the bag label must be learnable.
    target = 1
    features = 32
    #: Radius of the attention poolings' balls (values: centred instance features, instance logits).
    radius = 4.0

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        # n counts instances, so that a task's budget is in images whatever the task.
        k = self.bag_size
        bags = task_data.mil_bags(
            max(2, n // k),
            split=split,
            seed=seed,
            target=self.target,
            mean_size=k,
            std_size=0.0,
            max_size=k,
            difficulty=difficulty,
        )
        images = bags.instances.flatten(1, 2)
        ds = ImageDataset(images, bags.bag_labels, 2, ["negative", "positive"], "shapes10_bags")
        return TaskData(ds, (bags.instance_labels,))

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, f = settings.width, self.features
        encoder = nn.Sequential(
            *stem(w),
            BjorckConv2d(w, 2 * w, 3, padding=1),
            GroupSort(2),
            ScaledL2NormPool2d(2),
            nn.Flatten(),
            *dense_head(2 * w * 64, f),
        )
        cls: Any = attention_class(method) if method != BASELINE else None
        if method == BASELINE:
            aggregator: nn.Module = nn.Sequential(InstanceMean(), BjorckLinear(f, 2))
        elif method == "LSEPooling":
            aggregator = nn.Sequential(BjorckLinear(f, 2), cls())
        elif method == "SoftAttentionPooling":
            pool = CentredPooling(cls(f, radius=self.radius, normalize=True))
            aggregator = nn.Sequential(pool, BjorckLinear(f, 2))
        else:
            beta = math.sqrt(2.0) / self.radius
            aggregator = cls(f, 2, beta=beta, radius=self.radius, normalize=True)
        return BagNetwork(encoder, aggregator, feature_dim=f)

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        state: State = {"ce": TauCrossEntropy(settings.tau)}
        if method == "LossAttentionMIL":
            state["instance"] = MILInstance(tau=settings.tau, lam=2.0)
        return state

    def loss(self, method: str, model: nn.Module, batch: Sequence[Tensor], state: State) -> Tensor:
        x, y = batch[0], batch[1]
        if method != "LossAttentionMIL":
            return state["ce"](model(x), y)
        net = _bag_network(model)
        aggregator = cast(LossAttentionMIL, net.aggregator)  # build's aggregator for this method
        bag, alpha, instance = aggregator.with_attention(net.features(x))
        return state["ce"](bag, y) + state["instance"](instance, alpha, y)

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        clean, cert, robust, lip = classification_scores(model, test, eps, attack)
        ds = test.dataset
        with torch.no_grad():
            scores = torch.cat([_bag_network(model).instance_scores(xb) for xb in ds.images.split(100)])
            logits = batched_logits(model, ds.images)
        details = {
            "instance_AUC": round(instance_auc(scores, test.targets[0]), 4),
            "bag_accuracy": round(bag_accuracy(logits, ds.labels), 4),
            "positive_bags": round(float(ds.labels.double().mean()), 4),
        }
        return Evaluation(self.metric, bag_accuracy(logits, ds.labels), clean, cert, robust, lip, details)
