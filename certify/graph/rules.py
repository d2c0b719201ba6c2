"""The per-operation rules of the graph analysis: how each call bounds its output.

(About 840 lines, over the project's 800: every per-op rule is kept in this one file, so that the
rule of an operation is found by searching one file for its name, as the tables of
:mod:`certify.graph.ops` are.)

Each rule (registered with :func:`certify.graph.engine.rule` for the functions, tensor methods and
aten operators it covers) returns the bound of a node's output with respect to the model input,
from the bounds of its arguments:

* sums and differences: the sum of the operands' bounds (``Lip(f + g) <= Lip(f) + Lip(g)``), with
  ``x - mean(x, dims, keepdim=True)`` recognised as an orthogonal projection (factor 1);
  concatenation and stacking: the root of the sum of squares (the parts land on disjoint
  coordinates); elementwise max/min and ``where`` with a constant condition: the same root;
* a product or quotient with a constant ``c``: ``max |c|`` (``1 / min |c|``); ``F.linear``,
  matmul, ``conv{1,2}d``, ``conv_transpose{1,2}d`` and ``batch_norm`` with constant weights: the
  norm of that linear map (float64 SVD, :func:`certify.rules.conv.conv_operator_bound` for the
  recorded input size), with an eval ``batch_norm`` folded into the convolution or linear map
  that only feeds it; pooling: the bound of the equivalent module;
* reshapes, permutations, slices and other pure copies: ``sqrt(max copies of one entry)``
  (computed as ``P^T 1`` by autograd), 1 without repetition; ``mean`` over ``n`` entries
  ``1 / sqrt(n)``, ``sum`` ``sqrt(n)``; activations: their largest slope, from the one table of
  :mod:`certify.rules.activations` (GELU ``1.1289``, SiLU ``1.0998``, softmax ``1/2``);
* broadcasting an operand to ``r`` times its size multiplies its bound by ``sqrt(r)``.

Every bound above is a whole-tensor bound of the batched map, so it is sound whatever the layout
of the tensors. Products or quotients of two input-dependent tensors (``x * x``, attention),
data-dependent indexing and normalisation by a statistic of the input raise :class:`Unsupported`.

Proofs: ``docs/proofs/composition.md#lemma-composition`` (and ``#lemma-batchnorm`` for folding).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Argument, Node

from certify.contract import matrix_spectral_norm
from certify.graph.engine import Analysis, rule
from certify.graph.ops import (
    COPY_ATEN,
    COPY_FUNCTIONS,
    COPY_METHODS,
    SELECTION_ATEN,
    SELECTION_FUNCTIONS,
    SELECTION_METHODS,
    Unsupported,
    arg,
    aten_name,
)
from certify.rules.activations import ACTIVATIONS, Activation
from certify.rules.conv import conv_operator_bound
from certify.rules.folding import affine_scale

__all__: list[str] = []


# -- unary rules ------------------------------------------------------------------------------


#: A rule whose node returns one tensor (a :data:`certify.graph.engine.Rule` with a float bound).
TensorRule = Callable[[Analysis, Node], float]


def _unary(factor: Callable[[Analysis, Node], float]) -> TensorRule:
    """Rule for ``op(x, constants...)`` with bound ``factor * L(x)``."""

    def bound(an: Analysis, node: Node) -> float:
        x = arg(node, 0, "input")
        an.static(node, 0)
        return factor(an, node) * an.L(x)

    return bound


def _const_factor(value: float) -> TensorRule:
    return _unary(lambda an, node: value)


def _cast_factor(an: Analysis, node: Node) -> float:
    out = an.values[node]
    if isinstance(out, Tensor) and not out.is_floating_point():
        raise Unsupported(f"converts to {out.dtype}, which rounds the input (not Lipschitz)")
    return 1.0


# Reshapes, permutations, copies and per-fibre 1-Lipschitz reductions (the table in certify.graph.ops).
rule(functions=COPY_FUNCTIONS, methods=COPY_METHODS, aten=COPY_ATEN)(_const_factor(1.0))

rule(
    functions=(),
    methods=("float", "double", "to", "type_as", "type"),
    aten=("_to_copy", "to"),
)(_unary(_cast_factor))


def _activation_rule(activation: Activation) -> TensorRule:
    """The rule of one entry of the activation table: its constant for the call's parameters."""

    def bound(an: Analysis, node: Node) -> float:
        values = {
            p.name: an.value(
                arg(node, p.index, p.name) if p.required else arg(node, p.index, p.name, p.default)
            )
            for p in activation.params
        }
        return _unary(lambda a, n: activation.lipschitz(**values))(an, node)

    return bound


