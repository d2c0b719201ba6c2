"""``lipnet bench recipe``: which elements of a training recipe win, measured on one budget.

A *base* run config and, for each *ablation*, the same config with one element of the recipe toggled,
are each trained through :func:`lipnet.training.run.train` (the one fit loop) on the same budget (the
epochs, the first ``n_train`` training images), the same seed (the same initialisation wherever the
architecture is the same, and the same data order), then certified by :func:`certify.certify` on the
first ``n_test`` test images. The table gives, per row, the clean and certified accuracies, the mean
certified radius and the seconds per epoch (wall-clock of the training steps), averaged over the seeds,
and the difference to the base row.

An ablation is either a named element (:data:`ABLATIONS`), which *toggles* that element relative to the
base (it turns warm-up, the moving average, clipping, ... on when the base has it off and off when the
base has it on; a factor such as ``lr_x2`` scales the base's value), or one ``section.key=value``
override (``optim.lr=4e-3``). So the same list measures what adding an element brings to a plain config
and what removing it costs the recommended one.

Each run keeps its folder (``OUT/runs/<ablation>-seed<k>``): a finished run is read back, not trained
again, and an interrupted one resumes, so an interrupted bench continues where it stopped.
``recipe.csv`` and ``recipe.md`` are rewritten after every run.
"""

from __future__ import annotations

import csv
import inspect
import io
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certify.io import atomic_write_text
from certify.radius import format_eps
from lipnet.bench import markdown_table
from lipnet.losses import arguments as loss_arguments
from lipnet.models import model_entrypoint
from lipnet.training.config import Config, ConfigError, apply_overrides, parse_override
from lipnet.training.run import describe_recipe, train_unless_finished

__all__ = [
    "ABLATIONS",
    "Ablation",
    "RecipeRow",
    "bench_recipe",
    "resolve_ablations",
    "to_csv",
    "to_markdown",
    "write_tables",
]


@dataclass(frozen=True)
class Ablation:
    """One element of the recipe: ``toggle(base)`` is the list of ``section.key=value`` overrides that
    turn it on or off relative to ``base`` (``ConfigError`` when it does not apply to that config)."""

    name: str
    description: str
    toggle: Callable[[Config], list[str]]


def _model_argument(cfg: Config, argument: str) -> Any:
    """The value of model argument ``argument`` in ``cfg``: the config's, else the constructor's default."""
    if argument in cfg.model.kwargs:
        return cfg.model.kwargs[argument]
    params = inspect.signature(model_entrypoint(cfg.model.name)).parameters
    if argument not in params or params[argument].default is inspect.Parameter.empty:
        raise ConfigError(f"model {cfg.model.name!r} has no argument {argument!r} with a default")
    return params[argument].default


def _warmup(cfg: Config) -> list[str]:
    if cfg.optim.schedule == "onecycle":
        raise ConfigError("the onecycle schedule has its own warm-up")
    return ["optim.warmup=0" if cfg.optim.warmup else "optim.warmup=0.1"]


def _smoothing(cfg: Config) -> list[str]:
    if "label_smoothing" not in loss_arguments(cfg.loss.name):
        raise ConfigError(f"loss {cfg.loss.name!r} takes no label_smoothing")
    return [
        "loss.label_smoothing=0" if cfg.loss.kwargs.get("label_smoothing") else "loss.label_smoothing=0.1"
    ]


