"""``lipnet bench fmnist``: the Fashion-MNIST yardstick, lipnet against deel-torchlip and orthogonium.

Every contender is the same architecture (:func:`lipnet.models.fmnist.fmnist_layers`, size ``s`` or
``m``) built from one library's layers:

* lipnet: :class:`~lipnet.models.fmnist.FashionConvNet` with each layer kind registered when the bench
  runs (:func:`lipnet.layers.kinds.list_layer_kinds`);
* the anchors of :data:`lipnet.bench.anchors.ANCHORS` as their libraries ship them: deel-torchlip
  (``SpectralConv2d``, ``GroupSort2``, ``ScaledL2NormPool2d``, ``SpectralLinear``); orthogonium's AOC
  (``AdaptiveOrthoConv2d`` + ``OrthoLinear``), AOL (``AOLConv2D``; orthogonium has no AOL dense layer,
  so its dense layers are ``OrthoLinear``) and SLL (``SDPBasedLipschitzResBlock`` for the
  channel-preserving blocks, AOC for the channel-changing convolutions, ``OrthoLinear``), all with
  orthogonium's ``MaxMin`` and lipnet's scaled L2-norm pooling (orthogonium has none).

Every contender gets the same budget: the same initialisation seed, the same data order (one
:class:`~lipnet.data.DeviceLoader` seed), the same loss (τ-CE, τ multiplying the logits), optimiser,
batch size, number of epochs and wall-clock cap on training, through the one fit loop
(:func:`lipnet.training.loop.fit`: Adam with a per-step cosine learning rate). Each is then certified
on the test set by :func:`certify.certify` with the bound :func:`certify.bounds.lipschitz_bound`
computes from its weights (never the library's own claim), and attacked on the first ``attack_n`` test images.

Empirical robust accuracy at ε: a sample counts when it is correctly classified and either certified at
ε (a sound certificate proves that no attack exists, so it is not attacked) or still correctly
classified after AutoAttack (APGD-CE + APGD-T, through ``pyautoattack``) or L2 PGD: ``auto`` is
:func:`certify.attacks.resolve_attack`'s rule (AutoAttack on CUDA, PGD on a CPU). It is an upper bound
of the true robust accuracy, as the certified accuracy is a lower one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import certify
from certify.attacks import ATTACKS, autoattack_l2, pgd_l2, resolve_attack
from certify.bounds import lipschitz_bound
from certify.radius import format_eps
from lipnet import data, losses
from lipnet.bench import markdown_table
from lipnet.bench.anchors import ANCHORS
from lipnet.data.mnist import FASHION_MNIST
from lipnet.layers.kinds import list_layer_kinds
from lipnet.models import create
from lipnet.models.fmnist import SIZES, fmnist_layers
from lipnet.training.devices import resolve_device
from lipnet.training.loop import classification_step, fit, show_bars

__all__ = ["ATTACKS", "EPS", "Contender", "bench_fmnist", "contenders", "to_csv", "to_markdown"]

#: Radii of the table, on the [0, 1] pixel scale (1.58 is about 2 / sqrt(1.6), deel-lip's largest): the
#: radii at which deel-lip reports Fashion-MNIST, not certify.radius.DEFAULT_EPS (CIFAR-10's 36/255 ...).
EPS: tuple[float, ...] = (0.1, 0.3, 0.5, 1.0, 1.58)

@dataclass(frozen=True)
class Contender:
    """One network of the table: its library, its layer kind and how to build it (untrained)."""

    library: str
    kind: str
    build: Callable[[], nn.Module]

    @property
    def name(self) -> str:
        """``library:kind``, the name ``--models`` selects it by."""
        return f"{self.library}:{self.kind}"


def contenders(size: str = "s", num_classes: int = 10) -> list[Contender]:
    """Every network of the table whose library is installed: lipnet's registered kinds first, then the
    anchors of :data:`~lipnet.bench.anchors.ANCHORS` as their libraries ship them."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    arch = {**SIZES[size], "num_classes": num_classes}
    out = [
        Contender(
            "lipnet",
            kind,
            lambda kind=kind: create(f"fmnist_convnet_{size}", conv=kind, num_classes=num_classes),
        )
        for kind in list_layer_kinds()
    ]
    for anchor in ANCHORS.values():
        try:
            layers = anchor.layers(as_lipnet=False)
        except ImportError:
            continue
        out.append(
            Contender(
                anchor.library,
                anchor.name,
                lambda layers=layers, anchor=anchor: nn.Sequential(
                    *fmnist_layers(layers, activation=anchor.activation, pool=anchor.pool, **arch)
                ),
            )
        )
    return out