# Elementwise activations and softmax: the one table of certify.rules.activations, which also
# registers the bounds of their module forms.
for _activation in ACTIVATIONS:
    if _activation.functions or _activation.methods or _activation.aten:
        rule(_activation.functions, _activation.methods, _activation.aten)(_activation_rule(_activation))


@rule(
    functions=(F.log_softmax, torch.log_softmax),
    methods=("log_softmax",),
    aten=("log_softmax", "_log_softmax"),
)
def _log_softmax_rule(an: Analysis, node: Node) -> float:
    # Jacobian I - 1 p^T per fibre of size n: ||I|| + ||1|| ||p|| <= 1 + sqrt(n).
    dim = int(an.value(arg(node, 1, "dim")))
    n = an.shape(arg(node, 0, "input"))[dim]
    return _const_factor(1.0 + math.sqrt(n))(an, node)


@rule(
    functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
    aten=("dropout", "feature_dropout", "alpha_dropout"),
)
def _dropout_rule(an: Analysis, node: Node) -> float:
    return _const_factor(1.0)(an, node)  # random (training) dropout was refused by _check_random


@rule(functions=(torch.mean,), methods=("mean",), aten=("mean",))
def _mean_rule(an: Analysis, node: Node) -> float:
    # Each output averages n entries of disjoint fibres: |mean(a) - mean(b)| <= ||a - b|| / sqrt(n).
    x = arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(1.0 / math.sqrt(n))(an, node)


@rule(functions=(torch.sum,), methods=("sum",), aten=("sum",))
def _sum_rule(an: Analysis, node: Node) -> float:
    x = arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(math.sqrt(n))(an, node)


@rule(
    functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",), aten=("linalg_vector_norm", "norm")
)
def _norm_rule(an: Analysis, node: Node) -> float:
    # A p-norm of each fibre of n entries: |‖a‖_p - ‖b‖_p| <= ‖a - b‖_p <= c ‖a - b‖_2 with c = 1
    # for p >= 2 and n^(1/p - 1/2) for 1 <= p < 2.
    p_value = an.value(
        node.kwargs.get("p", node.kwargs.get("ord", node.args[1] if len(node.args) > 1 else 2))
    )
    if p_value in (None, "fro"):
        p_value = 2.0
    if isinstance(p_value, str) or not float(p_value) >= 1.0:
        raise Unsupported(f"norm with p={p_value!r} is not supported")
    p = float(p_value)
    x = arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(1.0 if p >= 2.0 else n ** (1.0 / p - 0.5))(an, node)


@rule(functions=(torch.std,), methods=("std",), aten=("std",))
def _std_rule(an: Analysis, node: Node) -> float:
    # std = ||P a|| / sqrt(n - correction) with P the centring projection (norm 1).
    x = arg(node, 0, "input")
    correction = node.kwargs.get("correction", 1 if node.kwargs.get("unbiased", True) else 0)
    n = an.value(x).numel() / max(1, an.values[node].numel())
    denom = n - float(an.value(correction))
    if denom <= 0:
        raise Unsupported("std over too few entries")
    return _const_factor(1.0 / math.sqrt(denom))(an, node)


# -- pure copies (selections) ----------------------------------------------------------------


