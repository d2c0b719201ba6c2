"""``lipnet bench seeds``: the mean and spread over seeds of ``lipnet bench fmnist`` runs, and lipnet's
paired differences against the anchors.

Each folder is one ``lipnet bench fmnist --out`` folder (its ``setup.json`` and finished ``rows/``), trained
with its own ``--seed``. The folders must describe the same setup but for the seed (the recipe, layout,
data budget, attack and device of :func:`lipnet.bench.fmnist.describe_setup`): a mean over runs of
different recipes would be a claim about nothing. Several folders may hold the same seed (one run's
networks trained as separate processes), but no network may appear twice for one seed: one run counted
twice would shrink the spread it is judged by. Rows are matched by τ, library and kind; a network missing
from some seeds is averaged over the seeds that have it (the ``seeds`` column says which). ``models``
(``library:kind`` names) keeps those networks only; ``lipnet:auto`` stands, as in ``lipnet bench fmnist``,
for the network ``model.conv: auto`` trains at each τ for the folders' setup: under today's rule, so that
rows trained under an older one are left out.

For each network: the mean of clean accuracy, of certified accuracy at each ε of
:data:`~lipnet.bench.fmnist.EPS` and of the mean certified radius, each with its sample standard deviation
(``n - 1`` in the denominator; none for a single seed).

For each lipnet network and each anchor (a network of another library) at the same τ, over the ``n ≥ 2``
seeds both were trained with: the mean of the per-seed differences ``d_s = lipnet_s - anchor_s`` in each
column and its standard error ``sd(d) / sqrt(n)``. Pairing by seed removes what the seed does to both
networks alike (the data order; the initialisation of layers the two share), so the standard error is that
of the difference itself; a mean difference within about two standard errors of zero is not a settled
difference either way.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from certify.radius import format_eps
from lipnet.bench import cell, markdown_table
from lipnet.bench.fmnist import EPS, LAYOUT_KEYS, contenders
from lipnet.layers.kinds import AUTO

__all__ = ["differences_markdown", "paired_differences", "seed_means", "seeds_markdown"]

LIPNET = "lipnet"
"""The library whose networks :func:`paired_differences` compares against every other one."""

Network = tuple[float | None, str, str]
"""A row's identity across seeds: (τ, library, kind)."""


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


def _auto_name(setup: dict[str, Any]) -> Callable[[float | None], str]:
    """``tau -> "lipnet:<network>"``: the network ``lipnet:auto`` of ``lipnet bench fmnist`` trains at
    ``tau`` under ``setup`` (a ``setup.json``: the model's size, layout and lipnet options)."""
    model = setup["model"]
    layout = {k: model[k] for k in LAYOUT_KEYS}
    lipnet = contenders(model["size"], layout=layout, lipnet_options=model.get("lipnet"))
    (auto,) = (c for c in lipnet if c.library == LIPNET and c.kind == AUTO)
    assert auto.kind_at is not None  # lipnet:auto is the contender that stands for one network per τ
    return auto.kind_at


