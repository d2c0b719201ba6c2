"""The accuracy-robustness sweep: one run per value of a loss parameter the loss declares sweepable.

The parameters are the loss's own (``lipnet.losses.sweepable(cfg.loss.name)``: tau, offset, margin,
alpha, gamma, epsilon, ...), each with its declared range; nothing here lists them.
``run_sweep(cfg, "tau", [0.5, 5, 50], "runs/demo")`` trains one model per value (through
:func:`lipnet.training.run.train`), each in its own run folder ``OUT/runs/tau-0.5`` ..., then writes

* ``OUT/sweep.csv``: value, clean accuracy, certified accuracy at each eps, mean radius, empirical
  robust accuracy at each eps on the first ``sweep.attack_n`` test images, training time, bound;
* ``OUT/sweep.md``: the same as a Markdown table (percentages);
* ``OUT/curve.png``: the trade-off (see :func:`lipnet.training.plots.plot_sweep`), when matplotlib is
  present.

With ``jobs > 1`` the values' runs are trained in up to ``jobs`` worker processes at once (fresh
interpreters, so layer kinds or models registered by the caller's own code are unknown there), each with
``threads // jobs`` torch threads (at least one); the attacks and the tables follow in this process.
Small networks use a second core better as a second process than as a second thread.

A sweep is resumable value by value: a finished run folder (``results.json``, written last) is not
retrained, a half-done one resumes from its last checkpoint, and the attack results are cached per run in
``empirical.json``. Every run's config is checked against the sweep's before anything is trained,
so a sweep never mixes runs of different configs.

The empirical robust accuracy is an upper bound of the true robust accuracy (an attack that fails
proves nothing), the certified one a lower bound. On the attacked subset the certified accuracy is
recomputed; an empirical accuracy below it means a certificate was broken, which is reported as a
soundness violation.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from certify.attacks import empirical_robust_accuracy, resolve_attack
from certify.io import atomic_write_json, atomic_write_text
from certify.radius import CertificationResult, certification_table, certified_accuracy, format_eps
from lipnet import losses
from lipnet.layers.kinds import AUTO
from lipnet.training.config import (
    RESUME_IGNORES,
    Config,
    ConfigError,
    ModelConfig,
    check_loss_argument,
    config_diff,
    dump_config,
)
from lipnet.training.devices import resolve_device
from lipnet.training.plots import plot_sweep
from lipnet.training.run import load_run_model, load_split, train_unless_finished
from lipnet.training.runs import RunError, RunFolder

__all__ = ["SweepResult", "SweepRow", "run_sweep", "sweep_configs", "value_dirname", "values_flag"]


@dataclass
class SweepRow:
    """One value of the sweep. Accuracies are fractions; lists follow the sweep's eps order."""

    value: float
    run_dir: Path
    clean_accuracy: float
    certified_accuracy: list[float]
    mean_radius: float
    empirical_accuracy: list[float] | None
    train_time: float
    lipschitz: float


@dataclass
class SweepResult:
    """The rows of a sweep and the files written for it."""

    param: str
    eps: list[float]
    rows: list[SweepRow]
    csv_path: Path
    md_path: Path
    png_path: Path | None
    violations: list[str]


def value_dirname(param: str, value: float) -> str:
    """Run-folder name of one value, e.g. ``tau-0.5``, ``margin-0.1``."""
    return f"{param}-{format(value, '.12g')}"


def values_flag(param: str) -> str:
    """The ``lipnet sweep`` option that lists the values of ``param``: ``--taus``, ``--pos-weights``."""
    return f"--{param.replace('_', '-')}s"


def sweep_configs(
    cfg: Config, param: str, values: Sequence[float], out: str | Path
) -> list[tuple[float, Config]]:
    """One validated config per value (``loss.<param> = value``, ``out = OUT/runs/<param>-<value>``).

    ``param`` must be an argument that the configured loss declares sweepable, each value in the range
    it declares (:func:`lipnet.losses.parameter_rule`). Raises :class:`ConfigError` for an impossible
    or repeated value, a parameter the loss does not take or does not declare, or a loss that cannot be
    built from the config's arguments (:func:`lipnet.losses.check_arguments`: nothing is built); nothing
    is trained or written.
    """
    if not values:
        raise ConfigError(
            f"no values to sweep: give {values_flag(param)} V1,V2 (or --param {param} --values V1,V2, "
            "or sweep.values in the config)"
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"repeated {param} values in {list(values)}")
    ordered = sorted(float(v) for v in values)
    for value in ordered:
        check_loss_argument(cfg.loss.name, param, value)
    try:
        declared = losses.sweepable(cfg.loss.name)
    except ValueError as err:
        raise ConfigError(f"loss: {err}") from None
    if param not in declared:
        why = (
            "it takes it, but does not declare it sweepable"
            if param in losses.arguments(cfg.loss.name)
            else "unknown argument"
        )
        raise ConfigError(
            f"cannot sweep {param!r} with loss {cfg.loss.name!r}: {why}; "
            f"{cfg.loss.name} can sweep {', '.join(declared) or 'nothing'}"
        )
    try:
        losses.check_arguments(cfg.loss.name, {**cfg.loss.kwargs, param: ordered[0]})
    except ValueError as err:
        raise ConfigError(f"loss: {err}") from None
    configs = []
    for value in ordered:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.loss.kwargs[param] = value
        run_cfg.sweep.param = param
        run_cfg.sweep.values = ordered
        run_cfg.out = str(Path(out) / "runs" / value_dirname(param, value))
        run_cfg.validate()
        configs.append((value, run_cfg))
    return configs