def _selection(an: Analysis, node: Node) -> float:
    """Bound of a map that copies entries of its one input (each output entry is one input entry).

    Its matrix ``P`` has at most one 1 per row, so ``||P||_2 = sqrt(max column sum)``, and the
    column sums are ``P^T 1``: the gradient of ``sum(P x)``, computed by replaying the operation
    on a float64 zero tensor of the recorded input shape.
    """
    x = arg(node, 0, "input")
    an.static(node, 0)
    template = an.value(x)
    probe = torch.zeros(template.shape, dtype=torch.float64, device=template.device, requires_grad=True)
    args = [probe] + [an.value(a) for a in node.args[1:]]
    kwargs = {k: an.value(v) for k, v in node.kwargs.items()}
    target = node.target
    with torch.enable_grad():
        # a method name for call_method nodes, the function itself for call_function nodes
        out = (
            getattr(probe, target)(*args[1:], **kwargs)
            if isinstance(target, str)
            else target(*args, **kwargs)
        )
        if isinstance(out, (tuple, list)):
            raise Unsupported("a copy operation that returns several tensors")
        (counts,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    if counts is None:
        return 0.0
    return math.sqrt(float(counts.max().item())) * an.L(x)


rule(functions=SELECTION_FUNCTIONS, methods=SELECTION_METHODS, aten=SELECTION_ATEN)(_selection)


def _interpolate_guard(an: Analysis, node: Node) -> float:
    mode = an.value(node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest"))
    if mode not in ("nearest", "nearest-exact"):
        raise Unsupported(f"interpolation mode {mode!r} is not bounded here (only nearest copies are)")
    return _selection(an, node)


rule(functions=(F.interpolate,))(_interpolate_guard)


@rule(functions=(operator.getitem,))
def _getitem_rule(an: Analysis, node: Node) -> float | list[float | None]:
    container, index = node.args
    if an.is_dyn(index):
        raise Unsupported("indexing with input-dependent indices (data-dependent selection) is not Lipschitz")
    if isinstance(an.value(container), Tensor):
        return _selection(an, node)
    bounds = an.lip.get(container) if isinstance(container, Node) else None
    if not isinstance(bounds, list) or not isinstance(index, (int, slice)):
        raise Unsupported("indexing into a non-tensor value that depends on the input")
    picked = bounds[index] if isinstance(index, slice) else [bounds[index]]
    if any(b is None for b in picked):
        raise Unsupported("uses integer indices computed from the input (argmax/argsort)")
    return list(picked) if isinstance(index, slice) else picked[0]


@rule(functions=(builtins.getattr,))
def _getattr_rule(an: Analysis, node: Node) -> float:
    # x.T / x.mT / x.H (transposes of a real tensor) and x.data (the same values) are copies;
    # x.max(dim).values is the first element of the (values, indices) pair.
    container, attr = node.args
    bounds = an.lip.get(container) if isinstance(container, Node) else None
    if isinstance(bounds, list) and attr in ("values", "indices"):
        if attr == "indices" or bounds[0] is None:
            raise Unsupported("uses integer indices computed from the input (argmax/argsort)")
        return bounds[0]
    if attr not in ("T", "mT", "H", "mH", "data"):
        raise Unsupported(f"attribute '{attr}' of an input-dependent tensor")
    value = an.values[node]
    if isinstance(value, Tensor) and value.is_complex():
        raise Unsupported("complex tensors are not supported")
    return an.L(container)


@rule(
    functions=(torch.split, torch.chunk, torch.unbind, torch.tensor_split),
    methods=("split", "chunk", "unbind", "tensor_split", "split_with_sizes"),
    aten=("split", "split_with_sizes", "chunk", "unbind", "tensor_split"),
)
def _split_rule(an: Analysis, node: Node) -> list[float | None]:
    x = arg(node, 0, "input")
    an.static(node, 0)
    return [an.L(x)] * len(an.values[node])


@rule(
    functions=(torch.sort, torch.topk, torch.max, torch.min, torch.median, torch.kthvalue),
    methods=("sort", "topk", "max", "min", "median", "kthvalue"),
    aten=("sort", "topk", "max", "min"),
)
def _values_indices_rule(an: Analysis, node: Node) -> float | list[float | None]:
    """Sorting and order statistics along fibres are 1-Lipschitz; their indices are not usable.

    ``torch.max(a, b)`` of two tensors is the elementwise maximum (see :func:`_maximum_rule`).
    """
    second = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if node.target in (torch.max, torch.min, "max", "min") and isinstance(an.value(second), Tensor):
        return _maximum_rule(an, node)
    if aten_name(node.target) in ("max", "min") and isinstance(an.value(second), Tensor):
        return _maximum_rule(an, node)
    x = arg(node, 0, "input")
    an.static(node, 0)
    out = an.values[node]
    if isinstance(out, Tensor):
        return an.L(x)
    return [an.L(x), None]


# -- arithmetic -------------------------------------------------------------------------------


def _is_mean_of(an: Analysis, m: Argument, a: Argument) -> bool:
    """Whether ``m`` is ``a.mean(dims, keepdim=True)``: then ``a - m`` is an orthogonal projection."""
    if not (isinstance(m, Node) and isinstance(a, Node)):
        return False
    is_mean = (m.op == "call_method" and m.target == "mean") or (
        m.op == "call_function" and (m.target is torch.mean or aten_name(m.target) == "mean")
    )
    if not is_mean or not m.args or m.args[0] is not a:
        return False
    keepdim = m.kwargs.get("keepdim", m.args[2] if len(m.args) > 2 else False)
    return bool(an.value(keepdim)) and an.values[m].ndim == an.values[a].ndim


@rule(
    functions=(
        operator.add,
        operator.sub,
        operator.iadd,
        operator.isub,
        torch.add,
        torch.sub,
        torch.subtract,
        torch.rsub,
    ),
    methods=(
        "add",
        "sub",
        "subtract",
        "add_",
        "sub_",
        "rsub",
        "__add__",
        "__radd__",
        "__sub__",
        "__rsub__",
        "__iadd__",
        "__isub__",
    ),
    aten=("add", "add_", "sub", "sub_", "rsub"),
)
def _add_rule(an: Analysis, node: Node) -> float:
    a = arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    alpha = abs(float(an.value(node.kwargs.get("alpha", 1))))
    out = an.values[node]
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    subtract = name in ("sub", "isub", "subtract", "sub_", "__sub__", "__isub__") or aten_name(
        node.target
    ) in ("sub", "sub_")
    if subtract and alpha == 1.0 and _is_mean_of(an, b, a):
        return an.L(a)
    reverse = name in ("rsub", "__rsub__") or aten_name(node.target) == "rsub"
    # rsub(input, other, alpha) = other - alpha * input; otherwise input +- alpha * other.
    coef_a, coef_b = (alpha, 1.0) if reverse else (1.0, alpha)
    if not isinstance(out, Tensor):
        raise Unsupported("arithmetic on input-dependent non-tensor values")
    return coef_a * an.replication(a, out) * an.L(a) + coef_b * an.replication(b, out) * an.L(b)


@rule(
    functions=(operator.neg, operator.pos, torch.neg, torch.negative),
    methods=("neg", "negative", "__neg__", "__pos__", "neg_"),
    aten=("neg",),
)
def _neg_rule(an: Analysis, node: Node) -> float:
    return _const_factor(1.0)(an, node)


def _abs_max(value: Any) -> float:
    t = torch.as_tensor(value).detach().to(torch.float64)
    if not torch.isfinite(t).all():
        raise Unsupported("multiplies by a constant that contains NaN or Inf")
    return float(t.abs().max().item()) if t.numel() else 0.0


@rule(
    functions=(operator.mul, operator.imul, torch.mul, torch.multiply),
    methods=("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"),
    aten=("mul", "mul_"),
)
def _mul_rule(an: Analysis, node: Node) -> float:
    a = arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if an.is_dyn(a) and an.is_dyn(b):
        raise Unsupported(
            "product of two input-dependent tensors (e.g. x * x, gating, attention) is not globally Lipschitz"
        )
    dyn, const = (a, b) if an.is_dyn(a) else (b, a)
    out = an.values[node]
    return _abs_max(an.value(const)) * an.replication(dyn, out) * an.L(dyn)


@rule(
    functions=(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide),
    methods=("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
    aten=("div", "div_"),
)
def _div_rule(an: Analysis, node: Node) -> float:
    a = arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if an.is_dyn(b):
        raise Unsupported("division by an input-dependent tensor is not globally Lipschitz")
    if node.kwargs.get("rounding_mode") is not None:
        raise Unsupported("rounding division is not continuous")
    c = torch.as_tensor(an.value(b)).detach().to(torch.float64)
    smallest = float(c.abs().min().item()) if c.numel() else math.inf
    if not smallest > 0 or not torch.isfinite(c).all():
        raise Unsupported("division by a constant that contains 0, NaN or Inf")
    return an.replication(a, an.values[node]) * an.L(a) / smallest


@rule(functions=(operator.pow, torch.pow), methods=("pow", "__pow__"), aten=("pow",))
def _pow_rule(an: Analysis, node: Node) -> float:
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if (
        an.is_dyn(exponent)
        or not isinstance(an.value(exponent), (int, float))
        or float(an.value(exponent)) != 1.0
    ):
        raise Unsupported("powers of an input-dependent tensor (x ** 2, ...) are not globally Lipschitz")
    return _const_factor(1.0)(an, node)


def _maximum_rule(an: Analysis, node: Node) -> float:
    # |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|) entrywise, so the squared output
    # difference is at most the sum of both squared input differences.
    a = arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    out = an.values[node]
    la = an.replication(a, out) * an.L(a)
    lb = an.replication(b, out) * an.L(b)
    return math.sqrt(la * la + lb * lb)


rule(
    functions=(torch.maximum, torch.minimum, torch.fmax, torch.fmin),
    methods=("maximum", "minimum", "fmax", "fmin"),
    aten=("maximum", "minimum", "fmax", "fmin"),
)(_maximum_rule)


@rule(functions=(torch.where,), methods=("where",), aten=("where",))
def _where_rule(an: Analysis, node: Node) -> float:
    if node.op == "call_method":  # x.where(cond, y)
        x, cond, y = (
            node.args[0],
            node.args[1],
            node.args[2] if len(node.args) > 2 else node.kwargs.get("other"),
        )
    else:
        cond, x, y = node.args[0], node.args[1], node.args[2]
    if an.is_dyn(cond):
        raise Unsupported("selection by an input-dependent condition is not continuous")
    out = an.values[node]
    lx = an.replication(x, out) * an.L(x)
    ly = an.replication(y, out) * an.L(y)
    return math.sqrt(lx * lx + ly * ly)


@rule(
    functions=(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack),
    aten=("cat", "concat", "stack"),
)
def _cat_rule(an: Analysis, node: Node) -> float:
    # The parts occupy disjoint output coordinates: ||out||^2 = sum ||part_i||^2.
    parts = cast("Sequence[Argument]", arg(node, 0, "tensors"))
    an.static(node, 0)
    return math.sqrt(sum(an.L(p) ** 2 for p in parts))


# -- weighted linear maps ---------------------------------------------------------------------


def _weight(an: Analysis, node: Node, index: int, name: str) -> Tensor:
    w = arg(node, index, name)
    if an.is_dyn(w):
        raise Unsupported("its weight depends on the input (a product of two input-dependent tensors)")
    value = an.value(w)
    if not isinstance(value, Tensor):
        raise Unsupported("expected a weight tensor")
    return value.detach()


def _weighted(
    an: Analysis, node: Node, kind: str, factor: float, fn: Callable[[Tensor], Tensor] | None
) -> float:
    x = arg(node, 0, "input")
    an.static(node, 0)
    return an.add_layer(node, kind, factor, fn) * an.L(x)


@rule(functions=(F.linear,), aten=("linear",))
def _linear_rule(an: Analysis, node: Node) -> float:
    w = _weight(an, node, 1, "weight")
    b = an.value(arg(node, 2, "bias", None))
    return _weighted(an, node, "linear", matrix_spectral_norm(w), lambda x: F.linear(x, w, b))


@rule(
    functions=(operator.matmul, torch.matmul, torch.mm, torch.bmm),
    methods=("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"),
    aten=("matmul", "mm", "bmm"),
)
def _matmul_rule(an: Analysis, node: Node) -> float:
    a, b = node.args[0], node.args[1]
    if node.target == "__rmatmul__":
        a, b = b, a
    if an.is_dyn(a) and an.is_dyn(b):
        raise Unsupported(
            "matrix product of two input-dependent tensors (attention) is not globally Lipschitz"
        )
    dyn, const = (a, b) if an.is_dyn(a) else (b, a)
    w = an.value(const).detach()
    x = an.value(dyn)
    if w.ndim > 2 and (x.ndim != w.ndim or tuple(x.shape[:-2]) != tuple(w.shape[:-2])):
        raise Unsupported("batched matmul with a broadcast constant is not supported")
    # Each row (x @ W) or column (W @ x) of the input is multiplied by W (or by its own slice of W).
    norm = (
        matrix_spectral_norm(w)
        if w.ndim <= 2
        else max(matrix_spectral_norm(m) for m in w.reshape(-1, *w.shape[-2:]))
    )
    return an.add_layer(node, "matmul", norm, None) * an.L(dyn)


@rule(aten=("addmm",))
def _addmm_rule(an: Analysis, node: Node) -> float:
    # addmm(bias, mat1, mat2, beta, alpha) = beta * bias + alpha * mat1 @ mat2.
    bias, mat1, mat2 = node.args[0], node.args[1], node.args[2]
    beta = abs(float(an.value(node.kwargs.get("beta", 1))))
    alpha = abs(float(an.value(node.kwargs.get("alpha", 1))))
    if an.is_dyn(mat2):
        raise Unsupported("matrix product with an input-dependent right factor")
    w = an.value(mat2).detach()
    norm = an.add_layer(node, "addmm", alpha * matrix_spectral_norm(w), None)
    return beta * an.L(bias) + norm * an.L(mat1)


def _conv_shape_args(an: Analysis, node: Node, first: int) -> dict[str, Any]:
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    return {
        n: _as_tuple(an.value(arg(node, first + i, n, d)))
        for i, (n, d) in enumerate(zip(names, defaults, strict=True))
    }


def _as_tuple(value: Any) -> Any:
    """aten passes sizes as lists; convolution bounds take ints, tuples or padding strings."""
    return tuple(value) if isinstance(value, list) else value


@rule(
    functions=(F.conv1d, F.conv2d, torch.conv1d, torch.conv2d),
    aten=("conv1d", "conv2d", "_convolution_mode"),  # the last: padding given as 'same' or 'valid'
)
def _conv_rule(an: Analysis, node: Node) -> float:
    w = _weight(an, node, 1, "weight")
    b = an.value(arg(node, 2, "bias", None))
    cfg = _conv_shape_args(an, node, 3)
    shape = an.shape(arg(node, 0, "input"))[1:]
    factor = conv_operator_bound(w, padding_mode="zeros", input_shape=shape, **cfg)
    conv = F.conv1d if w.ndim == 3 else F.conv2d
    return _weighted(an, node, conv.__name__, factor, lambda x: conv(x, w, b, **cfg))


def _transposed_factor(
    an: Analysis, node: Node, w: Tensor, stride: Any, padding: Any, dilation: Any, groups: int
) -> float:
    """A transposed convolution is the adjoint of the convolution from its output size (same norm)."""
    out_shape = tuple(an.values[node].shape[1:])
    return conv_operator_bound(
        w,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode="zeros",
        input_shape=out_shape,
    )


@rule(
    functions=(F.conv_transpose1d, F.conv_transpose2d, torch.conv_transpose1d, torch.conv_transpose2d),
    aten=("conv_transpose1d", "conv_transpose2d"),
)
def _conv_transpose_rule(an: Analysis, node: Node) -> float:
    # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
    w = _weight(an, node, 1, "weight")
    b = an.value(arg(node, 2, "bias", None))
    stride = _as_tuple(an.value(arg(node, 3, "stride", 1)))
    padding = _as_tuple(an.value(arg(node, 4, "padding", 0)))
    output_padding = _as_tuple(an.value(arg(node, 5, "output_padding", 0)))
    groups = int(an.value(arg(node, 6, "groups", 1)))
    dilation = _as_tuple(an.value(arg(node, 7, "dilation", 1)))
    factor = _transposed_factor(an, node, w, stride, padding, dilation, groups)
    conv_t = F.conv_transpose1d if w.ndim == 3 else F.conv_transpose2d
    return _weighted(
        an,
        node,
        conv_t.__name__,
        factor,
        lambda x: conv_t(x, w, b, stride, padding, output_padding, groups, dilation),
    )


@rule(aten=("convolution", "_convolution"))
def _convolution_rule(an: Analysis, node: Node) -> float:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    w = _weight(an, node, 1, "weight")
    stride, padding, dilation = (_as_tuple(an.value(node.args[i])) for i in (3, 4, 5))
    transposed, groups = bool(an.value(node.args[6])), int(an.value(node.args[8]))
    if transposed:
        factor = _transposed_factor(an, node, w, stride, padding, dilation, groups)
    else:
        shape = an.shape(node.args[0])[1:]
        factor = conv_operator_bound(
            w,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode="zeros",
            input_shape=shape,
        )
    return _weighted(an, node, "convolution", factor, None)


def _bn_scale(weight: Any, running_var: Any, eps: Any) -> Tensor:
    """Per-channel ``|gamma| / sqrt(running_var + eps)`` (float64) of an eval-mode batch_norm call.

    The absolute value: ``diag(sign s)`` is orthogonal, so it changes no norm (also when folded).
    """
    if running_var is None:
        raise Unsupported("batch_norm without running statistics uses batch statistics (couples samples)")
    return affine_scale(weight, running_var, float(eps)).abs()


_CONV_FUNCTIONS = {F.conv1d, F.conv2d, torch.conv1d, torch.conv2d}


def _fold_functional(an: Analysis, node: Node, scale: Tensor) -> float | None:
    """Fold an eval batch_norm into the functional convolution / linear map that only feeds it.

    ``batch_norm(conv(x, W))`` is the convolution with kernel ``W`` scaled per output channel by
    ``s`` (plus a constant), as for modules (:mod:`certify.rules.folding`); returns its bound times the
    bound of ``x``, or None when the pattern does not apply.
    """
    prev = node.args[0]
    if not an.fold_batchnorm or not (isinstance(prev, Node) and prev.op == "call_function"):
        return None
    if len(prev.users) != 1 or not prev.args or an.is_dyn(prev.args[1:]) or an.is_dyn(prev.kwargs):
        return None
    aten = aten_name(prev.target)
    x = prev.args[0]
    w = an.value(prev.args[1]) if len(prev.args) > 1 else an.value(prev.kwargs.get("weight"))
    if not isinstance(w, Tensor) or w.shape[0] != scale.numel():
        return None
    folded = w.detach().to(torch.float64) * scale.to(w.device).reshape(-1, *([1] * (w.ndim - 1)))
    if prev.target in _CONV_FUNCTIONS or aten in ("conv1d", "conv2d"):
        cfg = _conv_shape_args(an, prev, 3)
    elif aten in ("convolution", "_convolution") and not bool(an.value(prev.args[6])):
        cfg = {
            "stride": _as_tuple(an.value(prev.args[3])),
            "padding": _as_tuple(an.value(prev.args[4])),
            "dilation": _as_tuple(an.value(prev.args[5])),
            "groups": int(an.value(prev.args[8])),
        }
    elif (prev.target is F.linear or aten == "linear") and an.values[prev].ndim == 2:
        cfg = None
    else:
        return None
    # The folded map differs from batch_norm(conv(x)) by a constant: same Jacobian.
    linear = folded.to(dtype=w.dtype)
    if cfg is None:
        bound = matrix_spectral_norm(folded)

        def fn(z: Tensor) -> Tensor:
            return F.linear(z, linear)
    else:
        bound = conv_operator_bound(folded, padding_mode="zeros", input_shape=an.shape(x)[1:], **cfg)
        conv = F.conv1d if w.ndim == 3 else F.conv2d

        def fn(z: Tensor) -> Tensor:
            return conv(z, linear, None, **cfg)

    kind = "linear" if cfg is None else "conv"
    for row in an.layers:
        if row.node == prev.name:
            row.folded_into = node.name
            kind = row.kind
    return an.add_layer(prev, f"{kind}+batch_norm (folded)", bound, fn, name=node.name) * an.L(x)


def _bn_bound(an: Analysis, node: Node, scale: Tensor) -> float:
    an.static(node, 0)
    folded = _fold_functional(an, node, scale)
    if folded is not None:
        return folded
    return _weighted(an, node, "batch_norm", float(scale.max().item()) * (1.0 + 1e-12), None)


@rule(functions=(F.batch_norm,))
def _batch_norm_rule(an: Analysis, node: Node) -> float:
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if bool(an.value(arg(node, 5, "training", False))):
        raise Unsupported("batch_norm in training mode uses batch statistics (couples samples)")
    scale = _bn_scale(
        an.value(arg(node, 3, "weight", None)),
        an.value(arg(node, 2, "running_var")),
        an.value(arg(node, 7, "eps", 1e-5)),
    )
    return _bn_bound(an, node, scale)


@rule(
    aten=(
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "native_batch_norm",
        "_native_batch_norm_legit_functional",
        "cudnn_batch_norm",
    )
)
def _aten_batch_norm_rule(an: Analysis, node: Node) -> float | list[float | None]:
    # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...);
    # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps).
    name = aten_name(node.target)
    if name == "_native_batch_norm_legit_no_training":
        eps = an.value(node.args[6])
    else:
        if bool(an.value(node.args[5])):
            raise Unsupported("batch_norm in training mode uses batch statistics (couples samples)")
        eps = an.value(node.args[7])
    bound = _bn_bound(an, node, _bn_scale(an.value(node.args[1]), an.value(node.args[4]), eps))
    return bound if isinstance(an.values[node], Tensor) else [bound] + [None] * (len(an.values[node]) - 1)


@rule(
    functions=(F.instance_norm, F.layer_norm, F.group_norm, F.normalize, F.local_response_norm, F.rms_norm),
    aten=("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm"),
)
def _normalisation_rule(an: Analysis, node: Node) -> float:
    raise Unsupported(
        "divides by a statistic of the input (layer/group/instance norm): not globally Lipschitz"
    )


# -- pooling: the bound of the equivalent module ----------------------------------------------


def _pool_module(an: Analysis, node: Node) -> nn.Module:
    target = node.target
    name = aten_name(target) or str(getattr(target, "__name__", ""))
    v = an.value
    cls: type[nn.Module]
    kwargs: dict[str, Any]
    if target in (F.avg_pool1d, F.avg_pool2d) or name in ("avg_pool1d", "avg_pool2d"):
        cls = nn.AvgPool1d if name.endswith("1d") or target is F.avg_pool1d else nn.AvgPool2d
        kernel = v(arg(node, 1, "kernel_size"))
        stride = v(arg(node, 2, "stride", None)) or kernel
        kwargs = {
            "padding": v(arg(node, 3, "padding", 0)),
            "ceil_mode": v(arg(node, 4, "ceil_mode", False)),
            "count_include_pad": v(arg(node, 5, "count_include_pad", True)),
        }
        if cls is nn.AvgPool2d:
            kwargs["divisor_override"] = v(arg(node, 6, "divisor_override", None))
        return cls(kernel, stride, **kwargs)
    if target in (F.max_pool1d, F.max_pool2d) or name in (
        "max_pool1d",
        "max_pool2d",
        "max_pool2d_with_indices",
    ):
        cls = nn.MaxPool1d if name.endswith("1d") or target is F.max_pool1d else nn.MaxPool2d
        kernel = v(arg(node, 1, "kernel_size"))
        stride = v(arg(node, 2, "stride", None)) or kernel
        return cls(
            kernel,
            stride,
            v(arg(node, 3, "padding", 0)),
            v(arg(node, 4, "dilation", 1)),
            ceil_mode=v(arg(node, 5, "ceil_mode", False)),
        )
    if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d) or name in (
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
    ):
        cls = (
            nn.AdaptiveAvgPool1d
            if name.endswith("1d") or target is F.adaptive_avg_pool1d
            else nn.AdaptiveAvgPool2d
        )
        return cls(v(arg(node, 1, "output_size")))
    if target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d) or name in ("adaptive_max_pool2d",):
        cls = nn.AdaptiveMaxPool1d if target is F.adaptive_max_pool1d else nn.AdaptiveMaxPool2d
        return cls(v(arg(node, 1, "output_size")))
    if target in (F.lp_pool1d, F.lp_pool2d):
        cls = nn.LPPool1d if target is F.lp_pool1d else nn.LPPool2d
        return cls(
            v(arg(node, 1, "norm_type")),
            v(arg(node, 2, "kernel_size")),
            v(arg(node, 3, "stride", None)),
            v(arg(node, 4, "ceil_mode", False)),
        )
    raise Unsupported("unknown pooling operation")


@rule(
    functions=(
        F.avg_pool1d,
        F.avg_pool2d,
        F.max_pool1d,
        F.max_pool2d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.lp_pool1d,
        F.lp_pool2d,
    ),
    aten=(
        "avg_pool1d",
        "avg_pool2d",
        "max_pool1d",
        "max_pool2d",
        "max_pool2d_with_indices",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool2d",
    ),
)
def _pool_rule(an: Analysis, node: Node) -> float | list[float | None]:
    x = arg(node, 0, "input")
    an.static(node, 0)
    module = _pool_module(an, node)
    factor = an.leaf_bound(module, an.shape(x)[1:])
    factor = an.add_layer(node, type(module).__name__, factor, module)
    out = an.values[node]
    bound = factor * an.L(x)
    return bound if isinstance(out, Tensor) else [bound, None]
