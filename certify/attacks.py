"""Empirical robustness: L2 attacks that give an upper bound on robust accuracy.

Certificates are lower bounds on robustness; attacks are upper bounds. Between the two lies what
nobody knows. The attacks here serve two purposes: reporting empirical robust accuracy next to
certified accuracy, and cross-checking certificates (an attack that flips a prediction inside a
certified radius proves that a bound is wrong).

* :func:`pgd_l2`: projected gradient ascent on the margin ``max_{j != y} f_j - f_y`` (Madry et al.,
  ICLR 2018, with the margin loss of Carlini & Wagner 2017), one radius per sample, random starts
  inside the ball, iterates kept in the [0, 1] pixel box. The projection onto the box never leaves
  the L2 ball, because the clean input lies in the box and projections onto convex sets are
  non-expansive.
* :func:`autoattack_l2`: AutoAttack (Croce & Hein, ICML 2020) through ``pyautoattack`` (the
  ``attack`` extra), for one radius shared by all samples.

Every attack runs under :func:`frozen`: eval mode and ``requires_grad`` off on every parameter, so
that a parametrized layer (``lipnet.layers.CachedParametrization``) computes its constrained weight
once and reuses it at every step instead of re-running its orthogonalisation per forward pass (an
attack needs gradients with respect to the input only).

:func:`resolve_attack` is the one rule for ``auto``: AutoAttack on CUDA, L2 PGD elsewhere. Cost on a
CPU, measured on ``fmnist_convnet_s`` (117k parameters, 2 cores): one forward and backward pass of
100 Fashion-MNIST images takes about 0.35 s; AutoAttack's APGD-CE (100 iterations) and APGD-T (100
iterations towards each of 9 target classes) spend up to 1,000 such passes on each sample that
withstands them, per radius, where PGD spends ``steps`` (50 by default) and drops a sample once it
flips. That is minutes per radius for 100 images on a CPU, seconds on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ATTACKS",
    "AttackChoice",
    "autoattack_available",
    "autoattack_l2",
    "empirical_robust_accuracy",
    "flips_within_radius",
    "frozen",
    "pgd_l2",
    "resolve_attack",
]

#: The attack names the commands accept; ``auto`` is resolved by :func:`resolve_attack`.
ATTACKS: tuple[str, ...] = ("auto", "autoattack", "pgd")


def autoattack_available() -> bool:
    """Whether ``pyautoattack`` (the ``attack`` extra) can be imported."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AttackChoice:
    """The attack a requested name stands for: ``name`` (``"autoattack"`` or ``"pgd"``) and ``reason``,
    why (``"asked for"``, or how ``auto`` decided); ``str()`` gives both for reports and the console:
    ``L2 PGD (--attack auto on cpu: ...)``."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{'AutoAttack' if self.name == 'autoattack' else 'L2 PGD'} ({self.reason})"


def resolve_attack(attack: str, device: torch.device | str) -> AttackChoice:
    """The one rule that turns ``auto`` / ``autoattack`` / ``pgd`` into the attack that runs on ``device``.

    * ``auto``: AutoAttack on a CUDA device when ``pyautoattack`` is installed; L2 PGD otherwise (on a
      CPU AutoAttack's up to 1,000 gradient passes per sample and radius take minutes per radius, see
      the module docstring; ``autoattack`` asks for it anyway);
    * ``autoattack``: AutoAttack; ``ImportError`` (naming the extra) when ``pyautoattack`` is missing;
    * ``pgd``: L2 PGD.

    Anything else is a ``ValueError``.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}: choose {', '.join(ATTACKS)}")
    kind = torch.device(device).type
    if attack == "pgd":
        return AttackChoice("pgd", "asked for")
    if attack == "autoattack":
        if not autoattack_available():
            raise ImportError(
                "AutoAttack needs the 'attack' extra: pip install 'lipnet[attack]' (or choose --attack pgd)"
            )
        return AttackChoice("autoattack", "asked for")
    if kind != "cuda":
        return AttackChoice(
            "pgd",
            f"--attack auto on {kind}: AutoAttack takes minutes per radius there; "
            "--attack autoattack runs it anyway",
        )
    if not autoattack_available():
        return AttackChoice(
            "pgd", "--attack auto on cuda, but pyautoattack (the 'attack' extra) is not installed"
        )
    return AttackChoice("autoattack", "--attack auto on cuda")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with ``requires_grad`` off on every parameter for the block; yields it.

    On exit, normal or by an exception, every submodule's training flag and every parameter's
    ``requires_grad`` are restored to what they were. With no parameter requiring a gradient, a
    cached parametrization (``lipnet.layers.CachedParametrization``, ``EvalTensorCache``) computes its
    constrained weight at most once for the whole block (and not at all when its cache is still
    valid), where a model with trainable parameters recomputes it at every forward pass under
    autograd. Nests: an inner block restores the outer block's state.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} f_j - f_y`` per sample: positive means misclassified."""
    fy = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    return others.amax(dim=1) - fy