def _offset(cfg: Config) -> list[str]:
    if "offset" not in loss_arguments(cfg.loss.name):
        raise ConfigError(f"loss {cfg.loss.name!r} takes no offset")
    if cfg.loss.kwargs.get("offset"):
        return ["loss.offset=0"]
    eps = cfg.certify.eps[len(cfg.certify.eps) // 2]
    return [f"loss.offset={math.sqrt(2) * eps:.6g}"]  # the logit margin of radius eps on a 1-Lipschitz net


def _head(cfg: Config) -> list[str]:
    head = _model_argument(cfg, "head")
    return ["model.head=kind" if head == "rownorm" else "model.head=rownorm"]


def _augment(cfg: Config) -> list[str]:
    if cfg.data.augment:
        return ["data.augment=false"]
    return ["data.augment=true", "data.crop_padding=2"]


def _scaled(key: str, factor: float) -> Callable[[Config], list[str]]:
    def toggle(cfg: Config) -> list[str]:
        section, name = key.split(".")
        if section == "model":
            value = _model_argument(cfg, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"model.{name} is {value!r}, not a number to scale")
            return [f"model.{name}={max(1, round(value * factor))}"]
        value = getattr(cfg.optim, name)
        scaled = max(1, round(value * factor)) if isinstance(value, int) else value * factor
        return [f"optim.{name}={scaled:.6g}" if isinstance(scaled, float) else f"optim.{name}={scaled}"]

    return toggle


def _blocks(cfg: Config) -> list[str]:
    blocks = _model_argument(cfg, "blocks")
    return [f"model.blocks={0 if blocks else 1}"]


#: The named ablations, each toggling one element relative to the base config.
ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in (
        Ablation("warmup", "linear warm-up over 10% of the steps (on/off)", _warmup),
        Ablation(
            "ema",
            "moving average of the weights, decay 0.999 (on/off)",
            lambda c: ["optim.ema=null" if c.optim.ema is not None else "optim.ema=0.999"],
        ),
        Ablation(
            "clip",
            "gradient clipping at norm 1 (on/off)",
            lambda c: [
                "optim.clip_grad_norm=null"
                if c.optim.clip_grad_norm is not None
                else "optim.clip_grad_norm=1"
            ],
        ),
        Ablation(
            "weight_decay",
            "weight decay 1e-4 (on/off)",
            lambda c: ["optim.weight_decay=0" if c.optim.weight_decay else "optim.weight_decay=1e-4"],
        ),
        Ablation("smoothing", "label smoothing 0.1 (on/off)", _smoothing),
        Ablation("offset", "Lipschitz-margin offset sqrt(2) eps, eps the middle radius (on/off)", _offset),
        Ablation("augment", "random shifts of up to 2 pixels, flips where the data allow (on/off)", _augment),
        Ablation(
            "constant_lr",
            "constant learning rate instead of the schedule (and back to cosine)",
            lambda c: ["optim.schedule=cosine" if c.optim.schedule == "none" else "optim.schedule=none"],
        ),
        Ablation("rownorm", "row-normalised head (on/off)", _head),
        Ablation("lr_x2", "twice the learning rate", _scaled("optim.lr", 2.0)),
        Ablation("lr_half", "half the learning rate", _scaled("optim.lr", 0.5)),
        Ablation("batch_half", "half the batch", _scaled("optim.batch_size", 0.5)),
        Ablation("batch_x2", "twice the batch", _scaled("optim.batch_size", 2.0)),
        Ablation("width_x2", "twice the model width", _scaled("model.width", 2.0)),
        Ablation("blocks", "channel-preserving blocks per stage: 0 <-> 1", _blocks),
    )
}

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def resolve_ablations(base: Config, names: Sequence[str] | None) -> list[tuple[str, list[str]]]:
    """``(label, overrides)`` of each ablation, checked against ``base`` (each toggled config validated);
    every applicable named ablation when ``names`` is None. ``ConfigError`` for an unknown name, an
    ablation that does not apply to ``base`` or an override the config refuses."""
    out: list[tuple[str, list[str]]] = []
    if names is None:
        for ablation in ABLATIONS.values():
            try:
                overrides = ablation.toggle(base)
                apply_overrides(base, overrides).model.check()
            except ConfigError:
                continue
            out.append((ablation.name, overrides))
        return out
    for name in names:
        if name in ABLATIONS:
            try:
                overrides = ABLATIONS[name].toggle(base)
            except ConfigError as err:
                raise ConfigError(f"ablation {name!r} does not apply to the base config: {err}") from None
        elif _OVERRIDE.match(name):
            parse_override(name)
            overrides = [name]
        else:
            raise ConfigError(
                f"unknown ablation {name!r}: give one of {', '.join(ABLATIONS)} or an override such as "
                "optim.lr=4e-3"
            )
        try:
            apply_overrides(base, overrides).model.check()
        except ConfigError as err:
            raise ConfigError(f"ablation {name!r}: {err}") from None
        out.append((name, overrides))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"ablations repeat: {', '.join(labels)}")
    return out


@dataclass
class RecipeRow:
    """One row of the table: an ablation (``base`` for the base config) averaged over its seeds."""

    label: str
    overrides: list[str]
    recipe: str
    seeds: list[int]
    clean: float
    certified: list[float]
    mean_radius: float
    sec_per_epoch: float
    clean_std: float
    radius_std: float


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def bench_recipe(
    base: Config,
    ablations: Sequence[tuple[str, list[str]]],
    *,
    out: str | Path,
    epochs: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = False,
    log: Callable[[str], None] = lambda _line: None,
    on_rows: Callable[[list[RecipeRow]], None] | None = None,
) -> list[RecipeRow]:
    """Train and certify the base config and each ablation for each seed (module docstring).

    ``epochs``, ``n_train`` and ``n_test`` replace the base's ``optim.epochs``, ``data.n_train`` and
    ``data.n_test`` (the budget; ``None`` keeps the config's); every run is certified on all the test
    images it loads. ``on_rows`` receives the rows after every finished run (the ablations not yet run
    are left out); the rows are returned at the end, the base first.
    """
    budget = [f"optim.epochs={epochs}"] if epochs is not None else []
    budget += [f"data.n_train={n_train}"] if n_train is not None else []
    budget += [f"data.n_test={n_test}"] if n_test is not None else []
    budget.append("certify.n=null")
    if not seeds:
        raise ConfigError("give at least one seed")
    runs_dir = Path(out) / "runs"
    plan: list[tuple[str, list[str]]] = [("base", []), *((label, list(o)) for label, o in ablations)]
    configs: list[tuple[str, list[str], list[Config]]] = []
    for label, overrides in plan:
        per_seed = []
        for seed in seeds:
            cfg = apply_overrides(base, [*overrides, *budget, f"seed={seed}"])
            cfg.out = str(runs_dir / f"{_slug(label)}-seed{seed}")
            per_seed.append(cfg)
        configs.append((label, overrides, per_seed))

    results: dict[str, list[dict[str, Any]]] = {}
    rows: list[RecipeRow] = []
    for label, overrides, per_seed in configs:
        for cfg in per_seed:
            run = train_unless_finished(cfg, f"{label}, seed {cfg.seed}", progress=progress, log=log)
            results.setdefault(label, []).append(run.read_results())
        rows.append(_row(label, overrides, per_seed, results[label]))
        if on_rows is not None:
            on_rows(rows)
    return rows


