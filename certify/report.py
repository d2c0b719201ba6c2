"""The audit report: its data, its JSON / Markdown / PNG renderings, and their atomic writing.

:func:`write_report` renders ``audit.json``, ``audit.md`` and ``radii.png`` (the histogram of the
certified radii and the certified-accuracy curve; skipped with a note when matplotlib is not
installed) in memory and then commits them with :func:`certify.io.atomic_write_files`: an audit
that fails or is interrupted leaves either the previous report or none, never a half-written one.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from certify.io import atomic_write_files, matplotlib_available
from certify.radius import format_eps

__all__ = ["CLAIM_TOLERANCE", "AuditReport", "LayerReport", "Violation", "write_report"]


#: Relative margin within which a layer's bound or lower estimate still counts as meeting its library's claim
#: (the bounds carry float64 slacks of this order, and the lower estimates are float32 autograd).
CLAIM_TOLERANCE = 1e-6


def _num(x: float | None) -> float | str | None:
    """JSON has no infinities: write them as strings."""
    if x is None:
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return "nan"
    return float(x)


@dataclass
class LayerReport:
    """One row of the per-layer table: a leaf's sound bound and a lower estimate of its norm.

    ``lower`` is the largest ``||J v||`` (``||v|| = 1``) seen by power iteration on the layer's
    Jacobian at the recorded input of one real sample: a *lower* bound of the layer's Lipschitz
    constant, exact in the limit for a linear layer. ``bound / lower >= 1`` always holds for a sound
    bound; a ratio below ``1 - tolerance`` proves the bound wrong.
    """

    path: str
    kind: str
    bound: float
    lower: float | None
    input_shape: tuple[int, ...]
    folded_into: str | None = None
    note: str = ""
    claimed: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.lower is None or self.lower <= 0:
            return None
        return self.bound / self.lower

    @property
    def claim(self) -> str | None:
        """How certify's numbers compare with ``claimed`` (the constant the layer's library claims):
        None without a claim, ``"holds"`` when the bound is within it, ``"exceeded"`` when the bound is
        above it (the claim is not proven), ``"refuted"`` when the lower estimate is above it by more
        than :data:`CLAIM_TOLERANCE` (the claim is false at a real input)."""
        if self.claimed is None:
            return None
        if self.lower is not None and self.lower > self.claimed * (1 + CLAIM_TOLERANCE):
            return "refuted"
        return "holds" if self.bound <= self.claimed * (1 + CLAIM_TOLERANCE) else "exceeded"

    def claim_line(self) -> str | None:
        """One line for a layer whose claim is exceeded or refuted, else None."""
        if self.claim not in ("exceeded", "refuted") or self.claimed is None:
            return None
        lower = f", lower estimate {self.lower:.6g}" if self.lower is not None else ""
        verdict = "the claim is false" if self.claim == "refuted" else "the claim is not proven"
        return (
            f"layer '{self.path}' ({self.kind}) claims {self.claimed:.6g}; certify bounds it by "
            f"{self.bound:.6g}{lower}: {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "bound": _num(self.bound),
            "lower": _num(self.lower),
            "ratio": _num(self.ratio),
            "input_shape": list(self.input_shape),
            "folded_into": self.folded_into,
            "note": self.note,
            "claimed": _num(self.claimed),
            "claim": self.claim,
        }


@dataclass
class Violation:
    """A certified sample whose prediction an attack changed inside its certified radius."""

    index: int
    label: int
    predicted: int
    radius: float
    distance: float
    attack: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "predicted": self.predicted,
            "radius": _num(self.radius),
            "distance": _num(self.distance),
            "attack": self.attack,
        }

    def __str__(self) -> str:
        return (
            f"sample {self.index} (label {self.label}) certified at radius {self.radius:.6g} is classified "
            f"{self.predicted} at L2 distance {self.distance:.6g} ({self.attack})"
        )


@dataclass
class AuditReport:
    """Everything an audit measured. Accuracies are fractions in [0, 1]; radii are L2, pixel scale.

    ``passed`` is False when an attack changed a certified prediction inside its radius
    (``violations``) or when a lower estimate of a layer or of the network exceeds its bound
    (``bound_violations``): either proves a certificate wrong.
    """

    passed: bool
    model: str
    input_shape: tuple[int, ...]
    n: int
    eps: list[float]
    lipschitz: float
    rule: str
    body_bound: float | None
    head: str | None
    layers: list[LayerReport]
    clean_accuracy: float
    certified_accuracy: dict[float, float]
    mean_radius: float
    attack: str
    attack_subset: list[str]
    n_attack: int
    empirical_accuracy: dict[float, float]
    certified_accuracy_attacked: dict[float, float]
    cross_checked: int
    network_lower: float | None
    violations: list[Violation]
    bound_violations: list[str]
    normalization: dict[str, list[float]] | None = None
    claimed_bound: float | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    radii: Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "n": self.n,
            "eps": [format_eps(e) for e in self.eps],
            "lipschitz_bound": _num(self.lipschitz),
            "certificate": self.rule,
            "body_bound": _num(self.body_bound),
            "head": self.head,
            "claimed_bound": _num(self.claimed_bound),
            "normalization": self.normalization,
            "network_lower_bound": _num(self.network_lower),
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {format_eps(e): a for e, a in self.certified_accuracy.items()},
            "mean_radius": _num(self.mean_radius),
            "attack": self.attack,
            "attack_subset": self.attack_subset,
            "n_attack": self.n_attack,
            "certified_accuracy_attacked": {
                format_eps(e): a for e, a in self.certified_accuracy_attacked.items()
            },
            "empirical_accuracy": {format_eps(e): a for e, a in self.empirical_accuracy.items()},
            "cross_checked": self.cross_checked,
            "violations": [v.to_dict() for v in self.violations],
            "bound_violations": self.bound_violations,
            "claims_not_met": self.claim_lines(),
            "layers": [row.to_dict() for row in self.layers],
            "notes": self.notes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "files": self.files,
        }

    def summary(self) -> str:
        """A few lines for the terminal."""
        status = "PASSED" if self.passed else "FAILED"
        lines = [
            f"audit {status}: {self.model}, input {self.input_shape}, n={self.n}",
            f"Lipschitz bound {self.lipschitz:.6g} ({self.rule} certificate"
            + (f", body bound {self.body_bound:.6g}" if self.body_bound is not None else "")
            + ")"
            + (f", empirical lower bound {self.network_lower:.6g}" if self.network_lower is not None else ""),
            f"clean accuracy {100 * self.clean_accuracy:.2f}%, certified: "
            + ", ".join(f"{format_eps(e)}: {100 * a:.2f}%" for e, a in self.certified_accuracy.items()),
        ]
        if self.empirical_accuracy:
            lines.append(
                f"empirical robust accuracy ({self.attack}, n={self.n_attack}): "
                + ", ".join(f"{format_eps(e)}: {100 * a:.2f}%" for e, a in self.empirical_accuracy.items())
            )
        lines.extend(f"VIOLATION: {v}" for v in self.violations)
        lines.extend(f"BOUND VIOLATION: {b}" for b in self.bound_violations)
        lines.extend(f"CLAIM: {c}" for c in self.claim_lines())
        return "\n".join(lines)

    def claim_lines(self) -> list[str]:
        """One line per third-party layer whose bound or lower estimate exceeds what its library claims."""
        return [line for row in self.layers if (line := row.claim_line()) is not None]

    def to_markdown(self) -> str:
        status = "PASSED" if self.passed else "**FAILED**"
        out = [f"# Audit of `{self.model}`: {status}", ""]
        out.append(
            f"- input shape {self.input_shape}, {self.n} samples, "
            f"ε ∈ {{{', '.join(map(format_eps, self.eps))}}} (L2)"
        )
        out.append(f"- sound Lipschitz bound of the network: **{self.lipschitz:.6g}**")
        if self.body_bound is not None:
            out.append(
                f"- certificate: last-layer rule on head `{self.head}` "
                f"(bound of the body: {self.body_bound:.6g})"
            )
        else:
            out.append("- certificate: global rule, radius = margin / (√2 · L)")
        if self.network_lower is not None:
            ratio = self.lipschitz / self.network_lower if self.network_lower > 0 else math.inf
            out.append(
                f"- empirical lower bound of the network's Lipschitz constant: {self.network_lower:.6g} "
                f"(bound / lower = {ratio:.3g})"
            )
        if self.claimed_bound is not None:
            out.append(f"- the model's own `lipschitz_bound()` claims {self.claimed_bound:.6g} (not used)")
        if self.normalization is not None:
            out.append(
                f"- input normalisation mean={self.normalization['mean']}, std={self.normalization['std']} "
                "(bound multiplied by 1 / min std)"
            )
        if self.violations or self.bound_violations:
            out += ["", "## Violations", ""]
            out += [f"- {v}" for v in self.violations]
            out += [f"- {b}" for b in self.bound_violations]
        if self.claim_lines():
            out += ["", "## Third-party claims not met", ""]
            out += [f"- {c}" for c in self.claim_lines()]
        out += ["", "## Certified vs empirical accuracy", ""]
        out.append("| ε | certified (all) | certified (attacked subset) | empirical (attacked subset) |")
        out.append("|---|---|---|---|")
        for e in self.eps:
            emp = self.empirical_accuracy.get(e)
            sub = self.certified_accuracy_attacked.get(e)
            out.append(
                f"| {format_eps(e)} | {100 * self.certified_accuracy[e]:.2f}% | "
                + (f"{100 * sub:.2f}%" if sub is not None else "–")
                + " | "
                + (f"{100 * emp:.2f}%" if emp is not None else "–")
                + " |"
            )
        out.append("")
        out.append(
            f"Clean accuracy {100 * self.clean_accuracy:.2f}%, mean certified radius {self.mean_radius:.4g}. "
            f"Attack: {self.attack}"
            + (f" ({', '.join(self.attack_subset)})" if self.attack_subset else "")
            + f" on {self.n_attack} samples; {self.cross_checked} certified samples attacked inside "
            "their radius."
        )
        out += ["", "## Per-layer bounds", ""]
        claims = any(row.claimed is not None for row in self.layers)
        if claims:
            out.append(
                "The *claimed* column is the constant the layer's library (deel-torchlip, orthogonium) "
                "claims; a layer whose sound bound exceeds it is flagged **exceeded** (the claim is not "
                "proven), one whose lower estimate exceeds it **refuted** (the claim is false)."
            )
            out.append("")
        header = "| layer | type | input shape | bound | lower estimate | bound / lower |"
        out.append(header + (" claimed |" if claims else ""))
        out.append("|---|---|---|---|---|---|" + ("---|" if claims else ""))
        for row in self.layers:
            lower_cell = f"{row.lower:.6g}" if row.lower is not None else "–"
            ratio_cell = f"{row.ratio:.4g}" if row.ratio is not None else "–"
            kind = row.kind + (f" (folded into {row.folded_into})" if row.folded_into else "")
            path = f"`{row.path}`" if row.path else "(top level)"
            note = f" {row.note}" if row.note else ""
            cells = [
                path,
                f"{kind}{note}",
                str(tuple(row.input_shape)),
                f"{row.bound:.6g}",
                lower_cell,
                ratio_cell,
            ]
            if claims:
                flag = {"exceeded": " **exceeded**", "refuted": " **refuted**"}.get(row.claim or "", "")
                cells.append(f"{row.claimed:.6g}{flag}" if row.claimed is not None else "–")
            out.append("| " + " | ".join(cells) + " |")
        if self.notes:
            out += ["", "## Notes", ""]
            out += [f"- {note}" for note in self.notes]
        if self.timings:
            out += ["", "## Timings", ""]
            out += [f"- {k}: {v:.2f} s" for k, v in self.timings.items()]
        return "\n".join(out) + "\n"


def _plot(report: AuditReport) -> bytes:
    """``radii.png``: the histogram of the certified radii and the certified-accuracy curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    radii = report.radii.detach().to(torch.float64).cpu()
    finite = radii[torch.isfinite(radii)]
    positive = finite[finite > 0]
    top = max([*report.eps, float(positive.max()) if positive.numel() else 0.0, 1e-3]) * 1.1
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    if positive.numel():
        ax1.hist(positive.numpy(), bins=40, color="tab:blue")
    ax1.set_xlabel("certified L2 radius (correct samples)")
    ax1.set_ylabel("samples")
    ax1.set_title(f"{int(positive.numel())} of {radii.numel()} samples with a radius > 0")
    for e in report.eps:
        ax1.axvline(e, color="gray", linestyle=":")
    grid = torch.linspace(0.0, top, 200, dtype=torch.float64)
    curve = [(radii > g).double().mean().item() for g in grid]
    ax2.plot(grid.numpy(), curve, color="tab:blue", label="certified")
    if report.empirical_accuracy:
        ax2.plot(
            list(report.empirical_accuracy),
            list(report.empirical_accuracy.values()),
            "o",
            color="tab:red",
            label=f"empirical ({report.attack}, n={report.n_attack})",
        )
    ax2.set_xlabel("ε (L2)")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend()
    ax2.set_title("certified accuracy vs ε")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_report(report: AuditReport, out_dir: str | Path) -> list[Path]:
    """Write ``audit.json``, ``audit.md`` and ``radii.png`` into ``out_dir``, atomically; returns their paths.

    Every file is rendered first; then :func:`certify.io.atomic_write_files` commits them all (a new
    folder appears whole). On any error ``out_dir`` is untouched.
    """
    plot = matplotlib_available()
    note = "matplotlib is not installed: radii.png was not written"
    if not plot and note not in report.notes:
        report.notes.append(note)
    report.files = ["audit.json", "audit.md"] + (["radii.png"] if plot else [])
    files = {
        "audit.json": (json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"),
        "audit.md": report.to_markdown().encode("utf-8"),
    }
    if plot:
        files["radii.png"] = _plot(report)
    return atomic_write_files(out_dir, files)