def _objective(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The untargeted margin, or ``f_t - f_y`` towards a target class t."""
    if target is None:
        return _margin(logits, y)
    return (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).squeeze(1)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 50,
    restarts: int = 1,
    step_size: float = 0.25,
    box: tuple[float, float] | None = (0.0, 1.0),
    target: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """L2 PGD on the margin loss; returns the adversarial inputs (``||x_adv - x|| <= eps`` per sample).

    ``eps`` is a float or a tensor with one radius per sample; ``step_size`` is a fraction of eps.
    With ``target`` (one class per sample) the ascent is on ``f_t - f_y`` (a targeted attack, which
    finds the nearest boundary of a multi-class model where the untargeted margin may wander).
    Each sample keeps the point with the largest untargeted margin over all steps and restarts, and
    leaves the batch as soon as that margin is positive (its prediction flipped): the attack exists to
    find a flip, so later steps on such a sample would only cost time. Samples misclassified at ``x``
    are never attacked. On a model with little robustness most of the batch leaves after a few steps.
    The model runs under :func:`frozen` (eval mode, parameters frozen; both restored on return).
    """
    with frozen(model):
        return _pgd_l2(model, x, y, eps, steps, restarts, step_size, box, target, seed)


def _pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int,
    restarts: int,
    step_size: float,
    box: tuple[float, float] | None,
    target: torch.Tensor | None,
    seed: int,
) -> torch.Tensor:
    x = x.detach()
    y = y.to(x.device)
    radius = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()
    if (radius < 0).any() or not torch.isfinite(radius).all():
        raise ValueError("attack radii must be finite and >= 0")
    r_all = radius.view(-1, *([1] * (x.ndim - 1)))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    best = x.clone()
    with torch.no_grad():
        best_margin = _margin(model(x), y)

    def keep(idx: torch.Tensor, adv: torch.Tensor, m: torch.Tensor) -> None:
        improved = m > best_margin[idx]
        best[idx[improved]] = adv[improved]
        best_margin[idx[improved]] = m[improved]

    for restart in range(restarts):
        idx = torch.nonzero(best_margin <= 0).flatten()
        if idx.numel() == 0:
            break
        xs, ys, r = x[idx], y[idx], r_all[idx]
        ts = None if target is None else target.to(x.device)[idx]
        if restart == 0:
            delta = torch.zeros_like(xs)
        else:
            noise = torch.randn(xs.shape, generator=gen, device=x.device, dtype=x.dtype)
            u = torch.rand((xs.shape[0],), generator=gen, device=x.device, dtype=x.dtype)
            delta = noise / _flat_norm(noise).clamp_min(1e-12) * r * u.view(r.shape)
        for step in range(steps + 1):
            delta.requires_grad_(step < steps)
            adv = xs + delta
            with torch.set_grad_enabled(step < steps):
                logits = model(adv)
            m = _margin(logits, ys)
            keep(idx, adv.detach(), m.detach())
            if step == steps:
                break
            (grad,) = torch.autograd.grad(_objective(logits, ys, ts).sum(), delta)
            with torch.no_grad():
                delta = delta.detach() + step_size * r * grad / _flat_norm(grad).clamp_min(1e-12)
                delta = delta * (r / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
                if box is not None:
                    delta = (xs + delta).clamp(*box) - xs
                alive = best_margin[idx] <= 0
                if not alive.all():
                    if not alive.any():
                        break
                    idx, xs, ys, r, delta = idx[alive], xs[alive], ys[alive], r[alive], delta[alive]
                    ts = None if ts is None else ts[alive]
    # Rounding in the projection may overshoot by an ulp; pull such points back inside.
    with torch.no_grad():
        d = best - x
        best = x + d * (r_all / _flat_norm(d).clamp_min(1e-30)).clamp(max=1.0)
    return best.detach()


def autoattack_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-t"),
    seed: int = 0,
    batch_size: int = 250,
) -> torch.Tensor:
    """AutoAttack (L2, one radius for all samples) through ``pyautoattack``; returns x_adv.

    The attacks of ``attacks`` run with standard AutoAttack's settings: APGD-CE with 1 restart of 100
    iterations (pyautoattack's ``custom`` version would leave the constructor's 5 restarts, five times
    the work of the published evaluation), APGD-T with 100 iterations towards each of
    ``min(9, classes - 1)`` target classes. The model runs under :func:`frozen`.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise ImportError("AutoAttack needs the 'attack' extra: pip install 'lipnet[attack]'") from err
    with frozen(model):
        adversary = AutoAttack(
            model,
            norm="L2",
            eps=float(eps),
            version="custom",
            attacks=list(attacks),
            seed=seed,
            device=x.device,
        )
        adversary.verbose = False
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        # The standard version's restarts (AutoAttack._set_version("standard") for L2).
        adversary.apgd.n_restarts = 1
        adversary.apgd_targeted.n_restarts = 1
        adversary.fab.n_restarts = 1
        # AutoAttack's targeted attacks default to 9 target classes, which needs at least 10 classes.
        adversary.apgd_targeted.n_target_classes = min(9, n_classes - 1)
        adversary.fab.n_target_classes = min(9, n_classes - 1)
        # pyautoattack prints its progress and "zero gradient" notices unconditionally; the audit reports
        # its own summary, so both are dropped here.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()


def empirical_robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    attack: str = "auto",
    steps: int = 50,
    restarts: int = 1,
    seed: int = 0,
) -> float:
    """Fraction of samples still correctly classified after an L2 attack of radius ``eps``.

    ``attack``: ``"autoattack"``, ``"pgd"``, or ``"auto"`` (:func:`resolve_attack` on the device of
    ``x``: AutoAttack on CUDA, PGD elsewhere). An upper bound on the true robust accuracy, to be read
    beside the certified (lower) one.
    """
    choice = resolve_attack(attack, x.device)
    with frozen(model):
        if choice.name == "autoattack":
            x_adv = autoattack_l2(model, x, y, eps, seed=seed)
        else:
            x_adv = pgd_l2(model, x, y, eps, steps=steps, restarts=restarts, seed=seed)
        with torch.no_grad():
            correct = model(x_adv).argmax(dim=1) == y.to(x_adv.device)
    return float(correct.double().mean())


