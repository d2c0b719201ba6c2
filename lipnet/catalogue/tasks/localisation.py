"""The ``localisation`` task: weakly supervised localisation, CAM and the online attention accumulator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from certify.radius import certified_accuracy, format_eps
from lipnet.catalogue import data as task_data
from lipnet.catalogue.metrics import mean_iou
from lipnet.catalogue.networks import CAMNetwork, image_network
from lipnet.catalogue.tasks.base import (
    BASELINE,
    CatalogueTask,
    Evaluation,
    State,
    TaskData,
    TaskSettings,
    attention_class,
    classification_scores,
    half_masks,
    labelled,
    one_hot_targets,
)
from lipnet.losses import OAAHybrid, TauCrossEntropy

__all__ = ["LocalisationTask"]


def _cam_network(model: nn.Module) -> CAMNetwork:
    """The network :meth:`LocalisationTask.build` made for a method other than the baseline (the task's
    methods receive it typed as a plain module)."""
    return cast(CAMNetwork, model)


class LocalisationTask(CatalogueTask):
    """Weakly supervised localisation: trained on image labels, scored on the object masks.

    CAM (Zhou et al., CVPR 2016) with a fixed, running normalisation ``kappa`` (:class:`CAMHead`) on
    half-resolution features; OAA (Jiang et al., ICCV 2019) is the same network with the online
    attention accumulator, scored as in the paper on the accumulated maps of the *training* images
    (training-time state: nothing to certify); OAA+ adds the integral attention model trained with the
    hybrid loss on the accumulated maps (features detached, so the classifier is the same) and is
    scored on the test images. The baseline is the plain classifier; its map is the feature norm
    after the first block, foreground where above its image mean (an attention-free reference).
    All maps are at ``16 x 16`` against the masks at that size, for the true class. Metrics: mIoU
    (task metric), classification accuracy and its certificates (:func:`certify.certify`), and the
    certified-pixel fraction: pixels whose foreground decision (CAM: attention ``>= 0.5``; OAA+:
    logit ``> 0``) is right and certified, radius ``|score - threshold| / (L_pixel L_features) > eps``.
    """

    name = "localisation"
    metric = "mIoU"
    METHODS = (BASELINE, "CAMHead", "OnlineAttentionAccumulator", "IntegralAttention")
    theta = 0.5

    def load(self, split: str, n: int, seed: int, difficulty: float = 1.0) -> TaskData:
        t = task_data.localisation_task(n, split=split, seed=seed, difficulty=difficulty)
        ds = labelled(t.images, t.labels, "shapes10_localisation")
        return TaskData(ds, (half_masks(t.masks), torch.arange(n)))

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        if method == BASELINE:
            return image_network(k, w)
        head: Any = attention_class("CAMHead")
        integral = None
        if method == "IntegralAttention":
            integral = attention_class("IntegralAttention")(2 * w, k, hidden=w, normalize=True)
        return CAMNetwork(w, head(2 * w, k, normalize=True), integral)

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        state: State = {"ce": TauCrossEntropy(settings.tau)}
        if method in ("OnlineAttentionAccumulator", "IntegralAttention"):
            _, h, w = train.input_shape
            acc: Any = attention_class("OnlineAttentionAccumulator")
            state["oaa"] = acc(len(train.dataset), train.dataset.num_classes, (h // 2, w // 2))
            state["hybrid"] = OAAHybrid(tau=settings.tau)
        return state

    def loss(self, method: str, model: nn.Module, batch: Sequence[Tensor], state: State) -> Tensor:
        x, y, _, index = batch
        if method == BASELINE:
            return state["ce"](model(x), y)
        net = _cam_network(model)
        features = net.features(x)
        maps = net.head.maps(features)
        logits = net.head.logits_from_maps(maps)
        onehot = one_hot_targets(y, logits.shape[1])
        net.head.update_kappa(maps, onehot)
        loss = state["ce"](logits, y)
        if "oaa" in state:
            state["oaa"].update(index, net.head.attention_from_maps(maps.detach()), logits.detach(), onehot)
        if net.integral is not None:
            p = net.integral(features.detach())
            rows = torch.arange(x.shape[0])
            q = state["oaa"].targets(index)[rows, y]
            loss = loss + state["hybrid"](p[rows, y], q)
        return loss

    def _maps(self, method: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Foreground decisions ``(N, H/2, W/2)`` of the true class on images ``x``."""
        rows = torch.arange(x.shape[0])
        with torch.no_grad():
            if method == BASELINE:
                # the baseline is image_network's nn.Sequential: its first block, stem(width)
                energy = cast(nn.Sequential, model)[:3](x).norm(dim=1)
                return energy > energy.mean(dim=(1, 2), keepdim=True)
            net = _cam_network(model)
            features = net.features(x)
            if net.integral is not None:
                return net.integral(features)[rows, y] > 0
            return net.head.attention(features)[rows, y] >= self.theta

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
        ds, masks = test.dataset, test.targets[0]
        details: dict[str, Any] = {"classification_accuracy": round(clean, 4)}
        if method == "OnlineAttentionAccumulator":
            # The accumulated maps exist for the training images only (the paper scores them there).
            train = state["train"]
            acc = state["oaa"].maps[torch.arange(len(train.dataset)), train.dataset.labels] >= self.theta
            miou = mean_iou(acc, train.targets[0])
            details["scored_on"] = "accumulated maps of the training images"
            return Evaluation(self.metric, miou, clean, cert, robust, lip, details)
        pred = torch.cat(
            [
                self._maps(method, model, xb, yb)
                for xb, yb in zip(ds.images.split(250), ds.labels.split(250), strict=True)
            ]
        )
        miou = mean_iou(pred, masks)
        if method != BASELINE:
            net = _cam_network(model)
            feature_bound = net.feature_bound(ds.input_shape)
            decisions, radii = [], []
            for xb, yb in zip(ds.images.split(250), ds.labels.split(250), strict=True):
                rows = torch.arange(xb.shape[0])
                # the images' norms: the scale of the forward pass's rounding (binary_radius)
                norms = xb.flatten(1).double().norm(dim=1)
                with torch.no_grad():
                    f = net.features(xb)
                if net.integral is not None:
                    d, r = net.integral.pixel_certificates(
                        f, backbone_lipschitz=feature_bound, input_norms=norms
                    )
                else:
                    d, r = net.head.pixel_certificates(
                        f, backbone_lipschitz=feature_bound, input_norms=norms, theta=self.theta
                    )
                decisions.append(d[rows, yb])
                radii.append(r[rows, yb])
            right = torch.cat(decisions) == masks
            # a pixel counts when its decision is right and its radius > eps
            radius = torch.where(right, torch.cat(radii), 0.0).flatten()
            details["certified_pixels"] = {
                format_eps(e): round(certified_accuracy(radius, e), 4) for e in eps
            }
        return Evaluation(self.metric, miou, clean, cert, robust, lip, details)
