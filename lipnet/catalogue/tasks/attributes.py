"""The ``attributes`` task: imbalanced binary attributes, multi-scale attention aggregation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from certify.attacks import empirical_robust_accuracy
from certify.bounds import lipschitz_bound, module_bound
from certify.radius import format_eps
from lipnet.activations import GroupSort
from lipnet.attention import MultiScaleAttentionAggregation
from lipnet.catalogue import data as task_data
from lipnet.catalogue.metrics import attribute_f1, certified_attribute_accuracy, mean_accuracy
from lipnet.catalogue.networks import image_network, stem
from lipnet.catalogue.tasks.base import (
    BASELINE,
    CatalogueTask,
    Evaluation,
    State,
    TaskData,
    TaskSettings,
    attention_class,
    batched_logits,
    labelled,
)
from lipnet.layers import BjorckConv2d
from lipnet.losses import AttentionVariance, WeightedFocal
from lipnet.pooling import ScaledL2NormPool2d

__all__ = ["AttributesTask"]


def _layers(model: nn.Module) -> nn.Sequential:
    """The network :meth:`AttributesTask.build` made, an ``nn.Sequential`` for every method (the task's
    methods receive it typed as a plain module)."""
    return cast(nn.Sequential, model)


def _aggregation(model: nn.Module) -> MultiScaleAttentionAggregation:
    """The last module of the network :meth:`AttributesTask.build` made for the aggregation method."""
    return cast(MultiScaleAttentionAggregation, _layers(model)[-1])


class AttributesTask(CatalogueTask):
    """Imbalanced attributes, priors 2%-50% (Sarafianos et al., ECCV 2018), weighted focal loss.

    Multi-scale attention aggregation replaces the backbone's dense layer: ``stem conv(w, w) GS pool2``
    then the module's branches at scales 1, 1/2, 1/4 of that ``8 x 8`` map and its primary branch,
    mean-aggregated (at ``16 x 16`` the module's per-forward exact bound costs 20 times more); trained
    with the weighted focal loss on the aggregate and the attention-variance loss on every branch (one
    history per branch), as in the paper. Metrics: mA (task metric), example-based F1, per-attribute
    accuracy and per-attribute certified accuracy, radius ``|f_c| / L_c`` less the forward pass's rounding
    allowance ``> eps`` (:func:`certify.radius.binary_radius` with the images' norms; ``L_c`` the bound of
    logit ``c``: the whole network's ``L`` for the baseline, the bound of the layers before the module
    times the module's per-attribute bound for the aggregation); PGD per attribute on the two-logit model
    ``(-f_c, f_c)``. The table's clean and
    certified accuracies are means over the attributes.
    """

    name = "attributes"
    metric = "mA"
    METHODS = (BASELINE, "MultiScaleAttentionAggregation")

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        t = task_data.attribute_task(n, split=split, seed=seed, difficulty=difficulty)
        ds = labelled(t.images, t.labels, "shapes10_attributes")
        return TaskData(ds, (t.targets, torch.arange(n)), info={"names": t.names})

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        a, w = train.targets[0].shape[1], settings.width
        if method == BASELINE:
            return image_network(a, w)
        cls: Any = attention_class(method)
        block = [BjorckConv2d(w, w, 3, padding=1), GroupSort(2), ScaledL2NormPool2d(2)]
        return nn.Sequential(*stem(w), *block, cls(w, a, scales=3, normalize=True))

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        # Frequencies measured on the training set: the designed priors are the expectation only.
        priors = train.targets[0].mean(dim=0).double()
        state: State = {"focal": WeightedFocal(priors, gamma=2.0, tau=settings.tau)}
        if method != BASELINE:
            n, branches = len(train.dataset), _aggregation(model).scales + 1
            state["variance"] = [
                AttentionVariance(priors, num_samples=n, tau=settings.tau) for _ in range(branches)
            ]
        return state

    def loss(self, method: str, model: nn.Module, batch: Sequence[Tensor], state: State) -> Tensor:
        x, _, t, index = batch
        if method == BASELINE:
            return state["focal"](model(x), t)
        features = _layers(model)[:-1](x)
        branches = _aggregation(model).branch_logits(features)
        f = torch.stack(branches, dim=1).mean(dim=1)
        variance = sum(v(b, t, index) for v, b in zip(state["variance"], branches, strict=True)) / len(
            branches
        )
        return state["focal"](f, t) + variance

    def attribute_bounds(self, method: str, model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
        """Sound float64 bound of each attribute logit."""
        if method == BASELINE:
            lip = lipschitz_bound(model, input_shape)
            head = cast(nn.Linear, _layers(model)[-1])  # image_network ends with its dense layer
            return torch.full((head.out_features,), lip, dtype=torch.float64)
        first = module_bound(_layers(model)[:-1], input_shape)
        _, h, w = input_shape
        aggregation = _aggregation(model)
        inner = (aggregation.channels, h // 4, w // 4)
        return first * aggregation.attribute_lipschitz_bounds(inner)

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        ds, t = test.dataset, test.targets[0]
        logits = batched_logits(model, ds.images)
        bounds = self.attribute_bounds(method, model, ds.input_shape)
        per_attr = ((logits > 0) == t.bool()).double().mean(dim=0)
        norms = ds.images.flatten(1).double().norm(dim=1)  # the scale of the forward pass's rounding
        cert, per_eps = {}, {}
        for e in eps:
            values = certified_attribute_accuracy(logits, t, bounds, e, input_norms=norms)
            cert[format_eps(e)] = sum(values) / len(values)
            per_eps[format_eps(e)] = [round(v, 4) for v in values]
        robust = None
        if attack["n"]:
            n = min(int(attack["n"]), len(ds))
            each = [
                empirical_robust_accuracy(
                    _AttributeAsPair(model, c),
                    ds.images[:n],
                    t[:n, c].long(),
                    eps[0],
                    attack=attack["name"],
                    steps=int(attack["steps"]),
                )
                for c in range(t.shape[1])
            ]
            robust = sum(each) / len(each)
        details = {
            "attributes": test.info["names"],
            "F1": round(attribute_f1(logits, t), 4),
            "clean": [round(float(v), 4) for v in per_attr],
            "certified": per_eps,
            "attribute_bounds": [round(float(b), 6) for b in bounds],
        }
        return Evaluation(
            "mA",
            mean_accuracy(logits, t),
            float(per_attr.mean()),
            cert,
            robust,
            lipschitz_bound(model, ds.input_shape),
            details,
        )


class _AttributeAsPair(nn.Module):
    """``x -> (-f_c(x), f_c(x))``: attribute ``c`` as a two-class model, so class-label attacks apply."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: Tensor) -> Tensor:
        f = self.model(x)[:, self.index]
        return torch.stack([-f, f], dim=1)
