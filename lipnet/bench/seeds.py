"""``lipnet bench seeds``: the mean and spread over seeds of ``lipnet bench fmnist`` runs.

Each folder is one ``lipnet bench fmnist --out`` folder (its ``setup.json`` and finished ``rows/``), trained
with its own ``--seed``. The folders must describe the same setup but for the seed (the recipe, layout,
data budget, attack and device of :func:`lipnet.bench.fmnist.describe_setup`), and no two the same seed:
a mean over runs of different recipes, or over one run counted twice, would be a claim about nothing. Rows
are matched by τ, library and kind; a network missing from some folders is averaged over the folders that
have it (the ``seeds`` column says which).

For each network: the mean of clean accuracy, of certified accuracy at each ε of
:data:`~lipnet.bench.fmnist.EPS` and of the mean certified radius, each with its sample standard deviation
(``n - 1`` in the denominator; none for a single seed).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from certify.radius import format_eps
from lipnet.bench import markdown_table
from lipnet.bench.fmnist import EPS

__all__ = ["seed_means", "seeds_markdown"]


def _read(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    setup_path = folder / "setup.json"
    if not setup_path.is_file():
        raise ValueError(f"{folder}: no setup.json (not a lipnet bench fmnist --out folder)")
    try:
        setup = json.loads(setup_path.read_text(encoding="utf-8"))
        rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((folder / "rows").glob("*.json"))]
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: unreadable ({err})") from None
    if not rows:
        raise ValueError(f"{folder}: no finished rows in {folder / 'rows'}")
    return setup, rows


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def seed_means(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One dict per network (τ, library, kind) of the runs in ``folders`` (module docstring): ``tau``,
    ``library``, ``kind``, ``seeds`` (those that have it, in the folders' order), ``clean`` and ``clean_sd``,
    ``cert`` and ``cert_sd`` (one per ε of :data:`~lipnet.bench.fmnist.EPS`), ``mean_radius`` and
    ``mean_radius_sd`` (sd None for one seed). Sorted by τ (rows without one first), library and kind.
    ``ValueError`` for fewer than two folders, folders of another setup or a repeated seed."""
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise ValueError(f"give at least two run folders (one per seed), got {len(paths)}")
    runs = [_read(p) for p in paths]
    reference = {k: v for k, v in runs[0][0].items() if k != "seed"}
    seeds: list[int] = []
    for path, (setup, _rows) in zip(paths, runs, strict=True):
        other = {k: v for k, v in setup.items() if k != "seed"}
        if other != reference:
            differ = sorted(k for k in set(other) | set(reference) if other.get(k) != reference.get(k))
            raise ValueError(
                f"{path} was trained under another setup than {paths[0]} (differs in {', '.join(differ)})"
            )
        seed = setup.get("seed")
        if not isinstance(seed, int):
            raise ValueError(f"{path}/setup.json names no seed")
        if seed in seeds:
            raise ValueError(
                f"{path} has seed {seed}, as an earlier folder: each folder must hold another seed"
            )
        seeds.append(seed)
    groups: dict[tuple[float | None, str, str], list[tuple[int, dict[str, Any]]]] = {}
    for seed, (_setup, rows) in zip(seeds, runs, strict=True):
        for row in rows:
            groups.setdefault((row.get("tau"), row["library"], row["kind"]), []).append((seed, row))
    out = []
    for (tau, library, kind), members in groups.items():
        rows = [r for _, r in members]
        clean = [r["clean"] for r in rows]
        radius = [r["mean_radius"] for r in rows]
        cert = [[r["cert"][i] for r in rows] for i in range(len(EPS))]
        out.append(
            {
                "tau": tau,
                "library": library,
                "kind": kind,
                "seeds": [s for s, _ in members],
                "clean": statistics.fmean(clean),
                "clean_sd": _spread(clean),
                "cert": [statistics.fmean(c) for c in cert],
                "cert_sd": [_spread(c) for c in cert],
                "mean_radius": statistics.fmean(radius),
                "mean_radius_sd": _spread(radius),
            }
        )
    out.sort(key=lambda r: (r["tau"] is not None, r["tau"] or 0.0, r["library"], r["kind"]))
    return out


def _cell(mean: float, sd: float | None, scale: float, digits: int) -> str:
    text = f"{scale * mean:.{digits}f}"
    return text if sd is None else f"{text} ({scale * sd:.{digits}f})"


def seeds_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows of :func:`seed_means` as a Markdown table (percentages; the sample standard deviation in
    brackets), under ``header``."""
    eps = " / ".join(format_eps(e) for e in EPS)
    columns = ["τ", "library", "kind", "seeds", "clean", f"certified at ε = {eps}", "mean radius"]
    body = (
        [
            "—" if r["tau"] is None else f"{r['tau']:g}",
            r["library"],
            r["kind"],
            ", ".join(str(s) for s in r["seeds"]),
            _cell(r["clean"], r["clean_sd"], 100, 2),
            " / ".join(_cell(m, s, 100, 1) for m, s in zip(r["cert"], r["cert_sd"], strict=True)),
            _cell(r["mean_radius"], r["mean_radius_sd"], 1, 3),
        ]
        for r in rows
    )
    return markdown_table(header, columns, body) + "\n"
