"""The catalogue's tasks: data, the methods that belong to each, their losses, metrics and certificates.

One class per task (:data:`TASKS`), all built from ``shapes10`` by :mod:`lipnet.data.tasks`. Each knows

* its data (an :class:`~lipnet.data.ImageDataset` plus extra per-sample targets, batched together by
  :class:`~lipnet.data.DeviceLoader`),
* its methods: the :mod:`lipnet.attention` classes that belong to it (``research-attention.md`` §5)
  and the plain ``baseline`` of the same size, each with the loss of its paper, all on tau-scaled
  logits,
* how a trained network is evaluated: the task metric of the papers, clean accuracy, certified
  accuracy at each eps from a sound bound of the network (:func:`certify.bounds.lipschitz_bound`, or
  the documented per-task / per-attribute / per-pixel rule), and PGD accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lipnet.attention as attention
from certify.attacks import empirical_robust_accuracy
from certify.bounds import lipschitz_bound, module_bound
from certify.radius import certified_accuracy, certified_radius
from lipnet.activations import GroupSort
from lipnet.catalogue.networks import (
    BagNetwork,
    CAMNetwork,
    CentredPooling,
    InstanceMean,
    MultiTaskBaseline,
    MultiTaskNetwork,
    PixelTokens,
    image_network,
    stem,
)
from lipnet.data import ImageDataset
from lipnet.data import tasks as task_data
from lipnet.data.shapes import SHAPES10_CLASSES, load_shapes10
from lipnet.layers import BjorckConv2d, BjorckLinear
from lipnet.losses import (
    AttentionVariance,
    DynamicWeightAverage,
    MILInstance,
    OAAHybrid,
    TauBCE,
    TauCrossEntropy,
    WeightedFocal,
)
from lipnet.metrics import (
    attribute_f1,
    bag_accuracy,
    certified_attribute_accuracy,
    certified_per_task_accuracy,
    certified_pixel_fraction,
    instance_auc,
    mean_accuracy,
    mean_iou,
)
from lipnet.pooling import ScaledL2NormPool2d
from lipnet.runs import eps_label

__all__ = [
    "BASELINE",
    "TASKS",
    "AttributesTask",
    "CatalogueTask",
    "ClassificationTask",
    "ClutteredTask",
    "Evaluation",
    "LocalisationTask",
    "MILTask",
    "MultitaskTask",
    "ScaleTask",
    "TaskData",
    "TaskSettings",
]

BASELINE = "baseline"
#: Loss modules and training-time state of one training run (what ``init_state`` returns).
State = dict[str, Any]


@dataclass(frozen=True)
class TaskSettings:
    """The training budget of one task, the same for every method of the task."""

    n_train: int
    n_test: int
    epochs: int
    lr: float
    tau: float
    batch_size: int
    width: int

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "epochs", "batch_size", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "tau"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.width < 2 or self.width % 2:
            raise ValueError(
                f"width must be an even number >= 2 (GroupSort pairs channels), got {self.width}"
            )


@dataclass(eq=False)
class TaskData:
    """One split: the images and main labels, extra per-sample targets, and task-specific extras."""

    dataset: ImageDataset
    targets: tuple[Tensor, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.dataset.input_shape


@dataclass
class Evaluation:
    """What a task reports for one trained network (``certified`` keyed by eps label)."""

    metric: str
    metric_value: float
    clean_accuracy: float
    certified: dict[str, float]
    robust_accuracy: float | None
    lipschitz: float
    details: dict[str, Any]


def _attention_class(name: str) -> Any:
    """The :mod:`lipnet.attention` class called ``name``."""
    return getattr(attention, name)


def _logits(model: nn.Module, x: Tensor, batch: int = 250) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(xb) for xb in x.split(batch)])


def _classification_scores(
    model: nn.Module, data: TaskData, eps: Sequence[float], attack: dict[str, Any]
) -> tuple[float, dict[str, float], float | None, float]:
    """Clean accuracy, certified accuracy (``margin / (sqrt 2 L)``), PGD accuracy and ``L`` of the network."""
    ds = data.dataset
    lip = lipschitz_bound(model, ds.input_shape)
    logits = _logits(model, ds.images)
    radii = certified_radius(logits, ds.labels, lip)
    clean = float((logits.argmax(dim=1) == ds.labels).double().mean())
    cert = {eps_label(e): certified_accuracy(radii, e) for e in eps}
    return clean, cert, _attack(model, ds.images, ds.labels, eps[0], attack), lip


def _attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, attack: dict[str, Any]) -> float | None:
    n = min(int(attack["n"]), x.shape[0])
    if n == 0:
        return None
    return empirical_robust_accuracy(
        model, x[:n], y[:n], eps, attack=attack["name"], steps=int(attack["steps"])
    )


def _onehot(labels: Tensor, k: int) -> Tensor:
    return F.one_hot(labels, k).to(torch.float32)


class CatalogueTask:
    """One task of the catalogue: data, methods (``baseline`` first), losses and evaluation."""

    name = ""
    metric = ""
    #: The baseline, then the :mod:`lipnet.attention` classes trained on this task, in table order.
    METHODS: tuple[str, ...] = ()

    def methods(self) -> list[str]:
        """:attr:`METHODS` as a list."""
        return list(self.METHODS)

    def load(self, split: str, n: int, seed: int) -> TaskData:
        raise NotImplementedError

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        raise NotImplementedError

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        """Loss modules and training-time state of ``method`` (created once per training run)."""
        return {"ce": TauCrossEntropy(settings.tau)}

    def loss(self, method: str, model: nn.Module, batch: tuple[Tensor, ...], state: State) -> Tensor:
        x, y = batch[0], batch[1]
        return state["ce"](model(x), y)

    def end_epoch(self, method: str, state: State) -> None:
        """Called after every epoch (epoch-level state such as DWA's loss history)."""

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        clean, cert, robust, lip = _classification_scores(model, test, eps, attack)
        return Evaluation("accuracy", clean, clean, cert, robust, lip, {})


def _shapes(split: str, n: int, seed: int) -> TaskData:
    return TaskData(load_shapes10(split, n=n, seed=seed))


def _middle(cls_name: str, width: int) -> nn.Module:
    cls: Any = _attention_class(cls_name)
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
    Certificate: ``radius = margin / (sqrt 2 L)``, ``L`` the sound bound of the whole network.
    """

    name = "classification"
    metric = "accuracy"
    METHODS = (
        BASELINE,
        "SqueezeExcitation",
        "CBAM",
        "ResidualAttention",
        "FeedbackGating",
        "BoundedDotProductAttention",
        "L2MultiheadAttention",
        "MemoryAttention",
    )

    def load(self, split: str, n: int, seed: int) -> TaskData:
        return _shapes(split, n, seed)

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        if method == BASELINE:
            return image_network(k, w)
        cls: Any = _attention_class(method)
        if method in ("BoundedDotProductAttention", "L2MultiheadAttention"):
            return image_network(k, w, late=PixelTokens(cls(2 * w, heads=2, normalize=True), residual=True))
        if method == "MemoryAttention":
            # Already residual (x - t W^T softmax(.)), so no averaging around it.
            return image_network(k, w, late=PixelTokens(cls(2 * w, slots=16), residual=False))
        return image_network(k, w, middle=_middle(method, w))


class ScaleTask(ClassificationTask):
    """Objects zoomed out by 1x to 2.5x at random positions (attention to scale, Chen et al., CVPR 2016).

    Attention to scale fuses a shared trunk's outputs at scales 1 and 1/4 of the first block's
    feature map with a per-pixel softmax. Certificate as in classification.
    """

    name = "scale"
    scale_range = (0.4, 1.0)
    METHODS = (BASELINE, "AttentionToScale")

    def load(self, split: str, n: int, seed: int) -> TaskData:
        t = task_data.scale_task(n, split=split, seed=seed, scale_range=self.scale_range)
        return TaskData(_labelled(t.images, t.labels, "shapes10_scale"))


def _labelled(
    images: Tensor, labels: Tensor, name: str, classes: Sequence[str] = SHAPES10_CLASSES
) -> ImageDataset:
    return ImageDataset(images, labels, len(classes), list(classes), name)


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

    def load(self, split: str, n: int, seed: int) -> TaskData:
        t = task_data.cluttered_task(n, split=split, seed=seed, scale=self.scale)
        norms = t.images.flatten(1).norm(dim=1)
        return TaskData(
            _labelled(t.images, t.labels, "shapes10_cluttered"), info={"radius": float(norms.median())}
        )

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        c, side, _ = train.input_shape
        if method == BASELINE:
            return image_network(k, w, side=side)
        cls: Any = _attention_class(method)
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


class AttributesTask(CatalogueTask):
    """Imbalanced attributes, priors 2%-50% (Sarafianos et al., ECCV 2018), weighted focal loss.

    Multi-scale attention aggregation replaces the backbone's dense layer: ``stem conv(w, w) GS pool2``
    then the module's branches at scales 1, 1/2, 1/4 of that ``8 x 8`` map and its primary branch,
    mean-aggregated (at ``16 x 16`` the module's per-forward exact bound costs 20 times more); trained
    with the weighted focal loss on the aggregate and the attention-variance loss on every branch (one
    history per branch), as in the paper. Metrics: mA (task metric), example-based F1, per-attribute
    accuracy and per-attribute certified accuracy ``|f_c| / L_c > eps`` (``L_c`` the bound of logit
    ``c``: the whole network's ``L`` for the baseline, the bound of the layers before the module times
    the module's per-attribute bound for the aggregation); PGD per attribute on the two-logit model
    ``(-f_c, f_c)``. The table's clean and
    certified accuracies are means over the attributes.
    """

    name = "attributes"
    metric = "mA"
    METHODS = (BASELINE, "MultiScaleAttentionAggregation")

    def load(self, split: str, n: int, seed: int) -> TaskData:
        t = task_data.attribute_task(n, split=split, seed=seed)
        ds = _labelled(t.images, t.labels, "shapes10_attributes")
        return TaskData(ds, (t.targets, torch.arange(n)), info={"names": t.names})

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        a, w = train.targets[0].shape[1], settings.width
        if method == BASELINE:
            return image_network(a, w)
        cls: Any = _attention_class(method)
        block = [BjorckConv2d(w, w, 3, padding=1), GroupSort(2), ScaledL2NormPool2d(2)]
        return nn.Sequential(*stem(w), *block, cls(w, a, scales=3, normalize=True))

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        # Frequencies measured on the training set: the designed priors are the expectation only.
        priors = train.targets[0].mean(dim=0).double()
        state: State = {"focal": WeightedFocal(priors, gamma=2.0, tau=settings.tau)}
        if method != BASELINE:
            n, branches = len(train.dataset), model[-1].scales + 1
            state["variance"] = [
                AttentionVariance(priors, num_samples=n, tau=settings.tau) for _ in range(branches)
            ]
        return state

    def loss(self, method: str, model: nn.Module, batch: tuple[Tensor, ...], state: State) -> Tensor:
        x, _, t, index = batch
        if method == BASELINE:
            return state["focal"](model(x), t)
        features = model[:-1](x)
        module = model[-1]
        branches = module.branch_logits(features)
        f = torch.stack(branches, dim=1).mean(dim=1)
        variance = sum(v(b, t, index) for v, b in zip(state["variance"], branches, strict=True)) / len(
            branches
        )
        return state["focal"](f, t) + variance

    def attribute_bounds(self, method: str, model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
        """Sound float64 bound of each attribute logit."""
        if method == BASELINE:
            lip = lipschitz_bound(model, input_shape)
            return torch.full((model[-1].out_features,), lip, dtype=torch.float64)
        first = module_bound(model[:-1], input_shape)
        _, h, w = input_shape
        inner = (model[-1].channels, h // 4, w // 4)
        return first * model[-1].attribute_lipschitz_bounds(inner)

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
        logits = _logits(model, ds.images)
        bounds = self.attribute_bounds(method, model, ds.input_shape)
        per_attr = ((logits > 0) == t.bool()).double().mean(dim=0)
        cert, per_eps = {}, {}
        for e in eps:
            values = certified_attribute_accuracy(logits, t, bounds, e)
            cert[eps_label(e)] = sum(values) / len(values)
            per_eps[eps_label(e)] = [round(v, 4) for v in values]
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


def _half_masks(masks: Tensor) -> Tensor:
    """Object masks at half resolution (a 2x2 window is foreground when at least half of it is)."""
    return F.avg_pool2d(masks[:, None].float(), 2)[:, 0] >= 0.5


class MultitaskTask(CatalogueTask):
    """Class (10) + colour (8) + segmentation mask (MTAN, Liu, Johns & Davison, CVPR 2019).

    Both networks share the stem (half resolution); the body is the MTAN (task-specific attention over
    a shared stack, trained with Dynamic Weight Average) or the same stack without attention and equal
    task weights (the paper's baseline weighting). The class task reads 4 maps through a dense layer,
    colour is pooled from 8 maps, the mask is one map (:class:`MultiTaskNetwork`). Losses: tau-CE for
    class and colour, tau-BCE per pixel for the mask (at ``16 x 16``). Per-task metrics: class and
    colour accuracy, mask pixel accuracy and mIoU; the task metric is the mean of the three
    accuracies. Per-task certificates with each task's own bound (:meth:`MultiTaskNetwork.task_bounds`):
    class and colour ``margin / (sqrt 2 L_t)``, mask pixels ``|p_j| / L_mask`` (the certified-pixel
    fraction). The table's clean, certified and PGD columns are the class task's.
    """

    name = "multitask"
    metric = "mean task acc"
    class_maps = 4
    METHODS = (BASELINE, "MultiTaskAttentionNetwork")

    def load(self, split: str, n: int, seed: int) -> TaskData:
        t = task_data.multitask(n, split=split, seed=seed)
        ds = _labelled(t.images, t.labels, "shapes10_multitask")
        return TaskData(ds, (t.colours, _half_masks(t.masks).float()), info={"colours": t.num_colours})

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        heads = (self.class_maps, train.info["colours"], 1)
        if method == BASELINE:
            return MultiTaskNetwork(w, MultiTaskBaseline(w, heads, depth=2), k, self.class_maps)
        cls: Any = _attention_class(method)
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

    def loss(self, method: str, model: nn.Module, batch: tuple[Tensor, ...], state: State) -> Tensor:
        x, y, colour, mask = batch
        cls, col, seg = model.task_logits(x)
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
        with torch.no_grad():
            outs = [model.task_logits(xb) for xb in ds.images.split(250)]
        cls, col, seg = (torch.cat(parts) for parts in zip(*outs, strict=True))
        bounds = model.task_bounds(ds.input_shape)
        accs = {
            "class": float((cls.argmax(1) == ds.labels).double().mean()),
            "colour": float((col.argmax(1) == colour).double().mean()),
            "mask_pixel": float(((seg > 0) == mask.bool()).double().mean()),
        }
        per_task: dict[str, dict[str, float]] = {}
        for e in eps:
            c = certified_per_task_accuracy(
                {"class": cls, "colour": col},
                {"class": ds.labels, "colour": colour},
                {"class": bounds["class"], "colour": bounds["colour"]},
                e,
            )
            c["mask_pixel"] = certified_pixel_fraction(seg, mask, bounds["mask"], e)
            per_task[eps_label(e)] = {k: round(v, 4) for k, v in c.items()}
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
        robust = _attack(model, ds.images, ds.labels, eps[0], attack)
        return Evaluation(
            self.metric, sum(accs.values()) / 3, accs["class"], cert, robust, bounds["class"], details
        )


class MILTask(CatalogueTask):
    """Multiple-instance bags of 4 images, positive iff one is a ring (Ilse et al., ICML 2018 protocol).

    A bag is its instances stacked on channels, ``(4 * 3, 32, 32)``; every instance goes through the
    same encoder (the backbone with a 32-feature dense layer), then a MIL pooling and a 2-class bag
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
    the whole network's bound on a bag, PGD on whole bags.
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

    def load(self, split: str, n: int, seed: int) -> TaskData:
        # n counts instances, so that a task's budget is in images whatever the task.
        k = self.bag_size
        bags = task_data.mil_bags(
            max(2, n // k), split=split, seed=seed, target=self.target, mean_size=k, std_size=0.0, max_size=k
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
            BjorckLinear(2 * w * 64, f),
        )
        cls: Any = _attention_class(method) if method != BASELINE else None
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

    def loss(self, method: str, model: nn.Module, batch: tuple[Tensor, ...], state: State) -> Tensor:
        x, y = batch[0], batch[1]
        if method != "LossAttentionMIL":
            return state["ce"](model(x), y)
        bag, alpha, instance = model.aggregator.with_attention(model.features(x))
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
        clean, cert, robust, lip = _classification_scores(model, test, eps, attack)
        ds = test.dataset
        with torch.no_grad():
            scores = torch.cat([model.instance_scores(xb) for xb in ds.images.split(100)])
            logits = _logits(model, ds.images)
        details = {
            "instance_AUC": round(instance_auc(scores, test.targets[0]), 4),
            "bag_accuracy": round(bag_accuracy(logits, ds.labels), 4),
            "positive_bags": round(float(ds.labels.double().mean()), 4),
        }
        return Evaluation(self.metric, bag_accuracy(logits, ds.labels), clean, cert, robust, lip, details)


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
    (task metric), classification accuracy and its certificates (``margin / (sqrt 2 L)``), and the
    certified-pixel fraction: pixels whose foreground decision (CAM: attention ``>= 0.5``; OAA+:
    logit ``> 0``) is right and certified, radius ``|score - threshold| / (L_pixel L_features) > eps``.
    """

    name = "localisation"
    metric = "mIoU"
    METHODS = (BASELINE, "CAMHead", "OnlineAttentionAccumulator", "IntegralAttention")
    theta = 0.5

    def load(self, split: str, n: int, seed: int) -> TaskData:
        t = task_data.localisation_task(n, split=split, seed=seed)
        ds = _labelled(t.images, t.labels, "shapes10_localisation")
        return TaskData(ds, (_half_masks(t.masks), torch.arange(n)))

    def build(self, method: str, settings: TaskSettings, train: TaskData) -> nn.Module:
        w, k = settings.width, train.dataset.num_classes
        if method == BASELINE:
            return image_network(k, w)
        head: Any = _attention_class("CAMHead")
        integral = None
        if method == "IntegralAttention":
            integral = _attention_class("IntegralAttention")(2 * w, k, hidden=w, normalize=True)
        return CAMNetwork(w, head(2 * w, k, normalize=True), integral)

    def init_state(self, method: str, model: nn.Module, train: TaskData, settings: TaskSettings) -> State:
        state: State = {"ce": TauCrossEntropy(settings.tau)}
        if method in ("OnlineAttentionAccumulator", "IntegralAttention"):
            _, h, w = train.input_shape
            acc: Any = _attention_class("OnlineAttentionAccumulator")
            state["oaa"] = acc(len(train.dataset), train.dataset.num_classes, (h // 2, w // 2))
            state["hybrid"] = OAAHybrid(tau=settings.tau)
        return state

    def loss(self, method: str, model: nn.Module, batch: tuple[Tensor, ...], state: State) -> Tensor:
        x, y, _, index = batch
        if method == BASELINE:
            return state["ce"](model(x), y)
        features = model.features(x)
        maps = model.head.maps(features)
        logits = model.head.logits_from_maps(maps)
        onehot = _onehot(y, logits.shape[1])
        model.head.update_kappa(maps, onehot)
        loss = state["ce"](logits, y)
        if "oaa" in state:
            state["oaa"].update(index, model.head.attention_from_maps(maps.detach()), logits.detach(), onehot)
        if model.integral is not None:
            p = model.integral(features.detach())
            rows = torch.arange(x.shape[0])
            q = state["oaa"].targets(index)[rows, y]
            loss = loss + state["hybrid"](p[rows, y], q)
        return loss

    def _maps(self, method: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Foreground decisions ``(N, H/2, W/2)`` of the true class on images ``x``."""
        rows = torch.arange(x.shape[0])
        with torch.no_grad():
            if method == BASELINE:
                energy = model[:3](x).norm(dim=1)
                return energy > energy.mean(dim=(1, 2), keepdim=True)
            features = model.features(x)
            if model.integral is not None:
                return model.integral(features)[rows, y] > 0
            return model.head.attention(features)[rows, y] >= self.theta

    def evaluate(
        self,
        method: str,
        model: nn.Module,
        test: TaskData,
        eps: Sequence[float],
        attack: dict[str, Any],
        state: State,
    ) -> Evaluation:
        clean, cert, robust, lip = _classification_scores(model, test, eps, attack)
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
            feature_bound = model.feature_bound(ds.input_shape)
            decisions, radii = [], []
            for xb, yb in zip(ds.images.split(250), ds.labels.split(250), strict=True):
                rows = torch.arange(xb.shape[0])
                with torch.no_grad():
                    f = model.features(xb)
                if model.integral is not None:
                    d, r = model.integral.pixel_certificates(f, backbone_lipschitz=feature_bound)
                else:
                    d, r = model.head.pixel_certificates(
                        f, backbone_lipschitz=feature_bound, theta=self.theta
                    )
                decisions.append(d[rows, yb])
                radii.append(r[rows, yb])
            right = torch.cat(decisions) == masks
            radius = torch.cat(radii)
            details["certified_pixels"] = {
                eps_label(e): round(float((right & (radius > e)).double().mean()), 4) for e in eps
            }
        return Evaluation(self.metric, miou, clean, cert, robust, lip, details)


#: Every task, in table order.
TASKS: dict[str, CatalogueTask] = {
    t.name: t
    for t in (
        ClassificationTask(),
        AttributesTask(),
        MultitaskTask(),
        MILTask(),
        LocalisationTask(),
        ScaleTask(),
        ClutteredTask(),
    )
}
