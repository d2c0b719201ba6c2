"""Logit margins to certified L2 radii, and certified accuracy.

Formulas (all in float64):

* global rule (Tsuzuku, Sato & Sugiyama, NeurIPS 2018): with Lip(f) <= L,
  ``r(x) = (f_y(x) - max_{j != y} f_j(x)) / (sqrt(2) * L)``, since each margin
  ``(e_y - e_j)^T f`` is ``sqrt(2) L``-Lipschitz;
* last-layer rule: for ``f = W g(x) + b`` with Lip(g) <= L_g,
  ``r(x) = min_{j != y} (f_y - f_j) / (L_g * ||w_y - w_j||_2)``, never smaller than the global
  radius when ``L = L_g ||W||_2``: ``||w_y - w_j|| = ||W^T (e_y - e_j)|| <= sqrt(2) ||W||_2``, so
  every denominator is at most the global one (and often much smaller). The distances
  ``||w_y - w_j||`` are upper bounds computed from the explicit differences of the rows
  (:func:`row_distances`), never from ``||w_y||^2 + ||w_j||^2 - 2 w_y . w_j``.

* per-class (binary, multi-label, per-pixel) rule: a decision ``f_c(x) > theta_c`` with Lip(f_c) <= L_c
  is constant on the ball of radius ``|f_c(x) - theta_c| / L_c`` (:func:`binary_radius`; no
  sqrt(2): one output moves, not a difference of two).

A sample is certified at eps when it is correctly classified **and** ``r(x) > eps`` (strict).
The logits come from a float32 (or float64) forward pass; its rounding is covered by
subtracting ``2 * slack * (max_k |f_k(x)| + L_f ||x||_2)`` from every margin, with ``L_f`` the bound
of the whole map (``L`` for the global rule, ``L_g ||W||_2`` for the last-layer rule) and ``slack``
= 1e-5 for float32 logits (about 170 ulps of the computation's magnitude) and 1e-12 for float64.
The scale is that of the computation, not of its result: the rounding error of ``w . x + b`` is
relative to ``|w| |x|``, which a cancelling bias hides from the logits but not from ``L_f ||x||``.
Without the input norms that scale is unknown, and no sample is certified. The per-class rule has one
computed output against a constant, so it subtracts the allowance once:
``slack * (max(max_k |f_k(x)|, |theta_c|) + L_c ||x||_2)``.
Half-precision logits are refused: certify in float32 or float64.

Proofs: ``docs/proofs/certificates.md`` (``#lemma-global-rule``, ``#lemma-last-layer-rule``,
``#lemma-last-layer-dominates``, ``#lemma-sign-radius``); the forward slack is an assumption stated in
``docs/proofs/numerics.md#lemma-forward-slack``, the row distances ``#lemma-row-distances`` there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn
from tqdm.auto import tqdm

from certify.bounds import lipschitz_bound
from certify.contract import matrix_spectral_norm

__all__ = [
    "DEFAULT_EPS",
    "FORWARD_SLACK",
    "SMALL_EPS",
    "CertificationResult",
    "binary_radius",
    "certification_table",
    "certified_accuracy",
    "certified_radius",
    "certify",
    "format_eps",
    "parse_eps",
    "row_distances",
    "split_head",
]

DEFAULT_EPS: tuple[float, ...] = (36 / 255, 72 / 255, 108 / 255, 1.0)
#: The three radii of :data:`DEFAULT_EPS` below 1 (CIFAR-10's 36/255, 72/255, 108/255): the default of
#: the audit, of an export's certification check and of the catalogue, whose models certify nothing at 1.
SMALL_EPS: tuple[float, ...] = DEFAULT_EPS[:3]

#: Rounding allowance of a forward pass per logit dtype, relative to ``max_k |f_k(x)| + L_f ||x||_2``
#: (module doc; ``docs/proofs/numerics.md#lemma-forward-slack``).
FORWARD_SLACK: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float64: 1e-12}

#: Unit roundoff of float64.
_U64 = 2.0**-53
#: Entries of row differences :func:`row_distances` forms at once (16 MiB of float64 per buffer).
_CHUNK_ELEMENTS = 2**21


def parse_eps(value: float | int | str) -> float:
    """Parse an epsilon given as a number or a string such as ``"36/255"`` or ``"0.1"``."""
    if isinstance(value, str):
        try:
            eps = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError) as err:
            raise ValueError(
                f"cannot read epsilon {value!r}: use a number such as 0.14 or a fraction such as 36/255"
            ) from err
    else:
        eps = float(value)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon must be a finite number >= 0, got {value!r}")
    return eps


def format_eps(eps: float) -> str:
    """The one spelling of an epsilon in tables, file names and messages.

    ``36/255`` for a multiple of 1/255 strictly between 0 and 1 (within 1e-9 of it), else the number
    with up to six significant digits (``0``, ``0.1``, ``1``): the inverse of :func:`parse_eps` for
    every value it prints.
    """
    k = eps * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-9:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float) -> None:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2 classes, got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match the logits, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"labels out of range: found values in [{int(labels.min())}, {int(labels.max())}] "
            f"for {logits.shape[1]} classes"
        )
    if logits.dtype not in FORWARD_SLACK:
        raise ValueError(
            f"logits in {logits.dtype} are too imprecise to certify: "
            "run the forward pass in float32 or float64"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf: the model's output is not finite")
    if not (isinstance(lipschitz, (int, float)) and math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"the Lipschitz bound must be a finite number > 0, got {lipschitz!r}")


def row_distances(weight: torch.Tensor, *, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Upper bounds of the distances ``||w_i - w_j||_2`` between the rows of ``weight``: float64 (C, C).

    Every distance is computed from the explicit difference ``w_i - w_j`` in float64, never as
    ``sqrt(||w_i||^2 + ||w_j||^2 - 2 w_i . w_j)`` (what ``torch.cdist`` does above 25 rows): that
    form has an absolute error of about ``u ||w||^2`` in the square, which for two nearly equal rows
    is larger than the square itself, so the distance loses all its digits (down to exactly 0) and
    a certificate dividing by it overclaims. Equal rows get exactly 0.

    Rounding, for ``F`` features and ``u = 2^-53``: each difference is the rounded exact one
    (relative error <= u, none for float32 rows); it is scaled by a power of two (exact) so that its
    largest entry lies in ``[0.5, 1)``, so no square underflows or overflows; the root of the sum
    of squares then has relative error at most ``(F/2 + 2) u`` in any summation order (Higham,
    *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections 3.1 and 3.5). Each result
    is multiplied by ``1 + (F + 8) u`` and, when not 0, raised by one ulp (which covers the absolute
    rounding of a distance below the normal range). Differences are formed ``chunk_elements``
    entries at a time, so memory stays bounded whatever the size (one buffer of 16 MiB by default, for
    1000 classes x 2048 features as for 10 x 64).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix (classes, features), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    c, features = w.shape
    out = torch.zeros(c, c, dtype=torch.float64, device=w.device)
    if features == 0:
        return out
    inflate = 1.0 + (features + 8) * _U64
    start = 0
    while start < c:
        # rows [start, stop) against rows [start, c): the upper triangle; the lower one is its mirror
        stop = min(c, start + max(1, chunk_elements // max(1, (c - start) * features)))
        # |w_i - w_j| and its scaling in place: the norm needs no signs, and no second buffer halves the time
        diff = (w[start:stop, None, :] - w[None, start:, :]).abs_()
        _, exponent = torch.frexp(diff.amax(dim=-1, keepdim=True))
        # 2^-exponent is exact; the clamp keeps it finite (peaks below 2^-1000 still scale to >= 2^-74)
        scale = torch.pow(2.0, -exponent.clamp(-1000, 1000).to(torch.float64))
        dist = torch.linalg.vector_norm(diff.mul_(scale), dim=-1) / scale.squeeze(-1) * inflate
        dist = torch.where(dist > 0, torch.nextafter(dist, torch.full_like(dist, math.inf)), dist)
        out[start:stop, start:] = dist
        out[start:, start:stop] = dist.T
        start = stop
    return out


def _input_norms(input_norms: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """``input_norms`` checked and broadcast to a float64 tensor of shape ``(n,)``."""
    if isinstance(input_norms, torch.Tensor):
        norms = input_norms.detach().to(device=device, dtype=torch.float64)
        if norms.ndim == 0:
            norms = norms.expand(n)
        if norms.shape != (n,):
            raise ValueError(f"input_norms must have shape ({n},) (one per sample), got {tuple(norms.shape)}")
    elif isinstance(input_norms, (int, float)) and not isinstance(input_norms, bool):
        norms = torch.full((n,), float(input_norms), dtype=torch.float64, device=device)
    else:
        raise ValueError(f"input_norms must be a tensor or a number, got {type(input_norms).__name__}")
    if bool(torch.isnan(norms).any()) or bool((norms < 0).any()):
        raise ValueError("input_norms must be >= 0 (the L2 norms of the inputs)")
    return norms


def certified_radius(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lipschitz: float,
    *,
    last_layer_weight: torch.Tensor | None = None,
    input_norms: torch.Tensor | float,
) -> torch.Tensor:
    """Certified L2 radius of each sample, float64, 0 where the sample is misclassified.

    ``lipschitz`` is a sound bound of the whole map ``f`` (global rule) or, when
    ``last_layer_weight`` W is given, of the map ``g`` feeding the last linear layer
    ``f = W g + b`` (last-layer rule). Ties count as misclassified.

    ``input_norms`` are the L2 norms ``||x||_2`` of the inputs that produced the logits (shape
    ``(N,)``, e.g. ``x.flatten(1).norm(dim=1)``), or one number at least every one of them. Every
    margin is reduced by ``2 * FORWARD_SLACK[dtype] * (max_k |f_k(x)| + L_f ||x||_2)`` (``L_f`` =
    ``lipschitz``, or ``lipschitz * ||W||_2`` for the last-layer rule), the allowance for the
    rounding of the forward pass (``docs/proofs/numerics.md#lemma-forward-slack``). The norms are
    required: without them the rounding has no known bound (a bias that cancels ``w . x`` leaves
    small logits with the error of large products). An infinite norm certifies nothing for its
    sample; pass ``0.0`` only for logits that were not computed from an input.
    """
    _check_inputs(logits, labels, lipschitz)
    slack = FORWARD_SLACK[logits.dtype]
    f = logits.detach().to(torch.float64)
    y = labels.detach().to(device=f.device, dtype=torch.long)
    n, c = f.shape
    norms = _input_norms(input_norms, n, f.device)
    if last_layer_weight is None:
        map_bound = float(lipschitz)
        denom = torch.full_like(f, math.sqrt(2.0) * float(lipschitz))
    else:
        w = last_layer_weight.detach().to(device=f.device, dtype=torch.float64)
        if w.ndim != 2 or w.shape[0] != c:
            raise ValueError(f"last_layer_weight must have shape ({c}, features), got {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("last_layer_weight contains NaN or Inf")
        map_bound = float(lipschitz) * matrix_spectral_norm(w)
        # (1 + 1e-12) covers the rounding of the product and of the division below
        denom = float(lipschitz) * row_distances(w)[y] * (1.0 + 1e-12)
    fy = f.gather(1, y[:, None])
    margins = fy - f  # (N, C): f_y - f_j
    # the forward pass's rounding, relative to the magnitude of the computation (module doc)
    scale = f.abs().amax(dim=1, keepdim=True) + map_bound * norms[:, None]
    margins = margins - 2.0 * slack * scale
    others = torch.ones_like(f, dtype=torch.bool).scatter_(1, y[:, None], False)
    with torch.no_grad():
        ratio = torch.where(denom > 0, margins / denom, torch.where(margins > 0, math.inf, -math.inf))
        ratio = ratio.masked_fill(~others, math.inf)
        radius = ratio.amin(dim=1)
    correct = margins.masked_fill(~others, math.inf).amin(dim=1) > 0
    return torch.where(correct, radius.clamp_min(0.0), torch.zeros_like(radius))


def _per_class(
    name: str, value: float | Sequence[float] | torch.Tensor, shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """A number, or one value per class (dim 1 of ``shape``), as float64 broadcastable to ``shape``."""
    try:
        v = torch.as_tensor(value, dtype=torch.float64).detach().to(device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a number or one number per class, got {value!r}") from err
    if v.ndim == 1:
        if v.numel() != shape[1]:
            raise ValueError(f"{v.numel()} values of {name} for {shape[1]} classes (dim 1 of {tuple(shape)})")
        return v.view(1, -1, *([1] * (len(shape) - 2)))
    if v.ndim != 0:
        raise ValueError(f"{name} must be a number or one number per class, got shape {tuple(v.shape)}")
    return v


def binary_radius(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lipschitz: float | Sequence[float] | torch.Tensor,
    *,
    input_norms: torch.Tensor | float,
    threshold: float | Sequence[float] | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Certified L2 radius of each per-class decision ``f_c(x) > theta_c``: float64, shape of ``logits``.

    The one rule for multi-label, per-attribute, per-task binary and per-pixel decisions.
    ``logits (N, A, ...)``: ``N`` samples (the inputs), ``A`` classes along dim 1, any further
    dimensions (pixels) after it; ``targets``, of the same shape, 0/1 or bool: the right decision
    (1 for ``f_c > theta_c``). ``lipschitz``: a sound bound ``L_c`` of each output ``f_c`` w.r.t. the
    input (every position of class ``c`` shares it), a number or one per class; ``threshold``:
    ``theta_c``, a number or one per class. ``input_norms``: the L2 norms ``||x||_2`` of the inputs
    (shape ``(N,)``, e.g. ``x.flatten(1).norm(dim=1)``), or one number at least every one of them.

    Each radius is

        ``r_c(x) = (|f_c(x) - theta_c| - a_c(x)) / L_c``,
        ``a_c(x) = FORWARD_SLACK[dtype] * (max(max_k |f_k(x)|, |theta_c|) + L_c ||x||_2)``,

    with ``max_k`` over every output of the sample, where the decision is right, and 0 where it is
    wrong, where ``f_c(x) = theta_c`` exactly (no side is certain), or where ``|f_c - theta_c|`` is
    within the allowance. The decision is constant on the open ball of that radius
    (``docs/proofs/certificates.md#lemma-sign-radius``); ``a_c`` is the rounding allowance of the
    forward pass for one output (``docs/proofs/numerics.md#lemma-forward-slack``: one computed value
    against a constant, so once, where a margin of two logits loses it twice). A decision counts as
    certified at ``eps`` when its radius is ``> eps`` (:func:`certified_accuracy`). An infinite norm
    certifies nothing for its sample; pass ``0.0`` only for logits that were not computed from an input.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (N, A, ...) with A classes along dim 1, got {got}")
    if logits.dtype not in FORWARD_SLACK:
        raise ValueError(
            f"logits in {logits.dtype} are too imprecise to certify: "
            "run the forward pass in float32 or float64"
        )
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must have the logits' shape {tuple(logits.shape)}, got {got}")
    f = logits.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError("logits contain NaN or Inf: the model's output is not finite")
    t = targets.detach().to(f.device)
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("targets must hold 0/1 (or bool) values: the right decision of each output")
    lip = _per_class("lipschitz", lipschitz, f.shape, f.device)
    if not bool(torch.isfinite(lip).all()) or bool((lip <= 0).any()):
        raise ValueError(f"the Lipschitz bounds must be finite numbers > 0, got {lipschitz!r}")
    theta = _per_class("threshold", threshold, f.shape, f.device)
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"the thresholds must be finite, got {threshold!r}")
    n = f.shape[0]
    norms = _input_norms(input_norms, n, f.device).view(n, *([1] * (f.ndim - 1)))
    # the rounding of the forward pass, relative to the magnitude of the computation (module doc); |theta_c|
    # covers the float64 subtraction below
    largest = f.abs().flatten(1).amax(dim=1).view_as(norms) if f.numel() else torch.zeros_like(norms)
    allowance = FORWARD_SLACK[logits.dtype] * (torch.maximum(largest, theta.abs()) + lip * norms)
    d = f - theta
    margin = d.abs() - allowance
    correct = ((d > 0) == t.bool()) & (d != 0) & (margin > 0)
    return torch.where(correct, margin / lip, torch.zeros_like(f))


def certified_accuracy(radii: torch.Tensor, eps: float | str) -> float:
    """Fraction of samples with radius strictly greater than ``eps`` (misclassified have radius 0)."""
    if radii.numel() == 0:
        raise ValueError("no radii given")
    return float((radii > parse_eps(eps)).double().mean().item())


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """Return ``(body, head)`` when ``model = head(body(x))`` with a linear head, else None.

    Models may define ``split_head()`` themselves; an ``nn.Sequential`` whose last child is an
    ``nn.Linear`` is split automatically.
    """
    own = getattr(model, "split_head", None)
    if callable(own):
        return own()
    if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    return None


@dataclass
class CertificationResult:
    """What :func:`certify` measured. Accuracies are fractions in [0, 1].

    The per-sample tensors (radii, predictions, labels) are empty in a result rebuilt from a saved
    summary, which serves for tables only.
    """

    n: int
    clean_accuracy: float
    certified_accuracy: dict[float, float]
    mean_radius: float
    lipschitz: float
    rule: str
    radii: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64), repr=False)
    predictions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long), repr=False)
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long), repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": {f"{e:.6g}": a for e, a in self.certified_accuracy.items()},
            "mean_radius": self.mean_radius,
            "lipschitz": self.lipschitz,
            "rule": self.rule,
        }

    def to_markdown(self) -> str:
        """This result as a one-row Markdown table (:func:`certification_table`)."""
        return certification_table([self])


def certification_table(
    results: Sequence[CertificationResult],
    labels: Sequence[str] | None = None,
    *,
    label_header: str = "",
    n: bool = True,
    lipschitz: bool = False,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The one Markdown table of certification results: one row per result, numbers right-aligned.

    Columns: ``label_header`` with ``labels`` (one per result) when labels are given; ``n`` (unless
    ``n=False``); clean accuracy; certified accuracy at each epsilon of the first result (every
    result must have the same epsilons), as percentages with two decimals; the mean radius (four
    decimals); the sound Lipschitz bound (six decimals) when ``lipschitz``; then each column of
    ``extra`` (header -> one preformatted cell per result), for what a caller adds (empirical
    accuracy, training time).
    """
    if not results:
        raise ValueError("no certification results to tabulate")
    eps = list(results[0].certified_accuracy)
    for r in results:
        if list(r.certified_accuracy) != eps:
            raise ValueError(
                "every row of a certification table needs the same epsilons, got "
                f"{[format_eps(e) for e in eps]} and {[format_eps(e) for e in r.certified_accuracy]}"
            )
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    columns = dict(extra or {})
    for header, cells in columns.items():
        if len(cells) != len(results):
            raise ValueError(f"column {header!r} has {len(cells)} cells for {len(results)} results")
    head = [label_header] if labels is not None else []
    head += ["n"] if n else []
    head += ["clean", *(f"cert. ε={format_eps(e)}" for e in eps), "mean radius"]
    head += ["Lip. bound"] if lipschitz else []
    head += list(columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, r in enumerate(results):
        row = [labels[i]] if labels is not None else []
        row += [str(r.n)] if n else []
        row += [f"{100 * r.clean_accuracy:.2f}%", *(f"{100 * a:.2f}%" for a in r.certified_accuracy.values())]
        row.append(f"{r.mean_radius:.4f}")
        row += [f"{r.lipschitz:.6f}"] if lipschitz else []
        row += [cells[i] for cells in columns.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def certify(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: Sequence[float | str] = DEFAULT_EPS,
    *,
    lipschitz: float | None = None,
    last_layer: bool = True,
    progress: bool = True,
) -> CertificationResult:
    """Certify ``model`` on every batch of ``loader``.

    The bound is ``certify.bounds.lipschitz_bound`` of the model (or of its body, with the
    last-layer rule when the model has a linear head and ``last_layer`` is true) for the input
    shape of the first batch, unless ``lipschitz`` is given (then the global rule is used and the
    value is trusted as a bound of the whole model). The forward pass runs in float32 with autocast
    off, on the model's device; the norms of the inputs it saw set the scale of its rounding
    allowance (:func:`certified_radius`).
    """
    eps_values = [parse_eps(e) for e in eps]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
    was_training = model.training
    model.eval()
    split = split_head(model) if (last_layer and lipschitz is None) else None
    bound: float | None = lipschitz
    head_w: torch.Tensor | None = None
    all_logits, all_labels, all_norms = [], [], []
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for x, y in tqdm(loader, desc="certify", disable=not progress, leave=False):
                x = x.to(device=device, dtype=dtype)
                if not torch.isfinite(x).all():
                    raise ValueError("input batch contains NaN or Inf")
                if bound is None:
                    shape = tuple(x.shape[1:])
                    if split is not None:
                        bound = lipschitz_bound(split[0], shape)
                        head_w = split[1].weight
                    else:
                        bound = lipschitz_bound(model, shape)
                all_logits.append(model(x).to(dtype).cpu())
                all_labels.append(y.cpu())
                all_norms.append(x.flatten(1).to(torch.float64).norm(dim=1).cpu())
    finally:
        model.train(was_training)
    if not all_logits or bound is None:
        raise ValueError("the loader yielded no batches")
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    norms = torch.cat(all_norms)
    radii = certified_radius(logits, labels, bound, last_layer_weight=head_w, input_norms=norms)
    preds = logits.argmax(dim=1)
    return CertificationResult(
        n=len(labels),
        clean_accuracy=float((preds == labels).double().mean()),
        certified_accuracy={e: certified_accuracy(radii, e) for e in eps_values},
        mean_radius=float(radii.mean()),
        lipschitz=float(bound),
        rule="last-layer" if head_w is not None else "global",
        radii=radii,
        predictions=preds,
        labels=labels,
    )
