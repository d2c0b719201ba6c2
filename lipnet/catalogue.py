"""``lipnet catalogue``: every available method trained and certified under one budget and one guarantee.

Each method is the same small 1-Lipschitz backbone

    conv(3, w) GS pool2 [module] conv(w, 2w) GS pool2 flatten dense(2w * 64, out)

(Björck-orthogonal convolutions and dense layer, GroupSort, 2x2 scaled L2-norm pooling) with the
method's attention module at ``[module]``; the plain baseline has nothing there. Attention modules come
from :mod:`lipnet.attention`, built with ``normalize=True`` (divided by their own sound bound). A method
is listed only when its class is exported by ``lipnet.attention.__all__`` and has an entry in
:data:`METHODS`; nothing is faked for modules that do not exist yet.

Every certificate uses ``certify.bounds.lipschitz_bound`` of the *whole* network for the input shape,
composed from each part's sound float64 bound (the attention modules' ``lipschitz_bound()``):

* ``classification`` (shapes10, tau-CE): ``radius = margin / (sqrt(2) L)``;
* ``attributes`` (imbalanced multi-label, :func:`lipnet.data.tasks.attribute_task`, weighted focal): each
  attribute logit is ``L``-Lipschitz too (a coordinate of an ``L``-Lipschitz map), so
  ``radius_c = |f_c| / L`` per attribute; the table gives the mean over attributes and the per-attribute
  values in ``details``.

Columns: method, task, task metric (accuracy, or mA for attributes) and its value, clean accuracy
(mean per-attribute accuracy for attributes), certified accuracy at each eps, empirical robust accuracy
at the first eps (AutoAttack when installed, else PGD; per attribute on the 2-logit model
``(-f_c, f_c)``), the network's bound with the modules' normalisation switched off ("before
normalisation") and with it (the one certificates use), parameters and training seconds.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from certify.attacks import empirical_robust_accuracy
from certify.bounds import lipschitz_bound
from certify.radius import certified_accuracy, certified_radius
from lipnet.activations import GroupSort
from lipnet.config import Config
from lipnet.data import tasks
from lipnet.data.shapes import load_shapes10
from lipnet.layers import BjorckConv2d, BjorckLinear
from lipnet.losses import TauCrossEntropy, WeightedFocal
from lipnet.metrics import certified_attribute_accuracy, mean_accuracy
from lipnet.pooling import ScaledL2NormPool2d
from lipnet.runs import atomic_write_bytes, atomic_write_text, eps_label
from lipnet.train import build_optimizer, lr_at

__all__ = [
    "BASELINE",
    "METHODS",
    "CatalogueRow",
    "MethodSpec",
    "available_methods",
    "build_network",
    "run",
    "run_catalogue",
    "write_outputs",
]

BASELINE = "baseline"
INPUT_SHAPE = (3, 32, 32)
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)


@dataclass(frozen=True)
class MethodSpec:
    """How a :mod:`lipnet.attention` class is built at the backbone's ``channels`` and which tasks it runs."""

    build: Callable[[type[nn.Module], int], nn.Module]
    tasks: tuple[str, ...]


#: Keyed by the class name in ``lipnet.attention``; conv-feature modules, normalised (1-Lipschitz).
METHODS: dict[str, MethodSpec] = {
    "SqueezeExcitation": MethodSpec(lambda cls, c: cls(c, normalize=True), ("classification",)),
    "CBAM": MethodSpec(lambda cls, c: cls(c, normalize=True), ("classification",)),
    "ResidualAttention": MethodSpec(lambda cls, c: cls(c, normalize=True), ("classification",)),
}
_BASELINE_TASKS = ("classification", "attributes")


