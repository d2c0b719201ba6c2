"""Bounds of small op patterns that are Lipschitz as a whole although some of their ops alone are not.

The per-op rules (:mod:`certify.graph.rules`) bound each node from its arguments' bounds; three
maps common in 1-Lipschitz networks cannot be bounded that way, because one of their nodes alone
is not Lipschitz (a comparison used as a condition, a square) or because the per-op bound of a
node ignores that two of its operands are complementary. Exported files (TorchScript, torch.export,
ONNX) carry them as such ops, so the analysis recognises them here, before the per-op rules
(:func:`pre_rule`; each returns None when its pattern does not match and the per-op rules apply):

1. **Sorted pairs by a swap**: ``where(cond, flip(p, [d]), p)`` (or with the branches exchanged)
   with ``p.shape[d] == 2`` and ``cond = cmp(p[.., 0, ..], p[.., 1, ..])`` (``cmp`` one of ``>``,
   ``>=``, ``<``, ``<=``, the selections taken along ``d``), unsqueezed at ``d``. On each side of
   the hyperplanes ``p_0 = p_1`` the map is a fixed permutation of the entries of ``p``, and where
   the condition changes ``flip(pair) = pair``, so it is continuous: a continuous piecewise
   isometry, hence ``||f(u) - f(v)|| <= ||u - v||`` (split the segment at its finitely many
   crossings). Bound: ``L(p)``. lipnet's GroupSort(2) (:func:`lipnet.activations.sort_pairs`).
2. **Complementary order statistics in one concatenation**: ``cat`` / ``stack`` whose parts include
   ``minimum(a, b)`` and ``maximum(a, b)`` of the same ``a``, ``b`` (shapes equal), or the ``min``
   and ``max`` values of the same ``p`` over one dimension of size 2 (also ``amin`` / ``amax``).
   Per entry, ``(min, max)`` is the sorted pair ``(a_i, b_i)``, and sorting a pair is 1-Lipschitz,
   so the concatenation moves at most as far as the one with ``a`` and ``b`` (or the two halves of
   ``p``) in their place. That one is bounded by the copies of its source when every part selects
   entries of one tensor (its matrix has one 1 per row: ``sqrt(max copies)``, counted by autograd as
   in :func:`certify.graph.rules._selection`), else by the root of the sum of the parts' squared
   bounds. deel-torchlip's GroupSort2 and orthogonium's MaxMin.
3. **Norms of windows**: a square ``x * x`` (``x ** 2``, ``square``) becomes a *square sum*: a
   value ``s = C (x∘x)`` with ``C >= 0`` entrywise, kept symbolically (the map ``C`` replayed on
   float64 probes) through sums, means, average pooling, copies and products by non-negative
   constants, and through ``abs`` / ``relu`` (the identity on ``s >= 0``) and ``sign(s) * s``
   (``= s``, the form of ``F.lp_pool2d``). Then ``sqrt(s)`` (or ``s ** 0.5``), also after
   ``max(s, c)`` or ``s + c`` with constants ``c >= 0``, is bounded: per output entry
   ``|sqrt(s_o(x)) - sqrt(s_o(y))| <= sqrt(sum_i C_oi (x_i - y_i)^2)`` (the triangle inequality of
   a weighted norm; a floor only moves both roots closer), so summing the squares over ``o``,
   ``||sqrt(s(x)) - sqrt(s(y))|| <= sqrt(max_i sum_o C_oi) ||x - y||``; for a sum of squares of
   several tensors ``sqrt(sum_t m_t L_t^2)``. L2-norm pooling (lipnet's, deel-torchlip's and
   ``nn.LPPool`` with ``p = 2``), global L2-norm pooling and orthogonium's L2NormResidual.

A square sum used by any other operation is refused (a square is not Lipschitz).

4. **Circular convolutions**: ``conv(pad(x, circular))`` (what ``nn.Conv2d(padding_mode="circular")``
   computes, two calls in an exported graph) is bounded as one circular convolution, exactly,
   instead of by the product of the padding's copies and the convolution's norm.
5. **Gradient steps**: ``x - P^T relu(Q x + b)`` (SLL and CPL residual blocks): ``max(1, a^2 - 1) +
   ||E|| ||Q||`` with ``a >= ||diag(s)^(1/2) Q||`` and ``E = P - diag(s) Q`` for the steps ``s >= 0``
   fitted to the weights, instead of the sum ``1 + ||P|| ||Q||`` of the per-op rules.

Proofs: ``docs/proofs/activations-pooling.md`` (``#lemma-piecewise-isometry``, ``#lemma-lp-pool``),
``docs/proofs/frequency-bounds.md#lemma-circular-padding``,
``docs/proofs/residual-blocks.md#lemma-gradient-step``.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.node import Argument, Node

from certify.contract import FLOAT64_SLACK, matrix_spectral_norm
from certify.graph.engine import SQUARE_REASON, Analysis, module_path, pre_rule
from certify.graph.ops import (
    COPY_ATEN,
    COPY_FUNCTIONS,
    COPY_METHODS,
    Unsupported,
    UnsupportedValue,
    arg,
    aten_name,
)
from certify.rules.conv import conv_operator_bound

__all__ = ["SquareSum"]

# -- reading calls -----------------------------------------------------------------------------


def _name(node: Node) -> str:
    """The operation ``node`` calls, as one name for functions, methods and aten operators."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    aten = aten_name(node.target)
    if aten is not None:
        return aten
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if target is builtins.getattr:
        return "getattr"
    return str(getattr(target, "__name__", ""))


