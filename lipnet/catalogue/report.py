"""The catalogue's outputs (``catalogue.csv``, ``catalogue.md``, ``catalogue.png``) and reading them back."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

from certify.io import atomic_write_bytes, atomic_write_text, matplotlib_available
from certify.radius import format_eps

__all__ = ["CatalogueRow", "columns", "read_rows", "write_outputs"]

_CERT = "certified@"


@dataclass
class CatalogueRow:
    """One line of the table; ``certified`` maps an eps label (e.g. ``36/255``) to certified accuracy.

    ``lipschitz`` is the sound bound the certificates use (the network's, or the main task's for
    multi-task networks); ``lipschitz_raw`` the same network's bound with the attention modules'
    normalisation switched off. ``settings`` is the JSON of the task's budget (what resuming compares);
    ``details`` the JSON of the task-specific metrics (per attribute, per task, instance AUC, ...).
    """

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
    settings: str
    details: str


def columns(eps: Sequence[float]) -> list[str]:
    """The CSV header for the eps values ``eps``."""
    return [
        "method", "task", "metric", "metric_value", "clean_accuracy",
        *(f"{_CERT}{format_eps(e)}" for e in eps),
        "robust_accuracy", "attack", "lipschitz_raw", "lipschitz", "params", "train_seconds",
        "delta_metric", "delta_clean", f"delta_{_CERT}{format_eps(eps[0])}", "params_ratio", "time_ratio",
        "settings", "details",
    ]  # fmt: skip


def _baselines(rows: Sequence[CatalogueRow]) -> dict[str, CatalogueRow]:
    return {r.task: r for r in rows if r.method == "baseline"}


def _deltas(row: CatalogueRow, base: CatalogueRow | None, eps0: str) -> list[str]:
    """The cost against the task's plain baseline: metric deltas and parameter / time ratios.

    Computed from the values as the table prints them (4 decimals, seconds to 0.1 s), so that a table
    read back by :func:`read_rows` and written again is the same table.
    """
    if base is None:
        return ["", "", "", "", ""]
    seconds, base_seconds = round(row.train_seconds, 1), round(base.train_seconds, 1)
    return [
        f"{round(row.metric_value, 4) - round(base.metric_value, 4):+.4f}",
        f"{round(row.clean_accuracy, 4) - round(base.clean_accuracy, 4):+.4f}",
        f"{round(row.certified[eps0], 4) - round(base.certified[eps0], 4):+.4f}",
        f"{row.params / base.params:.2f}",
        "" if base_seconds == 0 else f"{seconds / base_seconds:.2f}",
    ]


def _ceil6(x: float) -> str:
    """``x`` to 6 significant digits, rounded up: a printed bound must stay an upper bound."""
    d = Decimal(repr(x))
    return str(d.quantize(Decimal(1).scaleb(d.adjusted() - 5), rounding=ROUND_CEILING).normalize())


def _flat(row: CatalogueRow, eps: Sequence[float], base: CatalogueRow | None, exact: bool) -> list[object]:
    """One row as printed; ``exact`` writes the bounds in full (``repr``) so the CSV reads back exactly."""
    cert = row.certified
    bound = repr if exact else _ceil6
    return [
        row.method, row.task, row.metric, f"{row.metric_value:.4f}", f"{row.clean_accuracy:.4f}",
        *(f"{cert[format_eps(e)]:.4f}" for e in eps),
        "" if row.robust_accuracy is None else f"{row.robust_accuracy:.4f}", row.attack,
        bound(row.lipschitz_raw), bound(row.lipschitz), row.params, f"{row.train_seconds:.1f}",
        *_deltas(row, base, format_eps(eps[0])),
        row.settings, row.details,
    ]  # fmt: skip


def read_rows(path: Path) -> list[CatalogueRow]:
    """The rows of a ``catalogue.csv`` written by :func:`write_outputs` (empty if there is none).

    A file that cannot be parsed raises ``ValueError`` naming it: a resumed run must not silently
    start over and overwrite it.
    """
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        rows = []
        for r in records:
            cert = {k[len(_CERT) :]: float(v) for k, v in r.items() if k.startswith(_CERT)}
            rows.append(
                CatalogueRow(
                    method=r["method"],
                    task=r["task"],
                    metric=r["metric"],
                    metric_value=float(r["metric_value"]),
                    clean_accuracy=float(r["clean_accuracy"]),
                    certified=cert,
                    robust_accuracy=float(r["robust_accuracy"]) if r["robust_accuracy"] else None,
                    attack=r["attack"],
                    lipschitz_raw=float(r["lipschitz_raw"]),
                    lipschitz=float(r["lipschitz"]),
                    params=int(r["params"]),
                    train_seconds=float(r["train_seconds"]),
                    settings=r["settings"],
                    details=r["details"],
                )
            )
        return rows
    except (KeyError, ValueError, TypeError, csv.Error) as err:
        raise ValueError(
            f"cannot resume from {path}: not a catalogue table ({err}); move it away or pass --restart"
        ) from err


def _markdown_table(rows: Sequence[CatalogueRow], eps: Sequence[float]) -> str:
    cols = [c for c in columns(eps) if c not in ("settings", "details")]
    base = _baselines(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append(
            "| " + " | ".join(str(v) for v in _flat(row, eps, base.get(row.task), False)[:-2]) + " |"
        )
    return "\n".join(lines) + "\n"


def _settings_table(rows: Sequence[CatalogueRow]) -> str:
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r.task, r.settings)
    lines = ["| task | settings |", "|---|---|"]
    lines += [f"| {t} | `{s}` |" for t, s in seen.items()]
    return "\n".join(lines) + "\n"


def _details_table(rows: Sequence[CatalogueRow]) -> str:
    lines = ["| method | task | details |", "|---|---|---|"]
    lines += [f"| {r.method} | {r.task} | `{r.details}` |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[CatalogueRow], eps: Sequence[float], path: Path) -> bool:
    if not matplotlib_available() or not rows:
        return False
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r.task for r in rows))
    cols = min(3, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig = Figure(figsize=(5.5 * cols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    series = ["clean", *(format_eps(e) for e in eps)]
    width = 0.8 / len(series)
    for ax, task in zip(axes.flat, tasks, strict=False):
        mine = [r for r in rows if r.task == task]
        for k, name in enumerate(series):
            values = [r.clean_accuracy if name == "clean" else r.certified[name] for r in mine]
            label = name if name == "clean" else f"certified {name}"
            ax.bar([i + k * width for i in range(len(mine))], [100 * v for v in values], width, label=label)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(mine))], [r.method for r in mine], fontsize=7, rotation=30
        )
        ax.set(ylabel="accuracy (%)", title=f"{task}: clean and certified (L2)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_outputs(
    rows: Sequence[CatalogueRow], eps: Sequence[float], out: Path, command: str, *, plot: bool = True
) -> list[Path]:
    """Write ``catalogue.csv``, ``catalogue.md`` and (with ``plot`` and matplotlib) ``catalogue.png``."""
    out.mkdir(parents=True, exist_ok=True)
    base = _baselines(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns(eps))
    writer.writerows(_flat(r, eps, base.get(r.task), True) for r in rows)
    written = [out / "catalogue.csv", out / "catalogue.md"]
    atomic_write_text(written[0], buf.getvalue())
    note = (
        "# Catalogue\n\nCommand: `" + command + "`\n\n"
        "Certified accuracy uses a sound bound of the whole network (`lipschitz`; per task, attribute or "
        "pixel where the task says so); `lipschitz_raw` is the same network with the attention modules' "
        "normalisation off. Deltas and ratios are against the task's plain 1-Lipschitz baseline.\n\n"
    )
    text = (
        note
        + _markdown_table(rows, eps)
        + "\n## Settings per task\n\n"
        + _settings_table(rows)
        + "\n## Task details\n\n"
        + _details_table(rows)
    )
    atomic_write_text(written[1], text)
    if plot and _plot(rows, eps, out / "catalogue.png"):
        written.append(out / "catalogue.png")
    return written