def _check_existing(run_cfg: Config) -> None:
    run = RunFolder(run_cfg.out or "")
    if not run.config_path.exists():
        return
    diff = config_diff(run.read_config(), run_cfg, ignore=RESUME_IGNORES)
    if diff:
        raise RunError(
            f"{run.path} was trained with a different config ({', '.join(diff)} differ): "
            "remove it or sweep into another --out"
        )


def _empirical(
    run_cfg: Config, test_ds: Any, eps: list[float], log: Callable[[str], None]
) -> tuple[list[float], list[float]]:
    """Empirical and certified accuracy at each eps on the first ``attack_n`` test images (cached).

    The certified accuracy of the same images comes from the run's per-sample radii.
    """
    s = run_cfg.sweep
    run = RunFolder(run_cfg.out or "")
    radii = run.read_radii()["radii"]
    n = min(s.attack_n, len(test_ds), len(radii))
    certified = [certified_accuracy(radii[:n], e) for e in eps]
    cache_path = run.path / "empirical.json"
    # the attack that runs (``auto`` resolves by device), so that a cached result is of that attack
    attack = resolve_attack(s.attack, resolve_device(run_cfg.device))
    key = {"attack": attack.name, "n": n, "steps": s.attack_steps, "eps": eps, "seed": run_cfg.seed}
    if cache_path.exists():
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached["empirical_accuracy"], certified
    model, _ = load_run_model(run.path, "final", run_cfg.device)
    device = next(model.parameters()).device
    x = test_ds.images[:n].to(device)
    y = test_ds.labels[:n].to(device)
    log(f"{run.path.name}: attacking {n} test images at {len(eps)} radii with {attack}")
    empirical = [
        empirical_robust_accuracy(model, x, y, e, attack=attack.name, steps=s.attack_steps, seed=run_cfg.seed)
        for e in eps
    ]
    atomic_write_json(cache_path, {"key": key, "empirical_accuracy": empirical})
    return empirical, certified