def _is(node: Argument, *names: str) -> bool:
    return isinstance(node, Node) and node.op in ("call_function", "call_method") and _name(node) in names


def _dim(d: Any, ndim: int) -> int:
    return int(d) + ndim if int(d) < 0 else int(d)


# -- 1. sorted pairs by a swap ------------------------------------------------------------------

_COMPARISONS = ("gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__", "greater", "less")


def _selected_entry(an: Analysis, node: Argument, source: Node, dim: int) -> int | None:
    """``i`` when ``node`` is ``source`` selected at index ``i`` along ``dim`` (``select``), else None."""
    if not _is(node, "select") or not isinstance(node, Node):
        return None
    x = arg(node, 0, "input")
    if x is not source or an.is_dyn(node.args[1:]):
        return None
    ndim = an.values[source].ndim
    d = _dim(an.value(arg(node, 1, "dim")), ndim)
    index = int(an.value(arg(node, 2, "index")))
    size = an.values[source].shape[d]
    return index % size if d == dim else None


@pre_rule
def _swapped_pairs(an: Analysis, node: Node) -> float | None:
    if not _is(node, "where") or len(node.args) != 3 or node.kwargs:
        return None
    cond, first, second = node.args
    if node.op == "call_method":  # x.where(cond, y)
        first, cond, second = node.args
    if not an.is_dyn(cond):
        return None
    for flipped, plain in ((first, second), (second, first)):
        if not (_is(flipped, "flip") and isinstance(flipped, Node) and isinstance(plain, Node)):
            continue
        if arg(flipped, 0, "input") is not plain or not an.dynamic.get(plain, False):
            continue
        value = an.values[plain]
        dims = an.value(arg(flipped, 1, "dims"))
        dims = [dims] if isinstance(dims, int) else list(dims)
        if len(dims) != 1:
            continue
        d = _dim(dims[0], value.ndim)
        if value.shape[d] != 2 or tuple(an.values[node].shape) != tuple(value.shape):
            continue
        c = cond
        if _is(c, "unsqueeze") and isinstance(c, Node):
            if _dim(an.value(arg(c, 1, "dim")), value.ndim) != d:
                continue
            c = c.args[0]
        if not (_is(c, *_COMPARISONS) and isinstance(c, Node) and len(c.args) == 2):
            continue
        picked = {_selected_entry(an, a, plain, d) for a in c.args}
        if picked == {0, 1}:
            return an.L(plain)
    return None


# -- 2. complementary order statistics ---------------------------------------------------------


@dataclass(frozen=True)
class _Order:
    """A part that is the min or max of a pair: of ``(a, b)`` entrywise, or of ``p`` over ``dim`` (size 2)."""

    low: bool
    operands: tuple[Node, ...]
    dim: int | None = None
    keepdim: bool = False


