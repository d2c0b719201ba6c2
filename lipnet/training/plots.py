"""PNG plots of runs and sweeps, drawn with matplotlib's Agg canvas (no display, no pyplot state).

matplotlib is an optional dependency (the ``plot`` extra): every function returns False, and
writes nothing, when it is not installed; callers print a note.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certify.io import atomic_write_bytes, matplotlib_available
from certify.radius import format_eps

__all__ = ["plot_history", "plot_sweep"]


def _save(fig: Any, path: str | Path) -> None:
    # Figure.savefig picks the Agg canvas for PNG without touching pyplot's global backend.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> bool:
    """Training curves of one run: loss per epoch, and train/test accuracy per epoch."""
    if not matplotlib_available() or not history:
        return False
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["loss"] for row in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [100 * row["train_acc"] for row in history], marker="o", label="train")
    ax_acc.plot(epochs, [100 * row["test_acc"] for row in history], marker="s", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="clean accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def plot_sweep(
    param: str,
    values: Sequence[float],
    clean: Sequence[float],
    certified: Sequence[Sequence[float]],
    eps: Sequence[float],
    path: str | Path,
) -> bool:
    """The accuracy-robustness trade-off of a sweep, two panels.

    Left: clean accuracy against certified accuracy at ``eps[0]``, one point per value (the
    Pareto front). Right: certified accuracy against eps, one line per value. Accuracies are
    fractions; ``certified[i][k]`` is value ``i`` at ``eps[k]``; eps are labelled by
    :func:`certify.radius.format_eps`.
    """
    if not matplotlib_available() or not values:
        return False
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    labels = [format_eps(e) for e in eps]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax_front, ax_eps = fig.subplots(1, 2)
    xs = [100 * c for c in clean]
    ys = [100 * row[0] for row in certified]
    ax_front.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
    ax_front.scatter(xs, ys, c=range(len(values)), cmap="viridis", zorder=2)
    for v, x, y in zip(values, xs, ys, strict=True):
        ax_front.annotate(f"{param}={v:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax_front.set(
        xlabel="clean accuracy (%)",
        ylabel=f"certified accuracy at ε={labels[0]} (%)",
        title="accuracy vs certified robustness",
    )
    cmap = colormaps["viridis"]
    for i, (v, row) in enumerate(zip(values, certified, strict=True)):
        colour = cmap(i / max(1, len(values) - 1))
        ax_eps.plot(list(eps), [100 * a for a in row], marker="o", color=colour, label=f"{param}={v:g}")
    ax_eps.set(
        xlabel="ε (L2, pixel scale [0, 1])", ylabel="certified accuracy (%)", title="certified accuracy vs ε"
    )
    ax_eps.set_xticks(list(eps), labels, rotation=30)
    ax_eps.legend(fontsize=8)
    for ax in (ax_front, ax_eps):
        ax.grid(alpha=0.3)
    _save(fig, path)
    return True