def _rows_by_seed(
    folders: Sequence[str | Path], models: Sequence[str] | None
) -> dict[int, dict[Network, dict[str, Any]]]:
    """The rows of ``folders`` per seed (in the folders' order) and network, checked as the module
    docstring says; with ``models`` (``library:kind`` names), those networks' rows only."""
    paths = [Path(f) for f in folders]
    if len(paths) < 2:
        raise ValueError(f"give at least two run folders (one per seed), got {len(paths)}")
    runs = [_read(p) for p in paths]
    reference = {k: v for k, v in runs[0][0].items() if k != "seed"}
    auto_name = _auto_name(runs[0][0]) if models is not None and f"{LIPNET}:{AUTO}" in models else None

    def wanted(key: Network) -> bool:
        name = f"{key[1]}:{key[2]}"
        return models is None or name in models or (auto_name is not None and auto_name(key[0]) == name)

    by_seed: dict[int, dict[Network, dict[str, Any]]] = {}
    origin: dict[tuple[int, Network], Path] = {}
    for path, (setup, rows) in zip(paths, runs, strict=True):
        other = {k: v for k, v in setup.items() if k != "seed"}
        if other != reference:
            differ = sorted(k for k in set(other) | set(reference) if other.get(k) != reference.get(k))
            raise ValueError(
                f"{path} was trained under another setup than {paths[0]} (differs in {', '.join(differ)})"
            )
        seed = setup.get("seed")
        if not isinstance(seed, int):
            raise ValueError(f"{path}/setup.json names no seed")
        networks = by_seed.setdefault(seed, {})
        for row in rows:
            key: Network = (row.get("tau"), row["library"], row["kind"])
            if not wanted(key):
                continue
            if key in networks:
                raise ValueError(
                    f"{path} has {key[1]}:{key[2]} at tau {key[0]} for seed {seed}, as {origin[seed, key]} "
                    "does: each network once per seed"
                )
            networks[key] = row
            origin[seed, key] = path
    if models is not None:
        found = {f"{key[1]}:{key[2]}" for rows in by_seed.values() for key in rows}
        if auto_name is not None and any(
            auto_name(k[0]) == f"{k[1]}:{k[2]}" for r in by_seed.values() for k in r
        ):
            found.add(f"{LIPNET}:{AUTO}")
        if missing := [m for m in models if m not in found]:
            raise ValueError(f"no rows of {', '.join(missing)} in {', '.join(str(p) for p in paths)}")
    by_seed = {seed: rows for seed, rows in by_seed.items() if rows}  # seeds with none of ``models``
    if len(by_seed) < 2:
        raise ValueError(f"give runs of at least two seeds, got seed {', '.join(map(str, by_seed))} only")
    return by_seed


def _values(row: dict[str, Any]) -> list[float]:
    """Clean accuracy, certified accuracy per ε, mean radius: the columns of both tables."""
    return [row["clean"], *row["cert"], row["mean_radius"]]


def _columns(means: list[float], spreads: Sequence[float | None], spread: str) -> dict[str, Any]:
    """The per-column ``means`` and their ``spreads`` (in :func:`_values`' order) under the names of the
    tables' rows: ``clean``, ``cert`` (per ε), ``mean_radius``, each spread under ``<name>_<spread>``."""
    return {
        "clean": means[0],
        f"clean_{spread}": spreads[0],
        "cert": means[1:-1],
        f"cert_{spread}": list(spreads[1:-1]),
        "mean_radius": means[-1],
        f"mean_radius_{spread}": spreads[-1],
    }


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _order(key: Network) -> tuple[bool, float, str, str]:
    tau, library, kind = key
    return (tau is not None, tau or 0.0, library, kind)


