"""The ``multitask`` task: class, colour and mask heads, the multi-task attention network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from certify.radius import format_eps
from lipnet.catalogue import data as task_data
from lipnet.catalogue.metrics import certified_per_task_accuracy, certified_pixel_fraction, mean_iou
from lipnet.catalogue.networks import MultiTaskBaseline, MultiTaskNetwork
from lipnet.catalogue.tasks.base import (
    BASELINE,
    CatalogueTask,
    Evaluation,
    State,
    TaskData,
    TaskSettings,
    attack_accuracy,
    attention_class,
    half_masks,
    labelled,
)
from lipnet.losses import DynamicWeightAverage, TauBCE, TauCrossEntropy

__all__ = ["MultitaskTask"]


def _multitask_network(model: nn.Module) -> MultiTaskNetwork:
    """The network :meth:`MultitaskTask.build` made (the task's methods receive it typed as a plain
    module)."""
    return cast(MultiTaskNetwork, model)


class MultitaskTask(CatalogueTask):
    """Class (10) + colour (8) + segmentation mask (MTAN, Liu, Johns & Davison, CVPR 2019).

    Both networks share the stem (half resolution); the body is the MTAN (task-specific attention over
    a shared stack, trained with Dynamic Weight Average) or the same stack without attention and equal
    task weights (the paper's baseline weighting). The class task reads 4 maps through a dense layer,
    colour is pooled from 8 maps, the mask is one map (:class:`MultiTaskNetwork`). Losses: tau-CE for
    class and colour, tau-BCE per pixel for the mask (at ``16 x 16``). Per-task metrics: class and
    colour accuracy, mask pixel accuracy and mIoU; the task metric is the mean of the three
    accuracies. Per-task certificates with each task's own bound (:meth:`MultiTaskNetwork.task_bounds`):
    class and colour ``margin / (sqrt 2 L_t)`` (:func:`certify.radius.certified_radius`), mask pixels
    ``|p_j| / L_mask`` (:func:`certify.radius.binary_radius`, the certified-pixel fraction), both less the
    forward pass's rounding allowance at the images' norms. The table's clean, certified and PGD columns
    are the class task's.
    """

    name = "multitask"
    metric = "mean task acc"
    class_maps = 4
    METHODS = (BASELINE, "MultiTaskAttentionNetwork")

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        t = task_data.multitask(n, split=split, seed=seed, difficulty=difficulty)
        ds = labelled(t.images, t.labels, "shapes10_multitask")
        return TaskData(ds, (t.colours, half_masks(t.masks).float()), info={"colours": t.num_colours})

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        heads = (self.class_maps, train.info["colours"], 1)
        if method == BASELINE:
            return MultiTaskNetwork(w, MultiTaskBaseline(w, heads, depth=2), k, self.class_maps)
        cls: Any = attention_class(method)
        return MultiTaskNetwork(w, cls(w, w, heads, depth=2, normalize=True), k, self.class_maps)

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        state: State = {
            "ce": TauCrossEntropy(settings.tau),
            "bce": TauBCE(settings.tau),
            "epoch": [],
        }
        if method != BASELINE:
            state["dwa"] = DynamicWeightAverage(3)
        return state

    def loss(self, method: str, model: nn.Module, batch: Sequence[Tensor], state: State) -> Tensor:
        x, y, colour, mask = batch
        cls, col, seg = _multitask_network(model).task_logits(x)
        losses = torch.stack(
            [state["ce"](cls, y), state["ce"](col, colour), state["bce"](seg.flatten(1), mask.flatten(1))]
        )
        state["epoch"].append(losses.detach())
        return state["dwa"](losses) if "dwa" in state else losses.sum()

    def end_epoch(self, method: str, state: State) -> None:
        if "dwa" in state and state["epoch"]:
            state["dwa"].record_epoch(torch.stack(state["epoch"]).mean(dim=0))
        state["epoch"] = []

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        ds = test.dataset
        colour, mask = test.targets
        net = _multitask_network(model)
        with torch.no_grad():
            outs = [net.task_logits(xb) for xb in ds.images.split(250)]
        cls, col, seg = (torch.cat(parts) for parts in zip(*outs, strict=True))
        bounds = net.task_bounds(ds.input_shape)
        accs = {
            "class": float((cls.argmax(1) == ds.labels).double().mean()),
            "colour": float((col.argmax(1) == colour).double().mean()),
            "mask_pixel": float(((seg > 0) == mask.bool()).double().mean()),
        }
        per_task: dict[str, dict[str, float]] = {}
        norms = ds.images.flatten(1).double().norm(dim=1)  # the scale of the forward pass's rounding
        for e in eps:
            c = certified_per_task_accuracy(
                {"class": cls, "colour": col},
                {"class": ds.labels, "colour": colour},
                {"class": bounds["class"], "colour": bounds["colour"]},
                e,
                input_norms=norms,
            )
            c["mask_pixel"] = certified_pixel_fraction(seg, mask, bounds["mask"], e, input_norms=norms)
            per_task[format_eps(e)] = {k: round(v, 4) for k, v in c.items()}
        details = {
            "accuracy": {k: round(v, 4) for k, v in accs.items()},
            "mask_mIoU": round(mean_iou(seg > 0, mask.bool()), 4),
            "certified": per_task,
            "task_bounds": {k: round(v, 6) for k, v in bounds.items()},
            "task_weights": []
            if "dwa" not in state
            else [round(float(v), 4) for v in state["dwa"].weights()],
        }
        cert = {k: v["class"] for k, v in per_task.items()}
        robust = attack_accuracy(model, ds.images, ds.labels, eps[0], attack)
        return Evaluation(
            self.metric, sum(accs.values()) / 3, accs["class"], cert, robust, bounds["class"], details
        )
