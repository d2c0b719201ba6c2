"""Audit a model: a sound Lipschitz bound, certified radii, and an attack cross-check of every certificate.

:func:`audit` runs, in order,

1. **bound**: :func:`certify.graph.analyze` traces the model (with input normalisation
   ``(x - mean) / std`` prepended when given: a :class:`certify.rules.folding.Normalize`, which multiplies
   the bound by ``1 / min std``) and bounds it along its graph, with one row per leaf layer. Each
   row gets a lower estimate by power iteration on the layer's Jacobian at the input a real sample
   gives it (:func:`jacobian_norm_lower`), and the network one from the same on a few samples. A
   deel-torchlip or orthogonium layer's row also carries the constant its library claims
   (:func:`certify.third_party.claimed_bound`), flagged where the bound exceeds it (the claim is
   not proven) or the lower estimate does (the claim is false): a wrong claim is reported, not used;
2. **certification**: radii from the logits of a float32 forward pass (``certify.radius``): the
   last-layer rule ``min_j (f_y - f_j) / (L_g ||w_y - w_j||)`` when the model ends in a linear
   layer on per-sample features, the global rule ``margin / (sqrt 2 L)`` otherwise;
3. **attacks** on the first ``n_attack`` samples, under :func:`certify.attacks.frozen` (parameters frozen,
   so a parametrized layer computes its weight once, not at every attack step): empirical robust
   accuracy at each eps (AutoAttack through ``pyautoattack``, or L2 PGD; ``auto`` picks by
   :func:`certify.attacks.resolve_attack`: AutoAttack on CUDA, PGD on a CPU), and the cross-check:
   every sample certified at radius ``r`` is attacked inside ``0.999 r`` by per-sample PGD and, with
   AutoAttack, by AutoAttack on groups of samples with similar radii (one radius per group, the
   smallest). Adversarial points of the eps attacks that land inside a certified ball count too.
   The eps attacks run in ascending order, each on the samples no smaller eps has broken, and PGD
   drops a sample as soon as its prediction flips, which is what keeps a CPU audit to minutes.

An attack that changes a certified prediction inside its radius, or a lower estimate above a
bound, proves a certificate wrong: the report's ``passed`` is False and it names the sample (or
the layer). Reports are written atomically (:func:`certify.report.write_report`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from certify.attacks import autoattack_l2, frozen, pgd_l2, resolve_attack
from certify.bounds import module_bound
from certify.graph import GraphAnalysis, analyze
from certify.radius import (
    DEFAULT_EPS,
    FORWARD_SLACK,
    certified_accuracy,
    certified_radius,
    format_eps,
    parse_eps,
)
from certify.report import AuditReport, LayerReport, Violation, write_report
from certify.rules.folding import Normalize
from certify.third_party import claimed_bound

__all__ = ["BOUND_TOLERANCE", "audit", "empirical_lipschitz_lower", "jacobian_norm_lower"]

#: A lower estimate above ``bound * (1 + BOUND_TOLERANCE)`` proves the bound wrong. The estimates are
#: computed by float32 autograd, whose relative error is far below this.
BOUND_TOLERANCE = 1e-3
#: Radii within this factor of a group's smallest radius are attacked together by AutoAttack.
_GROUP_RATIO = 1.25
_ATTACKS = ("auto", "autoattack", "pgd", "none")


def _jvp_vjp(fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(J v, J^T J v)`` of ``fn`` at ``x`` by reverse mode twice (the double-backward trick).

    ``J^T u`` is linear in ``u``, so differentiating ``<J^T u, v>`` with respect to ``u`` gives
    ``J v``; this works for any model autograd can differentiate twice in that sense, including
    parametrized and TorchScript modules.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        u = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, xg, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
        (jtjv,) = torch.autograd.grad(y, xg, jv)
    return jv.detach(), jtjv.detach()


def jacobian_norm_lower(
    fn: Callable[[Tensor], Tensor], x: Tensor, *, iterations: int = 30, seed: int = 0
) -> float:
    """A lower bound of ``||J_fn(x)||_2`` (hence of ``fn``'s Lipschitz constant) by power iteration.

    ``x`` is a batch of one sample. Every iterate ``v`` is a unit vector and ``||J v||`` a lower
    bound of the spectral norm; the largest seen is returned. The iteration on ``J^T J`` converges
    to the spectral norm from below (Golub & Van Loan, section 8.2). At a point where a piecewise
    smooth ``fn`` is differentiable ``||J(x)|| <= Lip(fn)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    v = v / v.norm()
    best = 0.0
    for _ in range(iterations):
        jv, jtjv = _jvp_vjp(fn, x, v)
        best = max(best, float(jv.double().norm().item()))
        norm = jtjv.norm()
        if not torch.isfinite(norm) or norm.item() == 0.0:
            break
        v = jtjv / norm
    return best


def empirical_lipschitz_lower(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    iterations: int = 30,
    steps: int = 100,
    step_size: float = 0.01,
    seed: int = 0,
) -> float:
    """Empirical lower bound of ``fn``'s Lipschitz constant from the samples ``x`` (a batch).

    The maximum of (a) :func:`jacobian_norm_lower` at each sample and (b) gradient ascent on the
    difference quotient ``||fn(a) - fn(b)|| / ||a - b||`` over pairs started at ``(x, x + 1e-3 v)``
    along the top singular direction ``v`` (Adam, as LiResNet's ``check_lipschitz_lower_bound``):
    for piecewise-linear networks the Jacobian norm has zero gradient almost everywhere, the
    quotient does not. Every value compared is attained by some pair, so the result is a lower bound.

    The quotient's numerator is the difference of two nearly equal forward passes, whose rounding
    divided by a small ``||a - b||`` could pose as a large constant (``x + 1e4`` in float32 measured
    3.8). So the value recorded is ``(||fn(a) - fn(b)|| - s (||fn(a)|| + ||fn(b)||)) / ||a - b||``,
    both differences taken in float64, with ``s`` the forward-pass rounding allowance of
    :mod:`certify.radius` (1e-5 for float32 outputs, 1e-12 for float64): a lower bound of the exact
    quotient under the same assumption as the certificates.
    """
    best = 0.0
    directions = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        best = max(best, jacobian_norm_lower(fn, xi, iterations=iterations, seed=seed + i))
        _, jtjv = _jvp_vjp(fn, xi, torch.ones_like(xi) / math.sqrt(xi.numel()))
        directions.append(jtjv / jtjv.norm().clamp_min(1e-30))
    if steps <= 0:
        return best
    a = x.detach().clone().requires_grad_(True)
    b = (x.detach() + 1e-3 * torch.cat(directions)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=step_size)
    for _ in range(steps):
        with torch.enable_grad():
            fa, fb = fn(a), fn(b)
            diff = (fa - fb).flatten(1).norm(dim=1)
            gap = (a - b).flatten(1).norm(dim=1).clamp_min(1e-12)
            ratio = diff / gap
        with torch.no_grad():
            fa64, fb64 = fa.detach().flatten(1).double(), fb.detach().flatten(1).double()
            slack = FORWARD_SLACK.get(fa.dtype, FORWARD_SLACK[torch.float32])
            noise = slack * (fa64.norm(dim=1) + fb64.norm(dim=1))
            gap64 = (a.detach().double() - b.detach().double()).flatten(1).norm(dim=1)
            sure = ((fa64 - fb64).norm(dim=1) - noise) / gap64
            if bool((gap64 > 0).any()):
                best = max(best, float(sure[gap64 > 0].max().item()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, (torch.float64 if t.dtype == torch.float64 else torch.float32)
    return torch.device("cpu"), torch.float32


def _check_batch(x: object, y: object, shape: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("the loader must yield (inputs, labels) pairs of tensors")
    if not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"inputs must be a float tensor (N, ...), got {x.dtype} of shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if shape is not None and tuple(x.shape[1:]) != shape:
        raise ValueError(f"input shape {tuple(x.shape[1:])} differs from the expected {shape}")
    if not torch.isfinite(x).all():
        raise ValueError("the input data contain NaN or Inf")
    if x.numel() and (x.min().item() < -1e-6 or x.max().item() > 1 + 1e-6):
        raise ValueError(
            f"inputs must be raw pixels in [0, 1] (found [{x.min().item():.4g}, {x.max().item():.4g}]): "
            "radii are measured on that scale; give the model's normalisation as mean/std instead"
        )
    return x, y


def _check_outputs(logits: Tensor) -> None:
    """Refuse logits with NaN or Inf, counting the inputs they come from (a NaN has no margin)."""
    nan = int(logits.isnan().any(dim=1).sum())
    inf = int(logits.isinf().any(dim=1).sum())
    if nan or inf:
        found = " and ".join(
            f"{what} on {k} input{'s' if k > 1 else ''}" for what, k in (("NaN", nan), ("Inf", inf)) if k
        )
        raise ValueError(
            f"the model's outputs contain {found} (of {logits.shape[0]} audited): such a logit has no "
            "margin to certify; check the model's weights (an overflow?) and its forward"
        )


def _radius_groups(radii: Tensor) -> list[Tensor]:
    """Indices grouped so that within a group ``max radius <= _GROUP_RATIO * min radius``."""
    order = torch.argsort(radii)
    groups: list[list[int]] = []
    for i in order.tolist():
        if groups and radii[i] <= _GROUP_RATIO * radii[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [torch.tensor(g, dtype=torch.long) for g in groups]


class _CrossCheck:
    """Collects prediction flips inside certified radii on the attacked subset."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, radii: Tensor) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.radii = radii.to(torch.float64)
        self.violations: dict[int, Violation] = {}

    def check(self, idx: Tensor, x_adv: Tensor, attack: str) -> None:
        if idx.numel() == 0:
            return
        with torch.no_grad():
            pred = self.model(x_adv).argmax(dim=1).cpu()
        dist = (x_adv.double() - self.x[idx].double()).flatten(1).norm(dim=1).cpu()
        labels = self.y[idx].cpu()
        r = self.radii[idx].cpu()
        for j in torch.nonzero((pred != labels) & (r > 0) & (dist < r)).flatten().tolist():
            i = int(idx[j])
            if i not in self.violations:
                self.violations[i] = Violation(
                    i, int(labels[j]), int(pred[j]), float(r[j]), float(dist[j]), attack
                )


def _attack_phase(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Tensor,
    eps_values: list[float],
    attack: str,
    aa_attacks: Sequence[str],
    pgd_steps: int,
    pgd_restarts: int,
    shrink: float,
    seed: int,
    progress: bool,
) -> tuple[dict[float, float], int, list[Violation]]:
    checker = _CrossCheck(model, x, y, radii)
    certified = torch.nonzero(radii > 0).flatten()
    groups = _radius_groups(radii[certified]) if attack == "autoattack" else []
    total = len(eps_values) + (1 if certified.numel() else 0) + len(groups)
    # The whole [0, 1] box has diameter sqrt(d): an infinite radius is attacked over all of it.
    cap = math.sqrt(x[0].numel())
    empirical: dict[float, float] = {}
    # A point found inside a smaller ball lies inside every larger one, so each eps attacks only the
    # samples that no smaller eps has broken (ascending order); the accuracies stay witnessed.
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    with tqdm(total=total, desc="attacks", disable=not progress, leave=False) as bar:
        for e in sorted(eps_values):
            idx = torch.nonzero(~broken).flatten()
            if idx.numel():
                if attack == "autoattack":
                    x_adv = autoattack_l2(model, x[idx], y[idx], e, attacks=tuple(aa_attacks), seed=seed)
                else:
                    x_adv = pgd_l2(
                        model, x[idx], y[idx], e, steps=pgd_steps, restarts=pgd_restarts, seed=seed
                    )
                with torch.no_grad():
                    broken[idx] = (model(x_adv).argmax(dim=1) != y[idx]).cpu()
                checker.check(idx, x_adv, f"{attack} at eps={format_eps(e)}")
            empirical[e] = 1.0 - float(broken.double().mean().item())
            bar.update()
        if certified.numel():
            r = (radii[certified] * shrink).clamp(max=cap).to(dtype=x.dtype)
            x_adv = pgd_l2(
                model, x[certified], y[certified], r, steps=2 * pgd_steps, restarts=pgd_restarts, seed=seed
            )
            checker.check(certified, x_adv, "PGD inside the certified radius")
            bar.update()
        for group in groups:
            idx = certified[group]
            radius = min(float(radii[idx].min()) * shrink, cap)
            x_adv = autoattack_l2(model, x[idx], y[idx], radius, attacks=tuple(aa_attacks), seed=seed)
            checker.check(idx, x_adv, f"AutoAttack inside the certified radius ({format_eps(radius)})")
            bar.update()
    empirical = {e: empirical[e] for e in eps_values}
    return empirical, int(certified.numel()), sorted(checker.violations.values(), key=lambda v: v.index)


def _layer_rows(
    analysis: GraphAnalysis, iterations: int, progress: bool, notes: list[str], model: nn.Module
) -> tuple[list[LayerReport], list[str]]:
    rows: list[LayerReport] = []
    modules = dict(model.named_modules())
    broken: list[str] = []
    for layer in tqdm(analysis.layers, desc="bound", disable=not progress, leave=False):
        lower: float | None = None
        note = ""
        if layer.fn is not None and layer.example is not None:
            try:
                lower = jacobian_norm_lower(layer.fn, layer.example, iterations=iterations)
            except RuntimeError as err:
                note = f"(no lower estimate: {' '.join(str(err).split())[:120]})"
        module = modules.get(layer.path)
        claimed = claimed_bound(module) if module is not None else None
        rows.append(
            LayerReport(
                layer.path,
                layer.kind,
                layer.bound,
                lower,
                layer.input_shape,
                layer.folded_into,
                note,
                claimed,
            )
        )
        if lower is not None and lower > layer.bound * (1 + BOUND_TOLERANCE):
            broken.append(
                f"layer '{layer.path}' ({layer.kind}): its Jacobian norm at a real input is at least "
                f"{lower:.6g}, above its bound {layer.bound:.6g}: the bound is wrong"
            )
    if any(row.lower is None for row in rows):
        notes.append(
            "layers without a lower estimate are functional operations or could not be differentiated"
        )
    return rows, broken


def audit(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    eps: Sequence[float | str] = DEFAULT_EPS,
    attack: str = "auto",
    n_attack: int = 100,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dir: str | Path | None = None,
    *,
    n: int | None = None,
    autoattack_attacks: Sequence[str] = ("apgd-ce", "apgd-t"),
    pgd_steps: int = 50,
    pgd_restarts: int = 2,
    power_iterations: int = 30,
    lower_steps: int = 25,
    shrink: float = 0.999,
    fold_batchnorm: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> AuditReport:
    """Audit ``model`` on the batches of ``loader`` (raw ``[0, 1]`` inputs and integer labels).

    Args:
        eps: L2 radii (numbers or strings such as ``"36/255"``).
        attack: ``"auto"`` (AutoAttack on CUDA, L2 PGD elsewhere: :func:`certify.attacks.resolve_attack`,
            whose reason is added to the report's notes), ``"autoattack"`` (``ImportError`` without
            ``pyautoattack``), ``"pgd"`` or ``"none"``.
        n_attack: how many of the first samples are attacked (empirical accuracy and cross-check).
        input_shape: per-sample shape; by default that of the data (checked against it when given).
        mean, std: the model's input normalisation, prepended as :class:`certify.rules.folding.Normalize`.
        out_dir: where to write ``audit.json``, ``audit.md`` and ``radii.png`` (atomically).
        n: audit at most this many samples of the loader.
        autoattack_attacks: the AutoAttack attacks to run (a subset of pyautoattack's).
        power_iterations, lower_steps: power iterations of the per-layer and network lower estimates,
            and gradient-ascent steps of the network's (:func:`empirical_lipschitz_lower`).

    Returns the :class:`~certify.report.AuditReport`; ``passed`` is False when a certificate was
    broken. Raises ``ValueError`` (bad data, shapes, arguments, a model whose outputs contain NaN or
    Inf on some of the inputs) or
    :class:`certify.bounds.UnboundableModuleError` (a model certify cannot bound) before anything
    is written; ``ImportError`` when ``attack="autoattack"`` and ``pyautoattack`` is missing.
    """
    if attack not in _ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose one of {', '.join(_ATTACKS)}")
    eps_values = sorted({parse_eps(e) for e in eps})
    if not eps_values:
        raise ValueError("give at least one epsilon")
    if n_attack < 0 or (n is not None and n < 1):
        raise ValueError("n_attack must be >= 0 and n >= 1")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the model's input normalisation), or neither")
    notes: list[str] = []
    normalization = None
    audited = model
    if mean is not None and std is not None:
        norm = Normalize(mean, std)
        normalization = {"mean": norm.mean.tolist(), "std": norm.std.tolist()}
        audited = nn.Sequential(OrderedDict(normalize=norm, model=model))
    device, dtype = _device_dtype(model)
    audited.to(device)
    effective = attack
    if attack != "none":
        choice = resolve_attack(attack, device)
        effective = choice.name
        if attack == "auto":
            notes.append(f"attack: {choice}")
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
    timings: dict[str, float] = {}
    with frozen(audited):
        batches = iter(loader)
        first = next(batches, None)
        if first is None:
            raise ValueError("the loader yielded no data")
        x0, _ = _check_batch(*first, shape)
        shape = tuple(x0.shape[1:])
        if normalization is not None and len(normalization["std"]) not in (1, shape[0]):
            raise ValueError(
                f"mean/std have {len(normalization['std'])} values but the inputs have {shape[0]} channels"
            )

        start = time.perf_counter()
        analysis = analyze(audited, shape, fold_batchnorm=fold_batchnorm, example=x0[:2].to(device, dtype))
        timings["bound"] = time.perf_counter() - start

        start = time.perf_counter()
        logits, labels, norms, kept_x, kept_y = [], [], [], [], []
        count = 0
        for x, y in tqdm(chain([first], batches), desc="certify", disable=not progress, leave=False):
            x, y = _check_batch(x, y, shape)
            if n is not None:
                x, y = x[: n - count], y[: n - count]
            x = x.to(device=device, dtype=dtype)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                try:
                    out = audited(x)
                except RuntimeError as err:
                    raise ValueError(
                        f"the model fails on inputs of shape {shape}: {' '.join(str(err).split())}"
                    ) from None
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the model must return (N, classes) logits, got {getattr(out, 'shape', type(out))}"
                )
            logits.append(out.detach().cpu())
            labels.append(y.cpu().long())
            norms.append(x.detach().flatten(1).double().norm(dim=1).cpu())  # the forward slack's scale
            if count < n_attack:
                kept_x.append(x[: n_attack - count])
                kept_y.append(y[: n_attack - count].to(device).long())
            count += x.shape[0]
            if n is not None and count >= n:
                break
        all_logits, all_labels = torch.cat(logits), torch.cat(labels)
        _check_outputs(all_logits)
        if analysis.head_weight is not None and analysis.body_bound is not None:
            rule = "last-layer"
            radii = certified_radius(
                all_logits,
                all_labels,
                analysis.body_bound,
                last_layer_weight=analysis.head_weight,
                input_norms=torch.cat(norms),
            )
        else:
            rule = "global"
            radii = certified_radius(all_logits, all_labels, analysis.bound, input_norms=torch.cat(norms))
        timings["certify"] = time.perf_counter() - start

        # The per-layer lower estimates (the slow part of the bound) come after the outputs are
        # known to be finite, so that a model with NaN outputs is refused at once.
        start = time.perf_counter()
        rows, broken = _layer_rows(analysis, power_iterations, progress, notes, audited)
        net_lower = empirical_lipschitz_lower(
            audited, x0[:2].to(device, dtype), iterations=power_iterations, steps=lower_steps
        )
        if net_lower > analysis.bound * (1 + BOUND_TOLERANCE):
            broken.append(
                f"the network's Jacobian norm at a real input is at least {net_lower:.6g}, above its bound "
                f"{analysis.bound:.6g}: the bound is wrong"
            )
        timings["bound"] += time.perf_counter() - start

        empirical: dict[float, float] = {}
        cross_checked, attacked_n = 0, 0
        violations: list[Violation] = []
        cert_attacked: dict[float, float] = {}
        if effective != "none" and kept_x:
            start = time.perf_counter()
            xa, ya = torch.cat(kept_x), torch.cat(kept_y)
            attacked_n = xa.shape[0]
            ra = radii[:attacked_n].to(device)
            cert_attacked = {e: certified_accuracy(ra, e) for e in eps_values}
            empirical, cross_checked, violations = _attack_phase(
                audited,
                xa,
                ya,
                ra,
                eps_values,
                effective,
                autoattack_attacks,
                pgd_steps,
                pgd_restarts,
                shrink,
                seed,
                progress,
            )
            timings["attacks"] = time.perf_counter() - start
        elif effective == "none":
            notes.append("no attack was run: certificates were not cross-checked")

    claimed = None
    own = getattr(model, "lipschitz_bound", None)
    if callable(own):
        with contextlib.suppress(Exception):  # a claim that cannot even be computed is not reported
            claimed = module_bound(model, shape)
        if claimed is not None and normalization is not None:
            claimed /= min(abs(s) for s in normalization["std"])
    preds = all_logits.argmax(dim=1)
    report = AuditReport(
        passed=not violations and not broken,
        model=type(model).__qualname__,
        input_shape=shape,
        n=int(all_labels.numel()),
        eps=eps_values,
        lipschitz=analysis.bound,
        rule=rule,
        body_bound=analysis.body_bound if rule == "last-layer" else None,
        head=analysis.head_path if rule == "last-layer" else None,
        layers=rows,
        clean_accuracy=float((preds == all_labels).double().mean().item()),
        certified_accuracy={e: certified_accuracy(radii, e) for e in eps_values},
        mean_radius=float(radii[torch.isfinite(radii)].mean().item())
        if torch.isfinite(radii).any()
        else math.inf,
        attack=effective,
        attack_subset=list(autoattack_attacks) if effective == "autoattack" else [],
        n_attack=attacked_n,
        empirical_accuracy=empirical,
        certified_accuracy_attacked=cert_attacked,
        cross_checked=cross_checked,
        network_lower=net_lower,
        violations=violations,
        bound_violations=broken,
        normalization=normalization,
        claimed_bound=claimed,
        notes=notes,
        timings=timings,
        radii=radii,
    )
    if out_dir is not None:
        write_report(report, out_dir)
    return report