def _row(label: str, overrides: list[str], cfgs: list[Config], results: list[dict[str, Any]]) -> RecipeRow:
    certs = [r["certify"] for r in results]
    clean = [c["clean_accuracy"] for c in certs]
    radius = [c["mean_radius"] for c in certs]
    per_epoch = [r["train_time"] / r["epochs"] for r in results]
    return RecipeRow(
        label=label,
        overrides=overrides,
        recipe=describe_recipe(cfgs[0]),
        seeds=[c.seed for c in cfgs],
        clean=statistics.fmean(clean),
        certified=[
            statistics.fmean(col) for col in zip(*(c["certified_accuracy"] for c in certs), strict=True)
        ],
        mean_radius=statistics.fmean(radius),
        sec_per_epoch=statistics.fmean(per_epoch),
        clean_std=statistics.stdev(clean) if len(clean) > 1 else 0.0,
        radius_std=statistics.stdev(radius) if len(radius) > 1 else 0.0,
    )


def to_csv(rows: Sequence[RecipeRow], eps: Sequence[float]) -> str:
    """The rows as CSV: fractions (not percentages), the seeds ``;``-separated, deltas to the base row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["ablation", "overrides", "seeds", "clean"]
        + [f"cert_{format_eps(e)}" for e in eps]
        + ["mean_radius", "sec_per_epoch", "clean_std", "radius_std", "delta_clean", "delta_radius"]
    )
    base = rows[0]
    for r in rows:
        writer.writerow(
            [r.label, " ".join(r.overrides), ";".join(str(s) for s in r.seeds), f"{r.clean:.4f}"]
            + [f"{a:.4f}" for a in r.certified]
            + [f"{r.mean_radius:.4f}", f"{r.sec_per_epoch:.4g}", f"{r.clean_std:.4f}", f"{r.radius_std:.4f}"]
            + [f"{r.clean - base.clean:.4f}", f"{r.mean_radius - base.mean_radius:.4f}"]
        )
    return buf.getvalue()


def to_markdown(rows: Sequence[RecipeRow], eps: Sequence[float], header: str) -> str:
    """The rows as a Markdown table under ``header``: percentages, radius, s/epoch, deltas to the base."""
    spread = len(rows[0].seeds) > 1
    columns = [
        "ablation",
        "changes",
        "clean" + (" (± sd)" if spread else ""),
        "certified at ε = " + " / ".join(format_eps(e) for e in eps),
        "mean radius" + (" (± sd)" if spread else ""),
        "s/epoch",
        "Δ clean",
        "Δ radius",
    ]
    base = rows[0]

    def cells(r: RecipeRow) -> list[str]:
        clean = f"{100 * r.clean:.2f}" + (f" ± {100 * r.clean_std:.2f}" if spread else "")
        radius = f"{r.mean_radius:.3f}" + (f" ± {r.radius_std:.3f}" if spread else "")
        return [
            r.label,
            ", ".join(f"`{o}`" for o in r.overrides) or "—",
            clean,
            " / ".join(f"{100 * a:.1f}" for a in r.certified),
            radius,
            f"{r.sec_per_epoch:.1f}",
            f"{100 * (r.clean - base.clean):+.2f}",
            f"{r.mean_radius - base.mean_radius:+.3f}",
        ]

    recipe = f"\n\nBase recipe: {base.recipe}."
    return markdown_table(header + recipe, columns, (cells(r) for r in rows)) + "\n"


def write_tables(out: str | Path, rows: Sequence[RecipeRow], eps: Sequence[float], header: str) -> None:
    """``recipe.csv`` and ``recipe.md`` in ``out`` (created), each written atomically."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.csv", to_csv(rows, eps))
    atomic_write_text(folder / "recipe.md", to_markdown(rows, eps, header))