def flips_within_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: torch.Tensor,
    *,
    shrink: float = 0.999,
    steps: int = 100,
    restarts: int = 2,
    targets: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """Attack each certified sample inside ``shrink * radius``; True where the prediction flipped.

    Runs the untargeted attack and a targeted one towards each of the ``targets`` runner-up classes.
    Samples with radius 0 (not certified) are skipped and report False. Any True is a soundness bug:
    a certified prediction changed inside its certified radius.
    """
    certified = radii > 0
    flipped = torch.zeros_like(certified)
    if not certified.any():
        return flipped
    with frozen(model):
        xs, ys = x[certified], y[certified].to(x.device)
        r = (radii[certified] * shrink).to(device=x.device, dtype=x.dtype)
        r = torch.where(torch.isfinite(r), r, torch.full_like(r, 1e3))
        with torch.no_grad():
            ranked = model(xs).scatter(1, ys[:, None], -math.inf).argsort(dim=1, descending=True)
        goals: list[torch.Tensor | None] = [None, *ranked[:, : min(targets, ranked.shape[1] - 1)].T]
        hit = torch.zeros(len(ys), dtype=torch.bool, device=x.device)
        for goal in goals:
            x_adv = pgd_l2(model, xs, ys, r, steps=steps, restarts=restarts, target=goal, seed=seed)
            with torch.no_grad():
                hit |= model(x_adv).argmax(dim=1) != ys
        flipped[certified] = hit.to(flipped.device)
    return flipped