def _select(available: list[Contender], names: Sequence[str] | None) -> list[Contender]:
    if not names:
        return available
    by_name = {c.name: c for c in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown)} for bench fmnist; available: {', '.join(by_name)}"
        )
    return [by_name[n] for n in dict.fromkeys(names)]


def _robust(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: torch.Tensor,
    eps: Sequence[float],
    attack: str,
    steps: int,
    seed: int,
) -> list[float]:
    """Empirical robust accuracy at each ε (see the module docstring for what counts)."""
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).cpu()
    out = []
    for e in eps:
        certified = radii > e
        robust = certified & correct
        todo = correct & ~certified
        if todo.any():
            idx = todo.nonzero().squeeze(1)
            xs, ys = x[idx.to(x.device)], y[idx.to(y.device)]
            if attack == "autoattack":
                x_adv = autoattack_l2(model, xs, ys, e, seed=seed)
            else:
                x_adv = pgd_l2(model, xs, ys, e, steps=steps, restarts=1, seed=seed)
            with torch.no_grad():
                robust[idx] = (model(x_adv).argmax(dim=1) == ys).cpu()
        out.append(float(robust.double().mean()))
    return out


def bench_fmnist(
    *,
    size: str = "s",
    models: Sequence[str] | None = None,
    epochs: int = 5,
    time_cap: float | None = 300.0,
    n_train: int | None = None,
    n_test: int | None = None,
    attack_n: int = 1000,
    attack: str = "auto",
    attack_steps: int = 50,
    tau: float = 5.0,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    progress: bool = True,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train, certify and attack every selected contender under one budget; one dict per network.

    Keys: library, kind, params, epochs (done; fractional when the time cap stopped training),
    sec_per_epoch, clean, cert (list, one per :data:`EPS`), mean_radius (misclassified count 0),
    robust (list per :data:`EPS`, or None when ``attack_n`` is 0), attack, bound (the whole
    network's sound L2 bound), rule (the certificate: last-layer or global). ``attack``: ``auto``
    (:func:`certify.attacks.resolve_attack`: AutoAttack on CUDA, else PGD), ``autoattack`` or ``pgd`` (with
    ``attack_steps`` steps). ``on_row`` receives the rows so far after each network (to write partial
    results). A network whose training diverges raises
    :class:`~lipnet.training.loop.TrainingDivergedError` (the rows written before it are kept).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if time_cap is not None and not time_cap > 0:  # NaN too
        raise ValueError(f"time cap must be positive seconds, got {time_cap}")
    if attack_n < 0:
        raise ValueError(f"attack_n must be >= 0, got {attack_n}")
    dev = resolve_device(device)
    attack = resolve_attack(attack, dev).name
    attack_label = f"pgd ({attack_steps} steps)" if attack == "pgd" else "autoattack (apgd-ce, apgd-t)"
    # Unknown model names and a bad tau fail before any data is read (Fashion-MNIST has 10 classes).
    chosen = _select(contenders(size, len(FASHION_MNIST.classes)), models)
    loss_fn = losses.create("tau_ce", tau=tau)
    train_ds = data.load("fashion_mnist", "train", data_dir=data_dir, n=n_train)
    test_ds = data.load("fashion_mnist", "test", data_dir=data_dir, n=n_test)
    train_loader = data.DeviceLoader(train_ds, batch_size, shuffle=True, seed=seed, device=dev)
    shape = tuple(int(s) for s in test_ds.images.shape[1:])
    n_attack = min(attack_n, len(test_ds))
    x_att, y_att = test_ds.images[:n_attack].to(dev), test_ds.labels[:n_attack].to(dev)
    rows: list[dict[str, Any]] = []
    for c in chosen:
        torch.manual_seed(seed)
        model = c.build().to(dev)
        fitted = fit(
            model,
            torch.optim.Adam(model.parameters(), lr=lr),
            train_loader,
            classification_step(loss_fn),
            epochs=epochs,
            lr=lr,
            schedule="cosine",
            time_cap=time_cap,
            advice=lambda _epoch: "lower --lr",
            label=c.name,
            progress=progress,
        )
        done, seconds = fitted.epochs, fitted.seconds
        model.eval()
        result = certify.certify(
            model, data.DeviceLoader(test_ds, 500, device=dev), eps=list(EPS), progress=show_bars(progress)
        )
        robust = (
            _robust(model, x_att, y_att, result.radii[:n_attack], EPS, attack, attack_steps, seed)
            if n_attack
            else None
        )
        rows.append(
            {
                "library": c.library,
                "kind": c.kind,
                "params": sum(p.numel() for p in model.parameters()),
                "epochs": done,
                "sec_per_epoch": seconds / done if done else float("nan"),
                "clean": result.clean_accuracy,
                "cert": [result.certified_accuracy[e] for e in EPS],
                "mean_radius": result.mean_radius,
                "robust": robust,
                "attack": f"{attack_label} on {n_attack}" if n_attack else "none",
                "bound": lipschitz_bound(model, shape),
                "rule": result.rule,
            }
        )
        if on_row is not None:
            on_row(rows)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (fractions, not percentages; empty robust cells when nothing was attacked)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["library", "kind", "params", "epochs", "sec_per_epoch", "clean"]
        + [f"cert_{format_eps(e)}" for e in EPS]
        + ["mean_radius"]
        + [f"robust_{format_eps(e)}" for e in EPS]
        + ["attack", "bound", "rule"]
    )
    for r in rows:
        robust = r["robust"] if r["robust"] is not None else [""] * len(EPS)
        writer.writerow(
            [r["library"], r["kind"], r["params"], f"{r['epochs']:.6g}", f"{r['sec_per_epoch']:.4g}"]
            + [f"{r['clean']:.4f}"]
            + [f"{a:.4f}" for a in r["cert"]]
            + [f"{r['mean_radius']:.4f}"]
            + [a if a == "" else f"{a:.4f}" for a in robust]
            + [r["attack"], f"{r['bound']:.8g}", r["rule"]]
        )
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table (percentages), under ``header``."""
    eps = " / ".join(format_eps(e) for e in EPS)
    columns = [
        "library", "kind", "params", "epochs", "s/epoch", "clean", f"certified at ε = {eps}", "mean radius",
        f"empirical robust at ε = {eps}", "sound bound",
    ]  # fmt: skip

    def cells(r: dict[str, Any]) -> list[str]:
        robust = " / ".join(f"{100 * a:.1f}" for a in r["robust"]) if r["robust"] is not None else "—"
        return [
            str(r["library"]), str(r["kind"]), f"{r['params']:,}", f"{r['epochs']:.2f}",
            f"{r['sec_per_epoch']:.1f}", f"{100 * r['clean']:.2f}",
            " / ".join(f"{100 * a:.1f}" for a in r["cert"]), f"{r['mean_radius']:.3f}", robust,
            f"{r['bound']:.6f}",
        ]  # fmt: skip

    return markdown_table(header, columns, (cells(r) for r in rows)) + "\n"