def _csv(param: str, eps: list[float], rows: list[SweepRow]) -> str:
    labels = [format_eps(e) for e in eps]
    header = [param, "clean_acc", *(f"cert_acc@{lab}" for lab in labels), "mean_radius"]
    with_emp = any(r.empirical_accuracy is not None for r in rows)
    if with_emp:
        header += [f"emp_acc@{lab}" for lab in labels]
    header += ["train_time_s", "lipschitz", "run"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line: list[Any] = [r.value, r.clean_accuracy, *r.certified_accuracy, r.mean_radius]
        if with_emp:
            line += r.empirical_accuracy if r.empirical_accuracy is not None else [""] * len(eps)
        line += [round(r.train_time, 3), r.lipschitz, r.run_dir.name]
        writer.writerow(line)
    return buf.getvalue()


def _markdown(
    cfg: Config, param: str, eps: list[float], rows: list[SweepRow], n_cert: int, kinds: list[str] | None
) -> str:
    """The sweep's Markdown table; ``kinds``: the layer kind each row's run built, a column when given."""
    with_emp = any(r.empirical_accuracy is not None for r in rows)
    attack = resolve_attack(cfg.sweep.attack, resolve_device(cfg.device)).name if with_emp else ""
    extra: dict[str, list[str]] = {}
    if with_emp:
        for k, e in enumerate(eps):
            extra[f"emp. ε={format_eps(e)}"] = [
                f"{100 * r.empirical_accuracy[k]:.2f}%" if r.empirical_accuracy else "—" for r in rows
            ]
    extra["train time"] = [f"{r.train_time:.1f} s" for r in rows]
    if kinds is not None:
        extra["kind"] = kinds
    results = [
        CertificationResult(
            n=n_cert,
            clean_accuracy=r.clean_accuracy,
            certified_accuracy=dict(zip(eps, r.certified_accuracy, strict=True)),
            mean_radius=r.mean_radius,
            lipschitz=r.lipschitz,
            rule="",
        )
        for r in rows
    ]
    table = certification_table(
        results, [f"{r.value:g}" for r in rows], label_header=param, n=False, extra=extra
    )
    lines = [
        f"# Sweep of `{param}`: {cfg.model.name} on {cfg.data.name}, loss `{cfg.loss.name}`",
        "",
        f"Certified accuracy on {n_cert} test images (sound bound, float64). "
        + (
            f"Empirical robust accuracy ({attack}, an upper bound) on the first "
            f"{cfg.sweep.attack_n} test images. "
            if with_emp
            else ""
        )
        + ("τ multiplies the logits: CE(τ·f, y)/τ." if param == "tau" else ""),
        "",
        table,
    ]
    return "\n".join(lines) + "\n"


def _train_in_worker(cfg: Config, label: str, threads: int, quiet: bool) -> None:
    """One value's run in a worker process: ``threads`` torch threads, each log line headed by ``label``
    (printed and flushed at once: the workers share the terminal or log file; none when ``quiet``)."""
    torch.set_num_threads(threads)

    def log(message: str) -> None:
        # every line of a multi-line message (the certification table) is headed: workers' lines interleave
        if not quiet:
            print("\n".join(f"[{label}] {line}" for line in message.splitlines()), flush=True)

    train_unless_finished(cfg, log=log)  # every line is headed by the label already


def _train_in_parallel(
    configs: Sequence[tuple[float, Config]], param: str, jobs: int, log: Callable[[str], None], quiet: bool
) -> None:
    """Train the unfinished runs of ``configs`` in up to ``jobs`` worker processes (module docstring)."""
    pending = [(v, c) for v, c in configs if not RunFolder(c.out or "").is_finished()]
    if not pending:
        return
    workers = min(jobs, len(pending))
    threads = max(1, torch.get_num_threads() // workers)
    log(f"training {len(pending)} run(s) in {workers} processes, {threads} torch thread(s) each")
    # spawn: a fresh interpreter per worker (fork would copy this process's torch thread pool and locks)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_train_in_worker, run_cfg, f"{param}={value:g}", threads, quiet)
            for value, run_cfg in pending
        ]
        for future in futures:
            future.result()  # a worker's exception (a diverged run, a bad config) is raised here


def run_sweep(
    cfg: Config,
    param: str,
    values: Sequence[float],
    out: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> SweepResult:
    """Train, certify and attack one model per value, then write the csv, md and png (module docstring).

    ``jobs``: how many values' runs train at once, each in its own worker process (module docstring).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    silent = log is None and not progress
    if log is None:
        log = tqdm.write if progress else (lambda _line: None)
    out = Path(out)
    configs = sweep_configs(cfg, param, values, out)
    for _, run_cfg in configs:
        _check_existing(run_cfg)
    atomic_write_text(out / "config.yaml", dump_config(configs[0][1]))
    if jobs > 1:
        _train_in_parallel(configs, param, jobs, log, quiet=silent)

    eps = list(cfg.certify.eps)
    test_ds = None
    rows: list[SweepRow] = []
    built: list[str] = []  # the network each run built, from its results (conv: auto follows its tau)
    violations: list[str] = []
    for value, run_cfg in configs:
        run = train_unless_finished(run_cfg, f"{param}={value:g}", progress=progress, log=log)
        results = run.read_results()
        built.append(ModelConfig(**results["model"]).label())
        cert = results["certify"]
        if [float(e) for e in cert["eps"]] != eps:
            raise RunError(f"{run.path}/results.json was certified at other radii than {eps}")
        empirical = None
        if cfg.sweep.attack_n > 0:
            if test_ds is None:
                test_ds = load_split(cfg, "test")
            empirical, cert_subset = _empirical(run_cfg, test_ds, eps, log)
            for e, emp, cer in zip(eps, empirical, cert_subset, strict=True):
                if emp < cer:
                    violations.append(
                        f"{param}={value:g}, eps={format_eps(e)}: empirical {emp:.4f} < certified {cer:.4f} "
                        "on the same images: a certificate was broken"
                    )
        rows.append(
            SweepRow(
                value=value,
                run_dir=run.path,
                clean_accuracy=float(cert["clean_accuracy"]),
                certified_accuracy=[float(a) for a in cert["certified_accuracy"]],
                mean_radius=float(cert["mean_radius"]),
                empirical_accuracy=empirical,
                train_time=float(results["train_time"]),
                lipschitz=float(cert["lipschitz"]),
            )
        )

    csv_path, md_path, png_path = out / "sweep.csv", out / "sweep.md", out / "curve.png"
    atomic_write_text(csv_path, _csv(param, eps, rows))
    n_cert = int(RunFolder(configs[0][1].out or "").read_results()["certify"]["n"])
    kinds = built if cfg.model.kwargs.get("conv") == AUTO else None
    atomic_write_text(md_path, _markdown(configs[0][1], param, eps, rows, n_cert, kinds))
    plotted = plot_sweep(
        param,
        [r.value for r in rows],
        [r.clean_accuracy for r in rows],
        [r.certified_accuracy for r in rows],
        eps,
        png_path,
    )
    if not plotted:
        log("note: matplotlib is not installed, so curve.png was not drawn (pip install 'lipnet[plot]')")
    for line in violations:
        log(f"SOUNDNESS VIOLATION: {line}")
    return SweepResult(param, eps, rows, csv_path, md_path, png_path if plotted else None, violations)