def _order_statistic(an: Analysis, part: Argument) -> _Order | None:
    if not isinstance(part, Node):
        return None
    if _is(part, "minimum", "maximum", "min", "max", "fmin", "fmax") and len(part.args) == 2:
        a, b = part.args
        if isinstance(a, Node) and isinstance(b, Node) and isinstance(an.values.get(b), Tensor):
            if an.values[a].shape == an.values[b].shape == an.values[part].shape:
                return _Order(_name(part) in ("minimum", "min", "fmin"), (a, b))
        return None
    reduced: Argument = part
    if _is(part, "getitem") and part.args[1] == 0:
        reduced = part.args[0]
    elif _is(part, "getattr") and part.args[1] == "values":
        reduced = part.args[0]
    if not isinstance(reduced, Node):
        return None
    name = _name(reduced)
    is_reduction = name in ("min", "max") and reduced is not part and len(reduced.args) >= 2
    if not (is_reduction or (name in ("amin", "amax") and reduced is part)):
        return None
    p = reduced.args[0]
    if not isinstance(p, Node) or not isinstance(an.values.get(p), Tensor):
        return None
    dims = an.value(arg(reduced, 1, "dim"))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) != 1:
        return None
    d = _dim(dims[0], an.values[p].ndim)
    if an.values[p].shape[d] != 2:
        return None
    keepdim = bool(an.value(arg(reduced, 2, "keepdim", False)))
    return _Order(name in ("min", "amin"), (p,), d, keepdim)


def _halves(order: _Order, values: Sequence[Tensor]) -> Tensor:
    """The part a sorted pair's member is replaced by: ``a`` (min) or ``b`` (max), or the half of ``p``."""
    if order.dim is None:
        return values[0] if order.low else values[1]
    index = 0 if order.low else 1
    p = values[0]
    return p.narrow(order.dim, index, 1) if order.keepdim else p.select(order.dim, index)


@pre_rule
def _sorted_pairs_in_cat(an: Analysis, node: Node) -> float | None:
    if not _is(node, "cat", "concat", "concatenate", "stack"):
        return None
    parts = arg(node, 0, "tensors")
    if not isinstance(parts, (list, tuple)) or an.is_dyn(node.args[1:]):
        return None
    orders = [_order_statistic(an, p) for p in parts]
    matched: dict[int, int] = {}
    for i, o in enumerate(orders):
        if o is None or not o.low or i in matched:
            continue
        for j, q in enumerate(orders):
            if q is not None and not q.low and j not in matched and q.dim == o.dim and q.keepdim == o.keepdim:
                same = q.operands == o.operands or (o.dim is None and q.operands == o.operands[::-1])
                if same:
                    matched[i], matched[j] = j, i
                    break
    if not matched:
        return None

    # The parts with each matched min / max replaced by its operand (a and b, or the two halves of p):
    # per entry a permutation of the concatenation's output, which moves at least as far.
    def surrogate(i: int, part: Argument, values: Callable[[Node], Tensor]) -> Tensor:
        order = orders[i]
        if i not in matched or order is None:
            return values(part) if isinstance(part, Node) else torch.as_tensor(part)
        operands = order.operands
        partner = orders[matched[i]]
        if order.dim is None and partner is not None and not order.low:
            operands = partner.operands  # the min's (a, b) order: max(b, a) stands for b
        return _halves(order, [values(o) for o in operands])

    leaves: list[Argument] = []
    for i, p in enumerate(parts):
        order = orders[i]
        leaves.extend(order.operands if i in matched and order is not None else (p,))
    source = _common_source(an, [x for x in leaves if isinstance(x, Node) and an.dynamic.get(x, False)])
    if source is not None:

        def build(probe: Tensor) -> Tensor:
            cache: dict[Node, Tensor] = {}

            def value(n: Node) -> Tensor:
                return _replay(an, n, source, probe, cache)

            return _call_like(an, node, [surrogate(i, p, value) for i, p in enumerate(parts)])

        return _copies(an, source, build) * an.L(source)
    total = 0.0
    for i, p in enumerate(parts):
        order = orders[i]
        if i in matched and order is not None:
            if order.dim is None:
                total += an.L(order.operands[0 if order.low else 1]) ** 2
            elif order.low:  # the two halves of p together are p without repetition: counted once
                total += an.L(order.operands[0]) ** 2
        else:
            total += an.L(p) ** 2
    return math.sqrt(total)