def seed_means(folders: Sequence[str | Path], models: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per network (τ, library, kind) of the runs in ``folders`` (module docstring): ``tau``,
    ``library``, ``kind``, ``seeds`` (those that have it, in the folders' order), ``clean`` and ``clean_sd``,
    ``cert`` and ``cert_sd`` (one per ε of :data:`~lipnet.bench.fmnist.EPS`), ``mean_radius`` and
    ``mean_radius_sd`` (sd None for one seed). Sorted by τ (rows without one first), library and kind.
    With ``models`` (``library:kind`` names), those networks only. ``ValueError`` for fewer than two
    folders or seeds, folders of another setup, a network repeated for one seed or a model without rows."""
    by_seed = _rows_by_seed(folders, models)
    groups: dict[Network, list[tuple[int, dict[str, Any]]]] = {}
    for seed, networks in by_seed.items():
        for key, row in networks.items():
            groups.setdefault(key, []).append((seed, row))
    out = []
    for key in sorted(groups, key=_order):
        members = groups[key]
        columns = list(zip(*(_values(r) for _, r in members), strict=True))
        means = [statistics.fmean(c) for c in columns]
        spreads = [_spread(list(c)) for c in columns]
        out.append(
            {
                "tau": key[0],
                "library": key[1],
                "kind": key[2],
                "seeds": [s for s, _ in members],
                **_columns(means, spreads, "sd"),
            }
        )
    return out


def paired_differences(
    folders: Sequence[str | Path], models: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """lipnet against each anchor, per τ, over the seeds both networks have (module docstring): one dict
    per pair sharing at least two seeds, with ``tau``, ``kind`` (lipnet's), ``anchor`` (``library:kind``),
    ``seeds``, and per column (``clean``, ``cert`` per ε, ``mean_radius``) the mean difference and its
    standard error (``clean_se``, ``cert_se``, ``mean_radius_se``); ``behind``: the columns (``clean``, the
    ε, ``radius``) where the mean difference is negative. Sorted by τ, lipnet kind and anchor. ``models``
    and errors as :func:`seed_means`."""
    by_seed = _rows_by_seed(folders, models)
    networks = sorted({key for rows in by_seed.values() for key in rows}, key=_order)
    names = ["clean", *(format_eps(e) for e in EPS), "radius"]
    out = []
    for ours in (k for k in networks if k[1] == LIPNET):
        for theirs in (k for k in networks if k[1] != LIPNET and k[0] == ours[0]):
            seeds = [s for s, rows in by_seed.items() if ours in rows and theirs in rows]
            if len(seeds) < 2:
                continue  # one difference has no spread to judge it by
            diffs = [
                [a - b for a, b in zip(_values(by_seed[s][ours]), _values(by_seed[s][theirs]), strict=True)]
                for s in seeds
            ]
            columns = [list(c) for c in zip(*diffs, strict=True)]
            means = [statistics.fmean(c) for c in columns]
            errors = [statistics.stdev(c) / math.sqrt(len(c)) for c in columns]
            out.append(
                {
                    "tau": ours[0],
                    "kind": ours[2],
                    "anchor": f"{theirs[1]}:{theirs[2]}",
                    "seeds": seeds,
                    **_columns(means, errors, "se"),
                    "behind": [n for n, m in zip(names, means, strict=True) if m < 0],
                }
            )
    return out


def _cell(mean: float, spread: float | None, scale: float, digits: int, sign: str = "") -> str:
    text = f"{scale * mean:{sign}.{digits}f}"
    return text if spread is None else f"{text} ({scale * spread:.{digits}f})"


def seeds_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows of :func:`seed_means` as a Markdown table (percentages; the sample standard deviation in
    brackets), under ``header``."""
    eps = " / ".join(format_eps(e) for e in EPS)
    columns = ["τ", "library", "kind", "seeds", "clean", f"certified at ε = {eps}", "mean radius"]
    body = (
        [
            cell(r["tau"], "g", "—"),
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


def differences_markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The rows of :func:`paired_differences` as a Markdown table (percentage points, lipnet minus the
    anchor; the standard error in brackets), under ``header``."""
    eps = " / ".join(format_eps(e) for e in EPS)
    columns = ["τ", "lipnet", "against", "seeds", "Δ clean", f"Δ certified at ε = {eps}", "Δ mean radius",
               "lipnet behind in"]  # fmt: skip
    body = (
        [
            cell(r["tau"], "g", "—"),
            r["kind"],
            r["anchor"],
            ", ".join(str(s) for s in r["seeds"]),
            _cell(r["clean"], r["clean_se"], 100, 2, "+"),
            " / ".join(_cell(m, s, 100, 2, "+") for m, s in zip(r["cert"], r["cert_se"], strict=True)),
            _cell(r["mean_radius"], r["mean_radius_se"], 1, 4, "+"),
            ", ".join(r["behind"]) or "—",
        ]
        for r in rows
    )
    return markdown_table(header, columns, body) + "\n"