def _attention_class(name: str) -> type[nn.Module] | None:
    import lipnet.attention as attention

    if name not in getattr(attention, "__all__", ()):
        return None
    cls = getattr(attention, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def available_methods() -> list[str]:
    """The baseline and every :data:`METHODS` entry whose class ``lipnet.attention`` exports."""
    return [BASELINE, *(name for name in METHODS if _attention_class(name) is not None)]


def build_network(method: str, num_outputs: int, width: int = 16) -> nn.Sequential:
    """The shared backbone with ``method``'s module after the first block (see the module docstring)."""
    if width < 2 or width % 2:
        raise ValueError(f"width must be an even number >= 2 (GroupSort pairs channels), got {width}")
    if method == BASELINE:
        middle: nn.Module = nn.Identity()
    else:
        cls = _attention_class(method)
        if cls is None or method not in METHODS:
            raise ValueError(f"unknown or unavailable method {method!r}; available: {available_methods()}")
        middle = METHODS[method].build(cls, width)
    return nn.Sequential(
        BjorckConv2d(3, width, 3, padding=1),
        GroupSort(2),
        ScaledL2NormPool2d(2),
        middle,
        BjorckConv2d(width, 2 * width, 3, padding=1),
        GroupSort(2),
        ScaledL2NormPool2d(2),
        nn.Flatten(),
        BjorckLinear(2 * width * (INPUT_SHAPE[1] // 4) ** 2, num_outputs),
    )


def _raw_bound(model: nn.Module) -> float:
    """The network's bound with every ``normalize`` switch off (the modules' own, unnormalised constants)."""
    switched = [m for m in model.modules() if isinstance(getattr(m, "normalize", None), bool) and m.normalize]
    try:
        for m in switched:
            m.normalize = False
        return lipschitz_bound(model, INPUT_SHAPE)
    finally:
        for m in switched:
            m.normalize = True


@dataclass
class CatalogueRow:
    """One line of the table; ``certified`` maps an eps label (e.g. ``36/255``) to certified accuracy."""

    method: str
    task: str
    metric: str
    metric_value: float
    clean_accuracy: float
    certified: dict[str, float]
    robust_accuracy: float | None
    attack: str
    lipschitz_raw: float
    lipschitz: float
    params: int
    train_seconds: float
    details: str


@dataclass(frozen=True)
class _Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_outputs: int
    priors: Tensor | None


def _load_task(task: str, n_train: int, n_test: int, seed: int) -> _Data:
    if task == "classification":
        tr = load_shapes10("train", n=n_train, seed=seed)
        te = load_shapes10("test", n=n_test, seed=seed)
        return _Data(tr.images, tr.labels, te.images, te.labels, tr.num_classes, None)
    if task == "attributes":
        tr_a = tasks.attribute_task(n_train, split="train", seed=seed)
        te_a = tasks.attribute_task(n_test, split="test", seed=seed)
        return _Data(tr_a.images, tr_a.targets, te_a.images, te_a.targets, len(tr_a.names), tr_a.priors)
    raise ValueError(f"unknown task {task!r}; use 'classification' or 'attributes'")


def _train(
    model: nn.Module, data: _Data, epochs: int, batch_size: int, lr: float, tau: float, seed: int
) -> float:
    cfg = Config()
    cfg.optim.lr = lr
    opt = build_optimizer(model.parameters(), cfg)
    if data.priors is None:
        loss_fn: nn.Module = TauCrossEntropy(tau)
    else:
        # Frequencies measured on the training set: the designed priors are the expectation only.
        loss_fn = WeightedFocal(data.y_train.mean(dim=0).double(), gamma=2.0, tau=tau)
    n = data.x_train.shape[0]
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, cfg.optim.schedule)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return time.perf_counter() - start


class _AttributeAsPair(nn.Module):
    """``x -> (-f_c(x), f_c(x))``: attribute ``c`` as a two-class model, so class-label attacks apply."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: Tensor) -> Tensor:
        f = self.model(x)[:, self.index]
        return torch.stack([-f, f], dim=1)


def _evaluate(
    method: str,
    task: str,
    model: nn.Module,
    data: _Data,
    eps: Sequence[float],
    attack: str,
    attack_n: int,
    seconds: float,
) -> CatalogueRow:
    lip = lipschitz_bound(model, INPUT_SHAPE)
    raw = _raw_bound(model)
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb in data.x_test.split(256)])
    params = sum(p.numel() for p in model.parameters())
    x_att = data.x_test[:attack_n]
    if data.priors is None:
        y = data.y_test
        radii = certified_radius(logits, y, lip)
        clean = float((logits.argmax(dim=1) == y).double().mean())
        cert = {eps_label(e): certified_accuracy(radii, e) for e in eps}
        robust = (
            empirical_robust_accuracy(model, x_att, y[:attack_n], eps[0], attack=attack) if attack_n else None
        )
        return CatalogueRow(
            method, task, "accuracy", clean, clean, cert, robust, attack, raw, lip, params, seconds, ""
        )
    t = data.y_test
    per_attr = ((logits > 0) == t.bool()).double().mean(dim=0)
    cert, details = {}, {}
    for e in eps:
        values = certified_attribute_accuracy(logits, t, lip, e)
        cert[eps_label(e)] = sum(values) / len(values)
        details[eps_label(e)] = [round(v, 4) for v in values]
    robust = None
    if attack_n:
        robust_each = [
            empirical_robust_accuracy(
                _AttributeAsPair(model, c), x_att, t[:attack_n, c].long(), eps[0], attack=attack
            )
            for c in range(t.shape[1])
        ]
        robust = sum(robust_each) / len(robust_each)
    text = json.dumps({"clean": [round(float(v), 4) for v in per_attr], "certified": details})
    return CatalogueRow(
        method,
        task,
        "mA",
        mean_accuracy(logits, t),
        float(per_attr.mean()),
        cert,
        robust,
        attack,
        raw,
        lip,
        params,
        seconds,
        text,
    )


def run_catalogue(
    methods: Sequence[str] | None = None,
    *,
    n_train: int = 5000,
    n_test: int = 1000,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 2e-3,
    tau: float = 8.0,
    width: int = 16,
    eps: Sequence[float] = DEFAULT_EPS,
    attack: str = "auto",
    attack_n: int = 200,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[CatalogueRow]:
    """Train and evaluate each method on each of its tasks with the same data, budget and seed."""
    available = available_methods()
    chosen = list(available) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ValueError(f"method(s) {unknown} not available; available: {available}")
    if not eps or any(e <= 0 for e in eps):
        raise ValueError(f"eps must be a non-empty list of radii > 0, got {list(eps)}")
    rows = []
    cache: dict[str, _Data] = {}
    for method in chosen:
        for task in _BASELINE_TASKS if method == BASELINE else METHODS[method].tasks:
            if task not in cache:
                cache[task] = _load_task(task, n_train, n_test, seed)
            data = cache[task]
            torch.manual_seed(seed)
            model = build_network(method, data.num_outputs, width)
            seconds = _train(model, data, epochs, batch_size, lr, tau, seed)
            row = _evaluate(method, task, model, data, eps, attack, min(attack_n, n_test), seconds)
            rows.append(row)
            if progress is not None:
                progress(_markdown([row], eps, header=False).strip())
    return rows


def _columns(eps: Sequence[float]) -> list[str]:
    return [
        "method", "task", "metric", "metric_value", "clean_accuracy",
        *(f"certified@{eps_label(e)}" for e in eps),
        "robust_accuracy", "attack", "lipschitz_raw", "lipschitz", "params", "train_seconds", "details",
    ]  # fmt: skip


def _flat(row: CatalogueRow, eps: Sequence[float]) -> list[object]:
    cert = row.certified
    return [
        row.method, row.task, row.metric, f"{row.metric_value:.4f}", f"{row.clean_accuracy:.4f}",
        *(f"{cert[eps_label(e)]:.4f}" for e in eps),
        "" if row.robust_accuracy is None else f"{row.robust_accuracy:.4f}", row.attack,
        f"{row.lipschitz_raw:.6g}", f"{row.lipschitz:.6g}", row.params, f"{row.train_seconds:.1f}",
        row.details,
    ]  # fmt: skip


def _markdown(rows: Sequence[CatalogueRow], eps: Sequence[float], header: bool = True) -> str:
    cols = [c for c in _columns(eps) if c != "details"]
    lines = []
    if header:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(str(v) for v in _flat(row, eps)[:-1]) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[CatalogueRow], eps: Sequence[float], path: Path) -> bool:
    from lipnet.plots import matplotlib_available

    if not matplotlib_available() or not rows:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    labels = [f"{r.method}\n{r.task}" for r in rows]
    series = [("clean", [r.clean_accuracy for r in rows])]
    series += [(f"cert {eps_label(e)}", [r.certified[eps_label(e)] for r in rows]) for e in eps]
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series):
        ax.bar([i + k * width for i in range(len(rows))], [100 * v for v in values], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.set(ylabel="accuracy (%)", title="catalogue: clean and certified accuracy (L2)")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_outputs(rows: Sequence[CatalogueRow], eps: Sequence[float], out: Path, command: str) -> list[Path]:
    """Write ``catalogue.csv``, ``catalogue.md`` and ``catalogue.png`` (when matplotlib is installed)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(_columns(eps))
    writer.writerows(_flat(r, eps) for r in rows)
    written = [out / "catalogue.csv", out / "catalogue.md"]
    atomic_write_text(written[0], buf.getvalue())
    note = (
        "# Catalogue\n\nCommand: `"
        + command
        + "`\n\nCertified accuracy uses a sound bound of the whole network "
        "(`lipschitz`); `lipschitz_raw` is the same network with the attention modules' normalisation "
        "off.\n\n"
    )
    atomic_write_text(written[1], note + _markdown(rows, eps))
    if _plot(rows, eps, out / "catalogue.png"):
        written.append(out / "catalogue.png")
    return written


def run(args: argparse.Namespace) -> int:
    """The ``lipnet catalogue`` command."""
    quick = bool(args.quick)
    available = available_methods()
    methods = args.methods if args.methods else (available[:2] if quick else available)
    settings = {
        "n_train": args.n_train or (200 if quick else 5000),
        "n_test": args.n_test or (64 if quick else 1000),
        "epochs": args.epochs or (1 if quick else 5),
        "attack": args.attack or ("pgd" if quick else "auto"),
        "attack_n": args.attack_n if args.attack_n is not None else (16 if quick else 200),
        "seed": args.seed,
    }
    if args.threads:
        torch.set_num_threads(args.threads)
    say = None if args.quiet else print
    rows = run_catalogue(methods, progress=say, **settings)  # type: ignore[arg-type]
    command = "lipnet catalogue " + " ".join(
        ["--quick"] * quick
        + [f"--{k.replace('_', '-')} {v}" for k, v in settings.items()]
        + ([f"--methods {','.join(methods)}"] if args.methods else [])
    )
    for path in write_outputs(rows, DEFAULT_EPS, Path(args.out), command):
        print(f"wrote {path}")
    return 0