def _call_like(an: Analysis, node: Node, pieces: list[Tensor]) -> Tensor:
    """Replay the concatenation ``node`` on other pieces (its dim argument kept)."""
    rest = [an.value(a) for a in node.args[1:]]
    kwargs = {k: an.value(v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        raise Unsupported("a concatenation called as a method")
    return node.target(pieces, *rest, **kwargs)  # type: ignore[operator]


# -- replaying chains of copies ------------------------------------------------------------------

#: Calls that copy entries of their first argument (each output entry one input entry, or a
#: constant): the reshapes of certify.graph.ops without its reductions, and its selections.
_REDUCTIONS = ("amax", "amin", "logsumexp")
_SELECTING = (
    {f.__name__ for f in COPY_FUNCTIONS if f.__name__ not in _REDUCTIONS}
    | {m for m in COPY_METHODS if m not in _REDUCTIONS}
    | {a for a in COPY_ATEN if a not in _REDUCTIONS}
    | {
        "flip", "roll", "narrow", "select", "slice", "index_select", "repeat", "expand", "expand_copy",
        "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
        "replication_pad2d", "pad", "_pad_circular", "tile", "broadcast_to", "slice_copy",
        "select_copy", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "getitem",
    }
)  # fmt: skip


def _selection_parent(an: Analysis, node: Node) -> Node | None:
    """The one input-dependent argument of a copying call ``node`` (its first), else None."""
    if node.op not in ("call_function", "call_method") or _name(node) not in _SELECTING or not node.args:
        return None
    x = node.args[0]
    if not isinstance(x, Node) or an.is_dyn((node.args[1:], node.kwargs)):
        return None
    if _name(node) == "getitem" and not isinstance(an.values.get(x), (Tensor, list, tuple)):
        return None
    if _name(node) == "pad":
        mode = an.value(arg(node, 2, "mode", "constant"))
        if mode not in ("constant", "reflect", "replicate", "circular"):
            return None
    return x


def _common_source(an: Analysis, nodes: list[Node]) -> Node | None:
    """The node every one of ``nodes`` is copied from through calls of :data:`_SELECTING`, else None."""
    roots = set()
    for n in nodes:
        while True:
            parent = _selection_parent(an, n)
            if parent is None:
                break
            n = parent
        roots.add(n)
    return roots.pop() if len(roots) == 1 else None


def _replay(an: Analysis, node: Node, source: Node, probe: Tensor, cache: dict[Node, Tensor]) -> Any:
    """``node``'s value with ``probe`` in place of ``source``'s (``node`` copies from it, see above)."""
    if node is source:
        return probe
    if node in cache:
        return cache[node]
    parent = _selection_parent(an, node)
    if parent is None:
        raise Unsupported("expected a copy of the pattern's source")
    x = _replay(an, parent, source, probe, cache)
    rest = [an.value(a) for a in node.args[1:]]
    kwargs = {k: an.value(v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        out = getattr(x, str(node.target))(*rest, **kwargs)
    else:
        out = node.target(x, *rest, **kwargs)  # type: ignore[operator]
    cache[node] = out
    return out


def _copies(an: Analysis, source: Node, build: Callable[[Tensor], Tensor]) -> float:
    """``sqrt(max column sum)`` of the copy map ``build`` from ``source`` (entries 0 or 1 per row)."""
    template = an.values[source]
    probe = torch.zeros(template.shape, dtype=torch.float64, device=template.device, requires_grad=True)
    with torch.enable_grad():
        out = build(probe)
        (counts,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    return 0.0 if counts is None else math.sqrt(float(counts.max().item()))


# -- 4. circular convolutions --------------------------------------------------------------------


@pre_rule
def _circular_convolution(an: Analysis, node: Node) -> float | None:
    """``conv(pad(x, circular))`` with zero padding of its own is one circular convolution of ``x``.

    ``nn.Conv2d(padding_mode="circular")`` computes exactly this, and exported graphs keep the two
    calls apart; bounding the pair as a whole gives the norm of the circular convolution
    (:func:`certify.rules.conv.conv_operator_bound` with circular padding, exact for the full
    circular padding of kernel size ``- 1``) instead of the product of the copy's and the
    convolution's norms. Symmetric padding only (the layout of ``nn.Conv2d``); others fall through
    to the per-op rules.
    """
    if not _is(node, "conv1d", "conv2d", "_convolution_mode", "convolution", "_convolution"):
        return None
    # conv(input, weight, bias, stride, padding, dilation, groups); convolution(input, weight, bias,
    # stride, padding, dilation, transposed, output_padding, groups, ...)
    general = _is(node, "convolution", "_convolution")
    if general and (len(node.args) < 9 or an.value(node.args[6])):
        return None
    padded = arg(node, 0, "input")
    if not (_is(padded, "pad", "_pad_circular") and isinstance(padded, Node)) or len(node.args) < 2:
        return None
    x = padded.args[0]
    if not isinstance(x, Node) or not an.dynamic.get(x, False) or an.is_dyn((padded.args[1:], node.args[1:])):
        return None
    if _name(padded) == "pad" and an.value(arg(padded, 2, "mode", "constant")) != "circular":
        return None
    w = an.value(node.args[1])
    if not isinstance(w, Tensor) or w.ndim not in (3, 4):
        return None
    nd = w.ndim - 2
    pads = [int(p) for p in an.value(arg(padded, 1, "pad"))]
    if len(pads) != 2 * nd:
        return None
    per_axis = [(pads[2 * (nd - 1 - i)], pads[2 * (nd - 1 - i) + 1]) for i in range(nd)]
    if any(left != right for left, right in per_axis):
        return None
    positions = {"stride": 3, "padding": 4, "dilation": 5, "groups": 8 if general else 6}
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    cfg = {n: an.value(arg(node, i, n, defaults[n])) for n, i in positions.items()}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if cfg["padding"] not in (0, "valid", (0,) * nd):
        return None
    bias = an.value(arg(node, 2, "bias", None))
    factor = conv_operator_bound(
        w.detach(),
        stride=cfg["stride"],
        padding=tuple(left for left, _ in per_axis),
        dilation=cfg["dilation"],
        groups=int(cfg["groups"]),
        padding_mode="circular",
        input_shape=tuple(an.values[x].shape[1:]),
    )
    conv = F.conv1d if nd == 1 else F.conv2d
    stride, dilation, groups = cfg["stride"], cfg["dilation"], int(cfg["groups"])

    def layer(t: Tensor) -> Tensor:
        return conv(F.pad(t, pads, mode="circular"), w, bias, stride, 0, dilation, groups)

    kind = f"{conv.__name__} (circular padding)"
    row = an.add_layer(padded, kind, factor, layer, path=module_path(node), name=node.name)
    return row * an.L(x)


# -- 5. gradient steps -------------------------------------------------------------------------

_UNIT_ROUNDOFF = 2.0**-53


def _affine(an: Analysis, node: Argument) -> tuple[str, Node, Tensor, dict[str, Any]] | None:
    """``(kind, input, weight, geometry)`` of a linear layer or convolution with constant weights."""
    if not isinstance(node, Node) or len(node.args) < 2 or an.is_dyn(node.args[1:]) or node.kwargs:
        return None
    x, w = node.args[0], an.value(node.args[1])
    if not isinstance(x, Node) or not isinstance(w, Tensor):
        return None
    if _is(node, "linear") and w.ndim == 2:
        return "linear", x, w, {}
    if not _is(node, "conv2d", "conv_transpose2d") or w.ndim != 4:
        return None
    names: tuple[str, ...] = ("stride", "padding", "dilation", "groups")
    if _is(node, "conv_transpose2d"):
        names = ("stride", "padding", "output_padding", "groups", "dilation")
    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
    geo: dict[str, Any] = {}
    for i, n in enumerate(names):
        v = an.value(arg(node, 3 + i, n, defaults[n]))
        geo[n] = int(v) if n == "groups" else (tuple(v) if isinstance(v, (list, tuple)) else (v, v))
    return _name(node), x, w, geo


@pre_rule
def _gradient_step(an: Analysis, node: Node) -> float | None:
    """``x - P^T relu(Q x + b)`` (+ a constant): the residual steps of SLL and CPL blocks.

    ``Q`` is a linear layer or a stride-1 zero-padded 'same' convolution, ``P^T`` the dense layer
    with the transposed weight, or the transposed convolution of the same geometry (the exact adjoint of
    the convolution with kernel ``P`` on inputs of this size). With ``s_i = max(0, <P_i, Q_i> /
    ||Q_i||^2)`` (per output unit or channel) and ``E = P - diag(s) Q``, the Jacobian is
    ``I - M^T S M - E^T S Q`` with ``M = diag(s)^(1/2) Q`` and ``S`` diagonal in ``[0, 1]`` (the
    slopes of relu): the first part has eigenvalues in ``[1 - a^2, 1]`` for ``a >= ||M||``, so the
    bound is ``max(1, a^2 - 1) + ||E|| ||Q||`` times ``L(x)`` (``docs/proofs/residual-blocks.md``,
    ``#lemma-gradient-step``; the frozen SLL and CPL steps of lipnet, and orthogonium's SLL blocks,
    have ``E`` at the rounding level). Each norm is computed in float64 with the rounding of ``diag(s)
    Q`` and ``E`` added (``2 u sqrt(taps)`` of their Frobenius norms, ``u = 2^-53``).
    """
    if not _is(node, "sub", "__sub__") or len(node.args) != 2:
        return None
    if an.value(node.kwargs.get("alpha", 1)) != 1:
        return None
    x, outer = node.args
    if not (isinstance(x, Node) and an.dynamic.get(x, False)):
        return None
    out_layer = _affine(an, outer)
    if out_layer is None or out_layer[0] not in ("linear", "conv_transpose2d"):
        return None
    relu = out_layer[1]
    if not _is(relu, "relu") or not isinstance(relu, Node) or len(relu.args) != 1:
        return None
    in_layer = _affine(an, relu.args[0])
    if in_layer is None or in_layer[1] is not x:
        return None
    kind, _, q_w, geo = in_layer
    p_w = out_layer[2]
    shape = tuple(an.values[x].shape[1:])
    if kind == "linear":
        if out_layer[0] != "linear" or p_w.shape != q_w.T.shape:
            return None
        p_w = p_w.T
        taps = 1

        def norm(weight: Tensor) -> float:
            return matrix_spectral_norm(weight)
    else:
        out_geo = out_layer[3]
        ks = q_w.shape[2:]
        same = tuple((k - 1) // 2 for k in ks)
        plain = geo["stride"] == (1, 1) and geo["dilation"] == (1, 1) and geo["groups"] == 1
        if not (kind == "conv2d" and plain and all(k % 2 for k in ks) and geo["padding"] == same):
            return None
        if out_geo != {"stride": (1, 1), "padding": same, "output_padding": (0, 0), "groups": 1,
                       "dilation": (1, 1)} or p_w.shape != q_w.shape:  # fmt: skip
            return None
        if tuple(an.values[node].shape) != tuple(an.values[x].shape):
            return None
        taps = math.prod(ks)

        def norm(weight: Tensor) -> float:
            return conv_operator_bound(weight, padding=same, input_shape=shape)

    q64 = q_w.detach().to(device="cpu", dtype=torch.float64)
    p64 = p_w.detach().to(device="cpu", dtype=torch.float64)
    if not (bool(torch.isfinite(q64).all()) and bool(torch.isfinite(p64).all())):
        return None
    flat_q, flat_p = q64.flatten(1), p64.flatten(1)
    squares = (flat_q * flat_q).sum(dim=1)
    fit = (flat_p * flat_q).sum(dim=1) / squares.clamp_min(1e-300)
    steps = torch.where(squares > 0, fit, 0.0).clamp_min(0.0)  # any s >= 0 makes the bound hold
    view = (-1, *(1,) * (q64.ndim - 1))
    scaled = steps.reshape(view) * q64
    m_w = steps.sqrt().reshape(view) * q64
    rounding = 2.0 * _UNIT_ROUNDOFF * math.sqrt(taps)
    a = norm(m_w) + rounding * float(m_w.norm())
    error = p64 - scaled
    e = norm(error) + rounding * float(scaled.norm() + error.norm())
    bound = (max(1.0, a * a - 1.0) + e * norm(q64)) * (1.0 + FLOAT64_SLACK)
    row = an.add_layer(node, "gradient step x - P^T relu(Q x + b)", bound, None)
    return row * an.L(x)


# -- 3. square sums and their roots --------------------------------------------------------------


@dataclass
class SquareSum:
    """``s = sum_t C_t (x_t ∘ x_t)`` with ``C_t >= 0`` entrywise, for input-dependent nodes ``x_t``.

    ``maps[x_t]`` applies ``C_t`` to a float64 tensor of ``x_t``'s recorded shape (a composition of
    the operations met since the square). ``floored`` is set once a non-negative constant was added
    to ``s`` or taken as its floor: then only a root (or another floor) may follow.
    """

    maps: dict[Node, Callable[[Tensor], Tensor]]
    floored: bool = False
    sign_of: SquareSum | None = field(default=None, repr=False)


def _scaled(an: Analysis, node: Argument) -> tuple[Argument, float]:
    """``(x, c)`` when ``node`` is ``c * x`` for a scalar constant ``c`` (products and quotients by
    constants, any number of them), else ``(node, 1.0)``."""
    factor = 1.0
    while isinstance(node, Node) and _name(node) in _PRODUCTS + _QUOTIENTS and len(node.args) == 2:
        a, b = node.args
        dyn, const = (a, b) if an.is_dyn(a) else (b, a)
        if an.is_dyn(const) or node.kwargs:
            break
        value = torch.as_tensor(an.value(const), dtype=torch.float64)
        if value.numel() != 1 or not bool(torch.isfinite(value).all()):
            break
        c = float(value.item())
        if _name(node) in _QUOTIENTS:
            if dyn is not a or c == 0.0:
                break
            c = 1.0 / c
        factor *= c
        node = dyn
    return node, factor


def _square_of(an: Analysis, node: Node) -> tuple[Node, float] | None:
    """``(x, c)`` when ``node`` computes ``c x * x`` (``c >= 0``; also ``(a x) * (b x)``), ``x ** 2`` or
    ``square(x)`` of an input-dependent ``x``."""
    name = _name(node)
    if name in _PRODUCTS and len(node.args) == 2 and not node.kwargs:
        (x, c1), (y, c2) = (_scaled(an, a) for a in node.args)
        if x is y and isinstance(x, Node) and an.dynamic.get(x, False) and c1 * c2 >= 0.0:
            return None if isinstance(an.lip.get(x), SquareSum) else (x, c1 * c2)
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, Node) or not an.dynamic.get(x, False) or isinstance(an.lip.get(x), SquareSum):
        return None
    if name in ("pow", "__pow__", "float_power") and len(node.args) == 2 and not an.is_dyn(node.args[1]):
        exponent = an.value(node.args[1])
        return (x, 1.0) if isinstance(exponent, (int, float)) and float(exponent) == 2.0 else None
    if name == "square" and len(node.args) == 1:
        return x, 1.0
    return None


def _nonnegative_constant(an: Analysis, value: Argument) -> Tensor | float | None:
    if an.is_dyn(value):
        return None
    v = an.value(value)
    if isinstance(v, bool) or not isinstance(v, (int, float, Tensor)):
        return None
    t = torch.as_tensor(v, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        return None
    return v.detach().to(torch.float64) if isinstance(v, Tensor) else float(v)


Linear = Callable[[Tensor], Tensor]


def _then(first: Linear, second: Linear) -> Linear:
    def composed(z: Tensor) -> Tensor:
        return second(first(z))

    return composed


def _scaled_by(c: Tensor | float) -> Linear:
    def scale(z: Tensor) -> Tensor:
        return z * c

    return scale


def _divided_by(c: Tensor | float) -> Linear:
    def divide(z: Tensor) -> Tensor:
        return z / c

    return divide


def _sum_of(a: Linear, b: Linear) -> Linear:
    def total(z: Tensor) -> Tensor:
        return a(z) + b(z)

    return total


def _extend(q: SquareSum, step: Linear) -> SquareSum:
    if q.floored:
        raise Unsupported("a floored sum of squares is used by another operation than its root")
    return SquareSum({x: _then(m, step) for x, m in q.maps.items()})


def _root_bound(an: Analysis, q: SquareSum) -> float:
    total = 0.0
    for x, m in q.maps.items():
        template = an.values[x]
        probe = torch.zeros(template.shape, dtype=torch.float64, device=template.device, requires_grad=True)
        with torch.enable_grad():
            (colsum,) = torch.autograd.grad(m(probe).sum(), probe, allow_unused=True)
        if colsum is None:
            continue
        total += float(colsum.max().clamp_min(0.0).item()) * an.L(x) ** 2
    return math.sqrt(total)


_PRODUCTS = ("mul", "__mul__", "__rmul__", "multiply")
_QUOTIENTS = ("div", "__truediv__", "true_divide", "divide")
_LINEAR = (
    "sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
)  # fmt: skip


@pre_rule
def _square_sums(an: Analysis, node: Node) -> SquareSum | float | None:
    if node.op not in ("call_function", "call_method"):
        return None
    square = _square_of(an, node)
    if square is not None:
        x, factor = square
        return SquareSum({x: _scaled_by(factor)})
    squares = [a for a in an.nodes_in((node.args, node.kwargs)) if isinstance(an.lip.get(a), SquareSum)]
    if not squares:
        return None
    name = _name(node)
    first = node.args[0] if node.args else None
    q = an.lip.get(first) if isinstance(first, Node) else None
    if len(squares) == 1 and isinstance(q, SquareSum) and isinstance(first, Node):
        rest = node.args[1:]
        kwargs = {k: an.value(v) for k, v in node.kwargs.items()}
        if name in ("sqrt",) or (
            name in ("pow", "__pow__") and not an.is_dyn(rest) and an.value(rest[0]) == 0.5
        ):
            return _root_bound(an, q)
        if name in ("abs", "relu"):  # the identity on non-negative values
            return q
        if name == "sign":
            return SquareSum({}, floored=True, sign_of=q)
        static = [an.value(a) for a in rest]
        if name in _LINEAR or name in _SELECTING:
            target = node.target

            def step(z: Tensor, target: Any = target, static: list[Any] = static) -> Tensor:
                if isinstance(target, str):
                    return getattr(z, target)(*static, **kwargs)
                return target(z, *static, **kwargs)

            if name == "pad" and an.value(arg(node, 3, "value", 0.0)) not in (0, 0.0, None):
                raise Unsupported("pads a sum of squares with a non-zero constant")
            return _extend(q, step)
        if name in ("clamp_min", "clamp", "maximum", "clip") and not kwargs.get("max"):
            floor = rest[0] if rest else node.kwargs.get("min")
            if len(rest) <= 1 and _nonnegative_constant(an, floor) is not None:
                if tuple(an.values[node].shape) == tuple(an.values[first].shape):
                    return SquareSum(q.maps, floored=True)
        const = _nonnegative_constant(an, rest[0]) if len(rest) == 1 and not node.kwargs else None
        if const is not None and name in _PRODUCTS:
            return _extend(q, _scaled_by(const))
        if const is not None and name in _QUOTIENTS and bool(torch.as_tensor(const).min() > 0):
            return _extend(q, _divided_by(const))
        if name in ("add", "__add__", "__radd__") and len(rest) == 1:
            c = _nonnegative_constant(an, rest[0])
            if c is not None and tuple(an.values[node].shape) == tuple(an.values[first].shape):
                return SquareSum(q.maps, floored=True)
    if name in _PRODUCTS and len(node.args) == 2:
        a, b = (an.lip.get(v) if isinstance(v, Node) else None for v in node.args)
        for sign, value in ((a, b), (b, a)):
            if isinstance(sign, SquareSum) and sign.sign_of is not None and sign.sign_of is value:
                return value  # sign(s) * s = s for s >= 0
    if name in ("add", "__add__", "__radd__") and len(node.args) == 2 and not node.kwargs:
        a, b = (an.lip.get(v) if isinstance(v, Node) else None for v in node.args)
        if isinstance(a, SquareSum) and isinstance(b, SquareSum) and not (a.floored or b.floored):
            shape = tuple(an.values[node].shape)
            if all(tuple(an.values[v].shape) == shape for v in node.args if isinstance(v, Node)):
                maps = dict(a.maps)
                for x, m in b.maps.items():
                    maps[x] = _sum_of(maps[x], m) if x in maps else m
                return SquareSum(maps)
    raise UnsupportedValue(squares[0], SQUARE_REASON)
