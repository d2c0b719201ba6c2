"""Sound Lipschitz bounds of arbitrary models, along their ``torch.fx`` graph.

:func:`analyze` traces a model with :class:`BoundTracer` (modules with a bound of their own or a
registered bound are leaves; every other module is traced into), runs the traced graph once on a
batch of the given input shape to record each node's value and shape, and then bounds, in
topological order, each node's output with respect to the model input:

* the input has bound 1; a node that does not depend on the input (weights, buffers, shapes,
  ``zeros_like``) is a constant, with bound 0;
* a leaf module call: (its bound for the recorded input shape) x (bound of its input). A
  BatchNorm whose input is a ``Conv1d``/``Conv2d``/``Linear`` output used by nothing else is
  folded into that layer (:mod:`certify.folding`), which is tighter than the product;
* sums and differences: the sum of the operands' bounds (``Lip(f + g) <= Lip(f) + Lip(g)``), with
  ``x - mean(x, dims, keepdim=True)`` recognised as an orthogonal projection (factor 1);
  concatenation and stacking: the root of the sum of squares (the parts land on disjoint
  coordinates); elementwise max/min and ``where`` with a constant condition: the same root;
* a product or quotient with a constant ``c``: ``max |c|`` (``1 / min |c|``); ``F.linear``,
  matmul, ``conv{1,2}d``, ``conv_transpose{1,2}d`` and ``batch_norm`` with constant weights: the
  norm of that linear map (float64 SVD, :func:`certify.conv_norm.conv_operator_bound` for the
  recorded input size); pooling: the bound of the equivalent module;
* reshapes, permutations, slices and other pure copies: ``sqrt(max copies of one entry)``
  (computed as ``P^T 1`` by autograd), 1 without repetition; ``mean`` over ``n`` entries
  ``1 / sqrt(n)``, ``sum`` ``sqrt(n)``; activations: their largest slope (GELU ``1.1289``, SiLU
  ``1.0998``, computed in :mod:`certify.bounds`); softmax ``1/2``;
* broadcasting an operand to ``r`` times its size multiplies its bound by ``sqrt(r)``.

Every bound above is a whole-tensor bound of the batched map, so it is sound whatever the layout
of the tensors. The traced graph is checked against the model (same output on the recorded batch)
and the model is checked not to mix samples of a batch. Products or quotients of two
input-dependent tensors (``x * x``, attention), data-dependent indexing, random operations, and
anything not listed raise **one** :class:`UnsupportedOperationsError` that lists every such node
(name, target, module path) and says how to register a bound. Nothing is guessed.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Argument, Node, map_aggregate

from certify.bounds import (
    UnboundableModuleError,
    gelu_lipschitz,
    has_bound,
    matrix_spectral_norm,
    mish_lipschitz,
    module_bound,
    silu_lipschitz,
)
from certify.folding import can_fold, folded_bound

__all__ = [
    "BoundTracer",
    "GraphAnalysis",
    "LayerBound",
    "Problem",
    "UnsupportedOperationsError",
    "analyze",
    "graph_bound",
    "trace",
]

Shape = tuple[int, ...]
#: Batch size of the recording pass: two samples, so that mixing samples can be detected.
_BATCH = 2
#: Dtypes whose rounding the certificate's float slack does not cover.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Problem:
    """One operation that certify cannot bound: fx node name, its target, module path and why."""

    node: str
    target: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = f" in module '{self.path}'" if self.path else " in the top-level forward"
        return f"node '{self.node}' ({self.target}){where}: {self.reason}"


class UnsupportedOperationsError(UnboundableModuleError):
    """A model's graph contains operations without a sound bound; ``problems`` lists all of them."""

    def __init__(self, model: nn.Module, problems: list[Problem], path: str = "") -> None:
        name = type(model).__qualname__
        where = f" at '{path}'" if path else ""
        lines = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        detail = (
            f"cannot bound the Lipschitz constant of {name}{where}: {len(problems)} unsupported "
            f"operation(s): {lines}. To certify such a model, put the unsupported part in a module and "
            "give it a sound bound: a method lipschitz_bound(self, input_shape=None) -> float, or "
            "certify.register_bound(YourModule, fn) with fn(module, input_shape) -> float. "
            "certify never guesses a bound."
        )
        super().__init__(model, path, detail=detail)
        self.problems = problems


@dataclass
class LayerBound:
    """One leaf of the graph (a module call or a weighted functional operation).

    ``bound`` is the sound bound of the layer alone for ``input_shape``; ``fn`` computes the layer
    from its input (for lower estimates at ``example``, the recorded input of the first sample).
    A layer whose output is folded into the next row (a Conv followed by BatchNorm) has
    ``folded_into`` set; the folded row carries the bound of the pair.
    """

    path: str
    node: str
    kind: str
    bound: float
    input_shape: Shape
    fn: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    example: Tensor | None = field(default=None, repr=False)
    folded_into: str | None = None


@dataclass
class GraphAnalysis:
    """Result of :func:`analyze`.

    ``bound`` bounds the whole model. When the model's output is a linear layer ``W g(x) + b``
    applied to the per-sample features ``g(x)``, ``head_weight`` is ``W`` (float64) and
    ``body_bound`` bounds ``g``: the last-layer certificate of :func:`certify.radius.certified_radius`.
    """

    bound: float
    input_shape: Shape
    layers: list[LayerBound]
    head_weight: Tensor | None = field(default=None, repr=False)
    body_bound: float | None = None
    head_path: str | None = None


# ---------------------------------------------------------------------------------------------
# Tracing


class _TraceFailure(Exception):
    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(f"{path}: {error}")
        self.path = path
        self.error = error


class BoundTracer(fx.Tracer):
    """``torch.fx`` tracer for bounding: bounded modules are leaves, everything else is traced into.

    Parameters and buffers are read as concrete tensors, so computations on weights alone (a
    parametrization, a fused kernel) run eagerly and enter the graph as constants: the bound is
    computed from the weights the model actually uses. ``forced_leaves`` (qualified names) are
    kept as leaves even without a bound (modules that cannot be traced; reported as problems).
    """

    def __init__(self, forced_leaves: set[str] | None = None) -> None:
        super().__init__()
        self.forced_leaves = set(forced_leaves or ())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.forced_leaves or has_bound(m)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _TraceFailure:
            raise
        except Exception as err:  # any failure inside an unbounded submodule: make it a leaf and retry
            raise _TraceFailure(qualname, err) from err


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise UnboundableModuleError(
            model, detail=f"{type(model).__qualname__}.forward takes no input tensor"
        )
    extra = {}
    for p in positional[1:]:
        if p.default is inspect.Parameter.empty:
            raise UnboundableModuleError(
                model,
                detail=(
                    f"{type(model).__qualname__}.forward takes several inputs "
                    f"({', '.join(q.name for q in positional)}): certify bounds maps of one input tensor; "
                    "wrap the model so that it takes one"
                ),
            )
        extra[p.name] = p.default
    return extra


def trace(model: nn.Module, example: Tensor | None = None) -> tuple[fx.GraphModule, list[Problem]]:
    """The graph of ``model`` and the submodules that could not be traced.

    * an ``fx.GraphModule`` is its own graph;
    * a TorchScript module is converted to an aten-level graph (``torch._export.converter``, which
      needs ``example``, a batch of inputs); the result is checked against the model by
      :func:`analyze` like any trace;
    * any other module is traced with :class:`BoundTracer`. A submodule that cannot be traced
      (data-dependent control flow, ``len`` of a tensor, ...) and has no bound becomes a leaf and
      is reported as a :class:`Problem`; tracing then continues so that every problem of the model
      is found at once. If the model's own ``forward`` cannot be traced, :class:`UnboundableModuleError`
      says so.
    """
    if isinstance(model, fx.GraphModule):
        return model, []
    if isinstance(model, torch.jit.ScriptModule):
        return _convert_torchscript(model, example), []
    # fx stores tensor constants as attributes of the traced root: trace a shallow copy so that the
    # user's model is left untouched (submodules and parameters are shared, not copied).
    root = copy.copy(model)
    concrete = _concrete_args(model)
    forced: dict[str, BaseException] = {}
    modules = dict(model.named_modules())
    for _ in range(len(modules) + 1):
        tracer = BoundTracer(set(forced))
        try:
            with torch.no_grad():
                graph = tracer.trace(root, concrete_args=concrete or None)
        except _TraceFailure as failure:
            if failure.path in forced or failure.path not in modules or failure.path == "":
                raise _untraceable(model, failure.path, failure.error) from None
            forced[failure.path] = failure.error
            continue
        except Exception as err:
            raise _untraceable(model, "", err) from None
        gm = fx.GraphModule(root, graph)
        problems = [
            Problem(
                node=_node_for(gm, path),
                target=type(modules[path]).__qualname__,
                path=path,
                reason=f"has no registered bound and cannot be traced ({_one_line(err)})",
            )
            for path, err in forced.items()
        ]
        return gm, problems
    raise _untraceable(model, "", RuntimeError("tracing did not converge"))


def _convert_torchscript(model: nn.Module, example: Tensor | None) -> fx.GraphModule:
    if example is None:
        raise ValueError("bounding a TorchScript model needs an example input batch")
    import warnings

    from torch._export.converter import TS2EPConverter

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return TS2EPConverter(model, (example,)).convert().module()
    except Exception as err:
        raise UnboundableModuleError(
            model,
            detail=(
                f"cannot convert the TorchScript model to a graph certify can analyse ({_one_line(err)}): "
                "save its state_dict (torch.save or safetensors) and audit it with its architecture (--arch)"
            ),
        ) from None


def _node_for(gm: fx.GraphModule, path: str) -> str:
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path:
            return node.name
    return path.replace(".", "_")


def _untraceable(model: nn.Module, path: str, err: BaseException) -> UnboundableModuleError:
    where = f"module '{path}' of " if path else ""
    return UnboundableModuleError(
        model,
        path,
        detail=(
            f"cannot trace {where}{type(model).__qualname__} with torch.fx ({_one_line(err)}). This usually "
            "means data-dependent control flow (an `if` or loop on tensor values or shapes). Give the "
            "module a bound of its own (lipschitz_bound(input_shape=None) or certify.register_bound) so "
            "that it is not traced into; certify does not fall back to anything it cannot prove."
        ),
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------
# Recording


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


def _model_ref(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _record_input(model: nn.Module, input_shape: Shape, example: Tensor | None) -> Tensor:
    device, dtype = _model_ref(model)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand((_BATCH, *input_shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if example is not None:
        if tuple(example.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"example inputs have shape {tuple(example.shape[1:])}, expected {tuple(input_shape)}"
            )
        k = min(_BATCH, example.shape[0])
        x[:k] = example[:k].to(device=device, dtype=dtype)
    return x


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            return False
        a, b = a.detach(), b.detach()
        # The scale comes from the finite entries (a NaN or an infinity says nothing of it, and made the
        # tolerance NaN); NaN matches NaN, so that a model whose output is NaN on some inputs is still
        # compared with its trace, and its NaN is reported as such by the caller.
        finite = torch.isfinite(b)
        scale = float(b[finite].abs().max().item()) if bool(finite.any()) else 0.0
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-12), equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b)


# ---------------------------------------------------------------------------------------------
# Rules


class _Unsupported(Exception):
    """Raised by a rule: the node cannot be bounded (the message says why)."""


Rule = Callable[["_Analysis", Node], "float | list[float | None]"]
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
_ATEN_RULES: dict[str, Rule] = {}
_MISSING = object()


def _rule(
    functions: tuple[Any, ...] = (), methods: tuple[str, ...] = (), aten: tuple[str, ...] = ()
) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for f in functions:
            _FUNCTION_RULES[f] = fn
        for m in methods:
            _METHOD_RULES[m] = fn
        for a in aten:
            _ATEN_RULES[a] = fn
        return fn

    return deco


def _arg(node: Node, index: int, name: str, default: Any = _MISSING) -> Argument:
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is _MISSING:
        raise _Unsupported(f"argument '{name}' is missing")
    return default


def _aten_name(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket) and getattr(
        target, "_qualified_op_name", ""
    ).startswith("aten::"):
        return target.__name__
    return None


def _target_name(node: Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return str(t)
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    module = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    if module in ("_operator", "operator"):
        module = "operator"
    if module.startswith("torch._C") or module == "torch._VariableFunctionsClass":
        module = "torch"
    return f"{module}.{name}" if module else name


_RANDOM_FUNCTIONS = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.poisson,
    torch.multinomial,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
}
_RANDOM_METHODS = {
    "bernoulli",
    "bernoulli_",
    "normal_",
    "uniform_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "multinomial",
}
_RANDOM_ATEN = {
    "rand",
    "randn",
    "randint",
    "randperm",
    "bernoulli",
    "normal",
    "poisson",
    "multinomial",
    "rand_like",
    "randn_like",
    "randint_like",
    "uniform",
    "exponential",
    "native_dropout",
}
#: Dropout functions and the default of their ``training`` argument (position 2).
_DROPOUT_FUNCTIONS = {
    F.dropout: True,
    F.dropout1d: True,
    F.dropout2d: True,
    F.dropout3d: True,
    F.alpha_dropout: False,
    F.feature_alpha_dropout: False,
}
#: Methods whose second argument only lends its shape or dtype (``x.view_as(y)``): its values do not flow.
_SHAPE_ONLY_SECOND = {"expand_as", "view_as", "reshape_as", "type_as"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}

#: Calls whose result depends on the input's shape, dtype or device only (constants per input shape).
_METADATA_METHODS = {
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "get_device",
    "is_contiguous",
    "is_floating_point",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "new_tensor",
}
_METADATA_FUNCTIONS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.numel,
    torch.is_floating_point,
    torch.is_tensor,
}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_METADATA_ATEN = {
    "sym_size",
    "sym_numel",
    "sym_stride",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
}


class _Analysis:
    def __init__(
        self,
        model: nn.Module,
        gm: fx.GraphModule,
        values: dict[Node, Any],
        fold_batchnorm: bool,
        problems: list[Problem],
        layer_value: Callable[[LayerBound], float] | None = None,
    ) -> None:
        self.model = model
        self.layer_value = layer_value
        self.gm = gm
        self.values = values
        self.fold_batchnorm = fold_batchnorm
        self.problems = problems
        self.modules = dict(gm.named_modules())
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.dynamic: dict[Node, bool] = {}
        self.lip: dict[Node, Any] = {}
        self.layers: list[LayerBound] = []
        self._leaf_cache: dict[tuple[int, Shape], float] = {}
        # Untraceable submodules were reported by trace(); their calls are not reported twice.
        self._reported = {p.path for p in problems}

    # -- helpers used by the rules ----------------------------------------------------------

    def value(self, a: Argument) -> Any:
        return map_aggregate(a, lambda v: self.values[v] if isinstance(v, Node) else v)

    def nodes_in(self, a: Argument) -> list[Node]:
        found: list[Node] = []
        map_aggregate(a, lambda v: found.append(v) if isinstance(v, Node) else None)
        return found

    def is_dyn(self, a: Argument) -> bool:
        return any(self.dynamic.get(n, False) for n in self.nodes_in(a))

    def L(self, a: Argument) -> float:
        """Bound of a tensor argument w.r.t. the model input (0 for a constant)."""
        if not isinstance(a, Node) or not self.dynamic.get(a, False):
            if self.is_dyn(a):
                raise _Unsupported("an input-dependent value is nested in a container argument")
            return 0.0
        bound = self.lip[a]
        if isinstance(bound, list):
            raise _Unsupported(f"'{a.name}' is a tuple of tensors, used here as one tensor")
        return float(bound)

    def static(self, node: Node, *exclude: int) -> None:
        """Require every argument except positions ``exclude`` (and the kwargs named alike) to be constant."""
        if node.op == "call_method" and node.target in _SHAPE_ONLY_SECOND:
            exclude = (*exclude, 1)
        for i, a in enumerate(node.args):
            if i not in exclude and self.is_dyn(a):
                raise _Unsupported(f"argument {i} depends on the input, which this bound does not allow")
        for key, a in node.kwargs.items():
            if key not in ("input", "self") and self.is_dyn(a):
                raise _Unsupported(f"argument '{key}' depends on the input, which this bound does not allow")

    def shape(self, a: Argument) -> Shape:
        v = self.value(a)
        if not isinstance(v, Tensor):
            raise _Unsupported("expected a tensor argument")
        return tuple(v.shape)

    def replication(self, a: Argument, out: Tensor) -> float:
        """``sqrt(numel(out) / numel(a))``: broadcasting copies each entry of ``a`` that many times."""
        v = self.value(a)
        n_in = v.numel() if isinstance(v, Tensor) else 1
        if n_in == 0:
            return 1.0
        return math.sqrt(max(1.0, out.numel() / n_in))

    def leaf_bound(self, module: nn.Module, shape: Shape, path: str) -> float:
        key = (id(module), shape)
        if key not in self._leaf_cache:
            self._leaf_cache[key] = float(module_bound(module, shape, path=path))
        return self._leaf_cache[key]

    def add_layer(
        self,
        node: Node,
        kind: str,
        bound: float,
        fn: Callable[[Tensor], Tensor] | None,
        path: str | None = None,
        name: str | None = None,
    ) -> float:
        """Record a row for the leaf computed by ``node`` (its input: ``node.args[0]``); returns its factor.

        The factor is ``bound``, or ``layer_value(row)`` when :func:`analyze` was given one.
        """
        x = self.values[node.args[0]] if node.args and isinstance(node.args[0], Node) else None
        example = x[:1].detach() if isinstance(x, Tensor) else None
        row = LayerBound(
            path=path if path is not None else _module_path(node),
            node=name or node.name,
            kind=kind,
            bound=bound,
            input_shape=tuple(x.shape[1:]) if isinstance(x, Tensor) else (),
            fn=fn,
            example=example,
        )
        self.layers.append(row)
        return bound if self.layer_value is None else float(self.layer_value(row))

    # -- the pass ---------------------------------------------------------------------------

    def run(self) -> float:
        output: Node | None = None
        for node in self.gm.graph.nodes:
            if node.op == "output":
                output = node
                continue
            try:
                self._visit(node)
            except _Unsupported as why:
                self._problem(node, str(why))
            except (UnboundableModuleError, ValueError) as err:
                self._problem(node, _one_line(err))
        if output is None:
            raise UnboundableModuleError(self.model, detail="the traced graph has no output")
        result = output.args[0]
        if isinstance(result, (tuple, list)) and len(result) == 1:
            result = result[0]
        if not isinstance(result, Node) or not isinstance(self.values.get(result), Tensor):
            self._problem(output, "the model must return one tensor of logits (it returns several outputs)")
        elif not self.dynamic.get(result, False):
            self._problem(output, "the model's output does not depend on its input")
        if self.problems:
            raise UnsupportedOperationsError(self.model, self.problems)
        self.output_node = result
        return float(self.lip[result])

    def _problem(self, node: Node, reason: str) -> None:
        self.dynamic[node] = True
        self.lip[node] = math.inf
        self.problems.append(Problem(node.name, _target_name(node), _module_path(node), reason))

    def _visit(self, node: Node) -> None:
        if node.op == "placeholder":
            # The first placeholder is the model input; later ones are arguments fixed to their
            # defaults when tracing (checked by the graph's own guards).
            first = not any(n.op == "placeholder" for n in self.dynamic)
            self.dynamic[node] = first
            if first:
                self.lip[node] = 1.0
            return
        if node.op == "get_attr":
            self.dynamic[node] = False
            return
        if not node.users and not self._mutates(node):
            # Nothing reads it (an input guard, a dead computation): it cannot change the output.
            self.dynamic[node] = False
            return
        self._check_random(node)
        if self._is_metadata(node) or not self.is_dyn((node.args, node.kwargs)):
            self.dynamic[node] = False
            if self._mutates(node):
                raise _Unsupported("changes a weight or buffer in place: the model changes with every call")
            return
        self.dynamic[node] = True
        self._check_inplace(node)
        value = self.values[node]
        if isinstance(value, Tensor) and value.dtype in _LOW_PRECISION:
            raise _Unsupported(
                f"computes in {value.dtype}, whose rounding the certificate's float slack does not cover"
            )
        if node.op == "call_module":
            self.lip[node] = self._module_call(node)
            return
        rule = self._find_rule(node)
        if rule is None:
            raise _Unsupported("no sound bound is known for this operation")
        self.lip[node] = rule(self, node)

    def _find_rule(self, node: Node) -> Rule | None:
        if node.op == "call_method":
            return _METHOD_RULES.get(node.target)
        if node.op == "call_function":
            rule = _FUNCTION_RULES.get(node.target)
            if rule is not None:
                return rule
            aten = _aten_name(node.target)
            if aten is not None:
                return _ATEN_RULES.get(aten)
        return None

    def _is_metadata(self, node: Node) -> bool:
        if node.op == "call_method":
            return node.target in _METADATA_METHODS
        if node.op == "call_function":
            if node.target is builtins.getattr:
                return node.args[1] in _METADATA_ATTRS
            if node.target in _METADATA_FUNCTIONS:
                return True
            return _aten_name(node.target) in _METADATA_ATEN
        return False

    def _check_random(self, node: Node) -> None:
        random = False
        if node.op == "call_function":
            if node.target in _RANDOM_FUNCTIONS:
                random = True
            elif node.target in _DROPOUT_FUNCTIONS:
                random = bool(self.value(_arg(node, 2, "training", _DROPOUT_FUNCTIONS[node.target])))
            else:
                aten = _aten_name(node.target)
                if aten in _RANDOM_ATEN or (
                    aten in ("dropout", "feature_dropout", "alpha_dropout")
                    and bool(self.value(_arg(node, 2, "train", False)))
                ):
                    random = True
        elif node.op == "call_method":
            random = node.target in _RANDOM_METHODS
        if random:
            raise _Unsupported("is random (put the model in eval mode; random layers cannot be certified)")

    def _mutates(self, node: Node) -> bool:
        """Whether ``node`` works in place on its first argument."""
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("__")
        if node.op == "call_function":
            return (
                bool(node.kwargs.get("inplace", False))
                or node.target in _INPLACE_OPERATORS
                or (isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name.endswith("_"))
            )
        if node.op == "call_module":
            return bool(getattr(self.modules[node.target], "inplace", False))
        return False

    def _check_inplace(self, node: Node) -> None:
        if not self._mutates(node) or not node.args or not isinstance(node.args[0], Node):
            return
        mutated = node.args[0]
        if not self.dynamic.get(mutated, False):
            raise _Unsupported(
                f"works in place on the constant '{mutated.name}' (a weight or buffer): the model would "
                "change with every call"
            )
        later = [u for u in mutated.users if u is not node and self.order[u] > self.order[node]]
        if later:
            raise _Unsupported(
                f"works in place on '{mutated.name}', which is read again afterwards by "
                f"{', '.join(u.name for u in later)}: the graph's values would not be the model's"
            )

    def _module_call(self, node: Node) -> float:
        module = self.modules[node.target]
        path = str(node.target)
        if len(node.args) != 1 or node.kwargs:
            raise _Unsupported(
                "a bounded module called with more than one argument: its bound is for a map of one input"
            )
        x = node.args[0]
        if not isinstance(x, Node) or not isinstance(self.values[x], Tensor):
            raise _Unsupported("a bounded module applied to something other than a tensor")
        if not has_bound(module):
            if path in self._reported:
                return math.inf
            raise _Unsupported("has no registered bound")
        _check_hooks(module)
        shape = tuple(self.values[x].shape[1:])
        own = self.leaf_bound(module, shape, path)
        folded = self._try_fold(node, module, shape)
        if folded is not None:
            return folded
        return self.add_layer(node, type(module).__name__, own, module, path) * self.L(x)

    def _try_fold(self, node: Node, bn: nn.Module, shape: Shape) -> float | None:
        if not self.fold_batchnorm:
            return None
        prev = node.args[0]
        if not (isinstance(prev, Node) and prev.op == "call_module" and len(prev.users) == 1):
            return None
        layer = self.modules[prev.target]
        layer_in = prev.args[0] if prev.args else None
        if not (isinstance(layer_in, Node) and len(prev.args) == 1 and not prev.kwargs):
            return None
        if not can_fold(layer, bn, self.values[prev].ndim):
            return None
        _check_hooks(bn)
        in_shape = tuple(self.values[layer_in].shape[1:])
        bound = folded_bound(layer, bn, in_shape)
        for row in self.layers:
            if row.node == prev.name:
                row.folded_into = str(node.target)

        def pair(x: Tensor, layer: nn.Module = layer, bn: nn.Module = bn) -> Tensor:
            return bn(layer(x))

        kind = f"{type(layer).__name__}+{type(bn).__name__} (folded)"
        factor = self.add_layer(prev, kind, bound, pair, f"{prev.target} + {node.target}", node.name)
        return factor * self.L(layer_in)


def _module_path(node: Node) -> str:
    """Qualified name of the module whose forward created ``node`` ("" for the top-level forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    innermost = next(reversed(stack.values()))
    return str(innermost[0]) if isinstance(innermost, tuple) else str(next(reversed(stack)))


def _check_hooks(module: nn.Module) -> None:
    """Refuse leaves whose forward hooks could change what they compute.

    The classic ``torch.nn.utils.spectral_norm`` / ``weight_norm`` pre-hooks only recompute
    ``weight`` from parameters before each call (and do not update in eval mode), so the weight the
    bound reads after the recording pass is the one the layer uses; any other hook is refused.
    """
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    if any(not isinstance(h, (SpectralNorm, WeightNorm)) for h in hooks):
        raise _Unsupported(
            "has forward hooks, which may change its output: remove them (or bound the model without them)"
        )


# -- unary rules ------------------------------------------------------------------------------


def _unary(factor: Callable[[_Analysis, Node], float]) -> Rule:
    """Rule for ``op(x, constants...)`` with bound ``factor * L(x)``."""

    def rule(an: _Analysis, node: Node) -> float:
        x = _arg(node, 0, "input")
        an.static(node, 0)
        return factor(an, node) * an.L(x)

    return rule


def _const_factor(value: float) -> Rule:
    return _unary(lambda an, node: value)


def _cast_factor(an: _Analysis, node: Node) -> float:
    out = an.values[node]
    if isinstance(out, Tensor) and not out.is_floating_point():
        raise _Unsupported(f"converts to {out.dtype}, which rounds the input (not Lipschitz)")
    return 1.0


# Identity-like maps: reshapes, permutations, copies, dtype/device moves, and 1-Lipschitz
# elementwise maps (ReLU, ReLU6, tanh, |x|, clamp with constant bounds, softsign, softplus,
# logsigmoid, tanhshrink), and per-fibre 1-Lipschitz reductions (max/min over dims: |max a - max b|
# <= max |a - b|; logsumexp: its gradient is a probability vector).
_rule(
    functions=(
        torch.flatten,
        torch.reshape,
        torch.squeeze,
        torch.unsqueeze,
        torch.transpose,
        torch.swapaxes,
        torch.swapdims,
        torch.permute,
        torch.movedim,
        torch.moveaxis,
        torch.t,
        torch.clone,
        torch.detach,
        torch.relu,
        F.relu,
        F.relu6,
        F.hardtanh,
        torch.tanh,
        F.tanh,
        torch.abs,
        torch.absolute,
        F.softsign,
        F.softplus,
        F.logsigmoid,
        F.tanhshrink,
        torch.clamp,
        torch.clip,
        F.pixel_shuffle,
        F.pixel_unshuffle,
        torch.amax,
        torch.amin,
        torch.logsumexp,
    ),
    methods=(
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "transpose",
        "swapaxes",
        "swapdims",
        "permute",
        "movedim",
        "moveaxis",
        "t",
        "contiguous",
        "clone",
        "detach",
        "relu",
        "relu_",
        "tanh",
        "abs",
        "absolute",
        "clamp",
        "clip",
        "clamp_",
        "clip_",
        "amax",
        "amin",
        "logsumexp",
        "view_as",
        "reshape_as",
        "cpu",
        "cuda",
    ),
    aten=(
        "view",
        "_unsafe_view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "transpose",
        "permute",
        "t",
        "clone",
        "detach",
        "alias",
        "contiguous",
        "relu",
        "relu_",
        "hardtanh",
        "hardtanh_",
        "tanh",
        "abs",
        "clamp",
        "clamp_min",
        "clamp_max",
        "amax",
        "amin",
        "logsumexp",
        "pixel_shuffle",
        "pixel_unshuffle",
        "softplus",
        "log_sigmoid",
        "lift_fresh_copy",
        "_reshape_alias",
        "squeeze_copy",
        "unsqueeze_copy",
        "view_copy",
        "permute_copy",
        "t_copy",
        "transpose_copy",
    ),
)(_const_factor(1.0))

_rule(
    functions=(),
    methods=("float", "double", "to", "type_as", "type"),
    aten=("_to_copy", "to"),
)(_unary(_cast_factor))


@_rule(functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid", "sigmoid_"), aten=("sigmoid", "sigmoid_"))
def _sigmoid_rule(an: _Analysis, node: Node) -> float:
    return _const_factor(0.25)(an, node)


@_rule(functions=(F.leaky_relu,), aten=("leaky_relu", "leaky_relu_"))
def _leaky_rule(an: _Analysis, node: Node) -> float:
    slope = float(an.value(_arg(node, 1, "negative_slope", 0.01)))
    return _unary(lambda a, n: max(1.0, abs(slope)))(an, node)


@_rule(functions=(F.elu,), aten=("elu", "elu_"))
def _elu_rule(an: _Analysis, node: Node) -> float:
    alpha = float(an.value(_arg(node, 1, "alpha", 1.0)))
    if _aten_name(node.target):
        # aten.elu(self, alpha, scale, input_scale): slopes scale and alpha * scale * input_scale * e^(...)
        scale = float(an.value(_arg(node, 2, "scale", 1.0)))
        input_scale = float(an.value(_arg(node, 3, "input_scale", 1.0)))
        factor = max(abs(scale), abs(alpha * scale * input_scale))
    else:
        factor = max(1.0, abs(alpha))
    return _unary(lambda a, n: factor)(an, node)


@_rule(functions=(F.celu,), aten=("celu",))
def _celu_rule(an: _Analysis, node: Node) -> float:
    if float(an.value(_arg(node, 1, "alpha", 1.0))) <= 0:
        raise _Unsupported("CELU with alpha <= 0 is not Lipschitz")
    return _const_factor(1.0)(an, node)


_rule(functions=(F.selu, torch.selu), aten=("selu",))(
    _const_factor(1.0507009873554804934193349852946 * 1.6732632423543772848170429916717 * (1.0 + 1e-12))
)
_rule(functions=(F.hardswish,), aten=("hardswish",))(_const_factor(1.5))
_rule(functions=(F.hardsigmoid,), aten=("hardsigmoid",))(_const_factor(1.0 / 6.0 * (1.0 + 1e-15)))
_rule(functions=(F.silu,), aten=("silu", "silu_"))(_unary(lambda an, node: silu_lipschitz()))
_rule(functions=(F.mish,), aten=("mish",))(_unary(lambda an, node: mish_lipschitz()))


@_rule(functions=(F.gelu,), aten=("gelu",))
def _gelu_rule(an: _Analysis, node: Node) -> float:
    approximate = str(
        an.value(node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none"))
    )
    return _unary(lambda a, n: gelu_lipschitz(approximate))(an, node)


@_rule(functions=(F.prelu, torch.prelu), aten=("prelu", "_prelu_kernel"))
def _prelu_rule(an: _Analysis, node: Node) -> float:
    w = an.value(_arg(node, 1, "weight"))
    slopes = torch.as_tensor(w).detach().to(torch.float64)
    return _unary(lambda a, n: max(1.0, float(slopes.abs().max().item())))(an, node)


@_rule(functions=(F.softmax, F.softmin, torch.softmax), methods=("softmax",), aten=("softmax", "_softmax"))
def _softmax_rule(an: _Analysis, node: Node) -> float:
    # Jacobian diag(p) - p p^T: eigenvalues in [0, 1/2] (Popoviciu: Var_p(v) <= (max v - min v)^2 / 4).
    return _const_factor(0.5)(an, node)


@_rule(
    functions=(F.log_softmax, torch.log_softmax),
    methods=("log_softmax",),
    aten=("log_softmax", "_log_softmax"),
)
def _log_softmax_rule(an: _Analysis, node: Node) -> float:
    # Jacobian I - 1 p^T per fibre of size n: ||I|| + ||1|| ||p|| <= 1 + sqrt(n).
    dim = int(an.value(_arg(node, 1, "dim")))
    n = an.shape(_arg(node, 0, "input"))[dim]
    return _const_factor(1.0 + math.sqrt(n))(an, node)


@_rule(
    functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
    aten=("dropout", "feature_dropout", "alpha_dropout"),
)
def _dropout_rule(an: _Analysis, node: Node) -> float:
    return _const_factor(1.0)(an, node)  # random (training) dropout was refused by _check_random


@_rule(functions=(torch.mean,), methods=("mean",), aten=("mean",))
def _mean_rule(an: _Analysis, node: Node) -> float:
    # Each output averages n entries of disjoint fibres: |mean(a) - mean(b)| <= ||a - b|| / sqrt(n).
    x = _arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(1.0 / math.sqrt(n))(an, node)


@_rule(functions=(torch.sum,), methods=("sum",), aten=("sum",))
def _sum_rule(an: _Analysis, node: Node) -> float:
    x = _arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(math.sqrt(n))(an, node)


@_rule(
    functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",), aten=("linalg_vector_norm", "norm")
)
def _norm_rule(an: _Analysis, node: Node) -> float:
    # A p-norm of each fibre of n entries: |‖a‖_p - ‖b‖_p| <= ‖a - b‖_p <= c ‖a - b‖_2 with c = 1
    # for p >= 2 and n^(1/p - 1/2) for 1 <= p < 2.
    p_value = an.value(
        node.kwargs.get("p", node.kwargs.get("ord", node.args[1] if len(node.args) > 1 else 2))
    )
    if p_value in (None, "fro"):
        p_value = 2.0
    if isinstance(p_value, str) or not float(p_value) >= 1.0:
        raise _Unsupported(f"norm with p={p_value!r} is not supported")
    p = float(p_value)
    x = _arg(node, 0, "input")
    n = an.value(x).numel() / max(1, an.values[node].numel())
    return _const_factor(1.0 if p >= 2.0 else n ** (1.0 / p - 0.5))(an, node)


@_rule(functions=(torch.std,), methods=("std",), aten=("std",))
def _std_rule(an: _Analysis, node: Node) -> float:
    # std = ||P a|| / sqrt(n - correction) with P the centring projection (norm 1).
    x = _arg(node, 0, "input")
    correction = node.kwargs.get("correction", 1 if node.kwargs.get("unbiased", True) else 0)
    n = an.value(x).numel() / max(1, an.values[node].numel())
    denom = n - float(an.value(correction))
    if denom <= 0:
        raise _Unsupported("std over too few entries")
    return _const_factor(1.0 / math.sqrt(denom))(an, node)


# -- pure copies (selections) ----------------------------------------------------------------


def _selection(an: _Analysis, node: Node) -> float:
    """Bound of a map that copies entries of its one input (each output entry is one input entry).

    Its matrix ``P`` has at most one 1 per row, so ``||P||_2 = sqrt(max column sum)``, and the
    column sums are ``P^T 1``: the gradient of ``sum(P x)``, computed by replaying the operation
    on a float64 zero tensor of the recorded input shape.
    """
    x = _arg(node, 0, "input")
    an.static(node, 0)
    template = an.value(x)
    probe = torch.zeros(template.shape, dtype=torch.float64, device=template.device, requires_grad=True)
    args = [probe] + [an.value(a) for a in node.args[1:]]
    kwargs = {k: an.value(v) for k, v in node.kwargs.items()}
    with torch.enable_grad():
        out = (
            getattr(probe, node.target)(*args[1:], **kwargs)
            if node.op == "call_method"
            else node.target(*args, **kwargs)
        )
        if isinstance(out, (tuple, list)):
            raise _Unsupported("a copy operation that returns several tensors")
        (counts,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    if counts is None:
        return 0.0
    return math.sqrt(float(counts.max().item())) * an.L(x)


_rule(
    functions=(
        torch.flip,
        torch.roll,
        torch.narrow,
        torch.select,
        torch.index_select,
        torch.take,
        torch.gather,
        torch.tile,
        torch.repeat_interleave,
        torch.broadcast_to,
        F.pad,
        torch.diagonal,
        torch.masked_select,
        torch.tril,
        torch.triu,
        F.channel_shuffle,
        F.upsample_nearest,
    ),
    methods=(
        "flip",
        "roll",
        "narrow",
        "select",
        "index_select",
        "take",
        "gather",
        "tile",
        "repeat",
        "repeat_interleave",
        "expand",
        "expand_as",
        "broadcast_to",
        "diagonal",
        "masked_select",
        "tril",
        "triu",
        "unfold",
    ),
    aten=(
        "flip",
        "roll",
        "narrow",
        "select",
        "slice",
        "index_select",
        "index",
        "take",
        "gather",
        "repeat",
        "repeat_interleave",
        "expand",
        "expand_copy",
        "constant_pad_nd",
        "reflection_pad1d",
        "reflection_pad2d",
        "replication_pad1d",
        "replication_pad2d",
        "pad",
        "diagonal",
        "channel_shuffle",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "_unsafe_index",
        "slice_copy",
        "select_copy",
        "unfold",
    ),
)(_selection)


def _interpolate_guard(an: _Analysis, node: Node) -> float:
    mode = an.value(node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest"))
    if mode not in ("nearest", "nearest-exact"):
        raise _Unsupported(f"interpolation mode {mode!r} is not bounded here (only nearest copies are)")
    return _selection(an, node)


_rule(functions=(F.interpolate,))(_interpolate_guard)


@_rule(functions=(operator.getitem,))
def _getitem_rule(an: _Analysis, node: Node) -> float | list[float | None]:
    container, index = node.args
    if an.is_dyn(index):
        raise _Unsupported(
            "indexing with input-dependent indices (data-dependent selection) is not Lipschitz"
        )
    if isinstance(an.value(container), Tensor):
        return _selection(an, node)
    bounds = an.lip[container]
    if not isinstance(bounds, list) or not isinstance(index, (int, slice)):
        raise _Unsupported("indexing into a non-tensor value that depends on the input")
    picked = bounds[index] if isinstance(index, slice) else [bounds[index]]
    if any(b is None for b in picked):
        raise _Unsupported("uses integer indices computed from the input (argmax/argsort)")
    return list(picked) if isinstance(index, slice) else picked[0]


@_rule(functions=(builtins.getattr,))
def _getattr_rule(an: _Analysis, node: Node) -> float:
    # x.T / x.mT / x.H (transposes of a real tensor) and x.data (the same values) are copies;
    # x.max(dim).values is the first element of the (values, indices) pair.
    container, attr = node.args
    bounds = an.lip.get(container) if isinstance(container, Node) else None
    if isinstance(bounds, list) and attr in ("values", "indices"):
        if attr == "indices" or bounds[0] is None:
            raise _Unsupported("uses integer indices computed from the input (argmax/argsort)")
        return bounds[0]
    if attr not in ("T", "mT", "H", "mH", "data"):
        raise _Unsupported(f"attribute '{attr}' of an input-dependent tensor")
    value = an.values[node]
    if isinstance(value, Tensor) and value.is_complex():
        raise _Unsupported("complex tensors are not supported")
    return an.L(container)


@_rule(
    functions=(torch.split, torch.chunk, torch.unbind, torch.tensor_split),
    methods=("split", "chunk", "unbind", "tensor_split", "split_with_sizes"),
    aten=("split", "split_with_sizes", "chunk", "unbind", "tensor_split"),
)
def _split_rule(an: _Analysis, node: Node) -> list[float | None]:
    x = _arg(node, 0, "input")
    an.static(node, 0)
    return [an.L(x)] * len(an.values[node])


@_rule(
    functions=(torch.sort, torch.topk, torch.max, torch.min, torch.median, torch.kthvalue),
    methods=("sort", "topk", "max", "min", "median", "kthvalue"),
    aten=("sort", "topk", "max", "min"),
)
def _values_indices_rule(an: _Analysis, node: Node) -> float | list[float | None]:
    """Sorting and order statistics along fibres are 1-Lipschitz; their indices are not usable.

    ``torch.max(a, b)`` of two tensors is the elementwise maximum (see :func:`_maximum_rule`).
    """
    second = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if node.target in (torch.max, torch.min, "max", "min") and isinstance(an.value(second), Tensor):
        return _maximum_rule(an, node)
    if _aten_name(node.target) in ("max", "min") and isinstance(an.value(second), Tensor):
        return _maximum_rule(an, node)
    x = _arg(node, 0, "input")
    an.static(node, 0)
    out = an.values[node]
    if isinstance(out, Tensor):
        return an.L(x)
    return [an.L(x), None]


# -- arithmetic -------------------------------------------------------------------------------


def _is_mean_of(an: _Analysis, m: Argument, a: Argument) -> bool:
    """Whether ``m`` is ``a.mean(dims, keepdim=True)``: then ``a - m`` is an orthogonal projection."""
    if not (isinstance(m, Node) and isinstance(a, Node)):
        return False
    is_mean = (m.op == "call_method" and m.target == "mean") or (
        m.op == "call_function" and (m.target is torch.mean or _aten_name(m.target) == "mean")
    )
    if not is_mean or not m.args or m.args[0] is not a:
        return False
    keepdim = m.kwargs.get("keepdim", m.args[2] if len(m.args) > 2 else False)
    return bool(an.value(keepdim)) and an.values[m].ndim == an.values[a].ndim


@_rule(
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
def _add_rule(an: _Analysis, node: Node) -> float:
    a = _arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    alpha = abs(float(an.value(node.kwargs.get("alpha", 1))))
    out = an.values[node]
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    subtract = name in ("sub", "isub", "subtract", "sub_", "__sub__", "__isub__") or _aten_name(
        node.target
    ) in ("sub", "sub_")
    if subtract and alpha == 1.0 and _is_mean_of(an, b, a):
        return an.L(a)
    reverse = name in ("rsub", "__rsub__") or _aten_name(node.target) == "rsub"
    # rsub(input, other, alpha) = other - alpha * input; otherwise input +- alpha * other.
    coef_a, coef_b = (alpha, 1.0) if reverse else (1.0, alpha)
    if not isinstance(out, Tensor):
        raise _Unsupported("arithmetic on input-dependent non-tensor values")
    return coef_a * an.replication(a, out) * an.L(a) + coef_b * an.replication(b, out) * an.L(b)


@_rule(
    functions=(operator.neg, operator.pos, torch.neg, torch.negative),
    methods=("neg", "negative", "__neg__", "__pos__", "neg_"),
    aten=("neg",),
)
def _neg_rule(an: _Analysis, node: Node) -> float:
    return _const_factor(1.0)(an, node)


def _abs_max(value: Any) -> float:
    t = torch.as_tensor(value).detach().to(torch.float64)
    if not torch.isfinite(t).all():
        raise _Unsupported("multiplies by a constant that contains NaN or Inf")
    return float(t.abs().max().item()) if t.numel() else 0.0


@_rule(
    functions=(operator.mul, operator.imul, torch.mul, torch.multiply),
    methods=("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"),
    aten=("mul", "mul_"),
)
def _mul_rule(an: _Analysis, node: Node) -> float:
    a = _arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if an.is_dyn(a) and an.is_dyn(b):
        raise _Unsupported(
            "product of two input-dependent tensors (e.g. x * x, gating, attention) is not globally Lipschitz"
        )
    dyn, const = (a, b) if an.is_dyn(a) else (b, a)
    out = an.values[node]
    return _abs_max(an.value(const)) * an.replication(dyn, out) * an.L(dyn)


@_rule(
    functions=(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide),
    methods=("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
    aten=("div", "div_"),
)
def _div_rule(an: _Analysis, node: Node) -> float:
    a = _arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if an.is_dyn(b):
        raise _Unsupported("division by an input-dependent tensor is not globally Lipschitz")
    if node.kwargs.get("rounding_mode") is not None:
        raise _Unsupported("rounding division is not continuous")
    c = torch.as_tensor(an.value(b)).detach().to(torch.float64)
    smallest = float(c.abs().min().item()) if c.numel() else math.inf
    if not smallest > 0 or not torch.isfinite(c).all():
        raise _Unsupported("division by a constant that contains 0, NaN or Inf")
    return an.replication(a, an.values[node]) * an.L(a) / smallest


@_rule(functions=(operator.pow, torch.pow), methods=("pow", "__pow__"), aten=("pow",))
def _pow_rule(an: _Analysis, node: Node) -> float:
    exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if (
        an.is_dyn(exponent)
        or not isinstance(an.value(exponent), (int, float))
        or float(an.value(exponent)) != 1.0
    ):
        raise _Unsupported("powers of an input-dependent tensor (x ** 2, ...) are not globally Lipschitz")
    return _const_factor(1.0)(an, node)


def _maximum_rule(an: _Analysis, node: Node) -> float:
    # |max(a, b) - max(a', b')| <= max(|a - a'|, |b - b'|) entrywise, so the squared output
    # difference is at most the sum of both squared input differences.
    a = _arg(node, 0, "input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    out = an.values[node]
    la = an.replication(a, out) * an.L(a)
    lb = an.replication(b, out) * an.L(b)
    return math.sqrt(la * la + lb * lb)


_rule(
    functions=(torch.maximum, torch.minimum, torch.fmax, torch.fmin),
    methods=("maximum", "minimum", "fmax", "fmin"),
    aten=("maximum", "minimum", "fmax", "fmin"),
)(_maximum_rule)


@_rule(functions=(torch.where,), methods=("where",), aten=("where",))
def _where_rule(an: _Analysis, node: Node) -> float:
    if node.op == "call_method":  # x.where(cond, y)
        x, cond, y = (
            node.args[0],
            node.args[1],
            node.args[2] if len(node.args) > 2 else node.kwargs.get("other"),
        )
    else:
        cond, x, y = node.args[0], node.args[1], node.args[2]
    if an.is_dyn(cond):
        raise _Unsupported("selection by an input-dependent condition is not continuous")
    out = an.values[node]
    lx = an.replication(x, out) * an.L(x)
    ly = an.replication(y, out) * an.L(y)
    return math.sqrt(lx * lx + ly * ly)


@_rule(
    functions=(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack),
    aten=("cat", "concat", "stack"),
)
def _cat_rule(an: _Analysis, node: Node) -> float:
    # The parts occupy disjoint output coordinates: ||out||^2 = sum ||part_i||^2.
    parts = _arg(node, 0, "tensors")
    an.static(node, 0)
    return math.sqrt(sum(an.L(p) ** 2 for p in parts))


# -- weighted linear maps ---------------------------------------------------------------------


def _weight(an: _Analysis, node: Node, index: int, name: str) -> Tensor:
    w = _arg(node, index, name)
    if an.is_dyn(w):
        raise _Unsupported("its weight depends on the input (a product of two input-dependent tensors)")
    value = an.value(w)
    if not isinstance(value, Tensor):
        raise _Unsupported("expected a weight tensor")
    return value.detach()


def _weighted(an: _Analysis, node: Node, kind: str, factor: float, fn: Callable[[Tensor], Tensor]) -> float:
    x = _arg(node, 0, "input")
    an.static(node, 0)
    return an.add_layer(node, kind, factor, fn) * an.L(x)


@_rule(functions=(F.linear,), aten=("linear",))
def _linear_rule(an: _Analysis, node: Node) -> float:
    w = _weight(an, node, 1, "weight")
    b = an.value(_arg(node, 2, "bias", None))
    return _weighted(an, node, "linear", matrix_spectral_norm(w), lambda x: F.linear(x, w, b))


@_rule(
    functions=(operator.matmul, torch.matmul, torch.mm, torch.bmm),
    methods=("matmul", "mm", "bmm", "__matmul__", "__rmatmul__"),
    aten=("matmul", "mm", "bmm"),
)
def _matmul_rule(an: _Analysis, node: Node) -> float:
    a, b = node.args[0], node.args[1]
    if node.target == "__rmatmul__":
        a, b = b, a
    if an.is_dyn(a) and an.is_dyn(b):
        raise _Unsupported(
            "matrix product of two input-dependent tensors (attention) is not globally Lipschitz"
        )
    dyn, const = (a, b) if an.is_dyn(a) else (b, a)
    w = an.value(const).detach()
    x = an.value(dyn)
    if w.ndim > 2 and (x.ndim != w.ndim or tuple(x.shape[:-2]) != tuple(w.shape[:-2])):
        raise _Unsupported("batched matmul with a broadcast constant is not supported")
    # Each row (x @ W) or column (W @ x) of the input is multiplied by W (or by its own slice of W).
    norm = (
        matrix_spectral_norm(w)
        if w.ndim <= 2
        else max(matrix_spectral_norm(m) for m in w.reshape(-1, *w.shape[-2:]))
    )
    return an.add_layer(node, "matmul", norm, None) * an.L(dyn)


@_rule(aten=("addmm",))
def _addmm_rule(an: _Analysis, node: Node) -> float:
    # addmm(bias, mat1, mat2, beta, alpha) = beta * bias + alpha * mat1 @ mat2.
    bias, mat1, mat2 = node.args[0], node.args[1], node.args[2]
    beta = abs(float(an.value(node.kwargs.get("beta", 1))))
    alpha = abs(float(an.value(node.kwargs.get("alpha", 1))))
    if an.is_dyn(mat2):
        raise _Unsupported("matrix product with an input-dependent right factor")
    w = an.value(mat2).detach()
    norm = an.add_layer(node, "addmm", alpha * matrix_spectral_norm(w), None)
    return beta * an.L(bias) + norm * an.L(mat1)


def _conv_shape_args(an: _Analysis, node: Node, first: int) -> dict[str, Any]:
    names = ("stride", "padding", "dilation", "groups")
    defaults = (1, 0, 1, 1)
    return {
        n: _as_tuple(an.value(_arg(node, first + i, n, d)))
        for i, (n, d) in enumerate(zip(names, defaults, strict=True))
    }


def _as_tuple(value: Any) -> Any:
    """aten passes sizes as lists; convolution bounds take ints, tuples or padding strings."""
    return tuple(value) if isinstance(value, list) else value


@_rule(functions=(F.conv1d, F.conv2d, torch.conv1d, torch.conv2d), aten=("conv1d", "conv2d"))
def _conv_rule(an: _Analysis, node: Node) -> float:
    from certify.conv_norm import conv_operator_bound

    w = _weight(an, node, 1, "weight")
    b = an.value(_arg(node, 2, "bias", None))
    cfg = _conv_shape_args(an, node, 3)
    shape = an.shape(_arg(node, 0, "input"))[1:]
    factor = conv_operator_bound(w, padding_mode="zeros", input_shape=shape, **cfg)
    conv = F.conv1d if w.ndim == 3 else F.conv2d
    return _weighted(an, node, conv.__name__, factor, lambda x: conv(x, w, b, **cfg))


def _transposed_factor(
    an: _Analysis, node: Node, w: Tensor, stride: Any, padding: Any, dilation: Any, groups: int
) -> float:
    """A transposed convolution is the adjoint of the convolution from its output size (same norm)."""
    from certify.conv_norm import conv_operator_bound

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


@_rule(
    functions=(F.conv_transpose1d, F.conv_transpose2d, torch.conv_transpose1d, torch.conv_transpose2d),
    aten=("conv_transpose1d", "conv_transpose2d"),
)
def _conv_transpose_rule(an: _Analysis, node: Node) -> float:
    # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
    w = _weight(an, node, 1, "weight")
    b = an.value(_arg(node, 2, "bias", None))
    stride = _as_tuple(an.value(_arg(node, 3, "stride", 1)))
    padding = _as_tuple(an.value(_arg(node, 4, "padding", 0)))
    output_padding = _as_tuple(an.value(_arg(node, 5, "output_padding", 0)))
    groups = int(an.value(_arg(node, 6, "groups", 1)))
    dilation = _as_tuple(an.value(_arg(node, 7, "dilation", 1)))
    factor = _transposed_factor(an, node, w, stride, padding, dilation, groups)
    conv_t = F.conv_transpose1d if w.ndim == 3 else F.conv_transpose2d
    return _weighted(
        an,
        node,
        conv_t.__name__,
        factor,
        lambda x: conv_t(x, w, b, stride, padding, output_padding, groups, dilation),
    )


@_rule(aten=("convolution", "_convolution"))
def _convolution_rule(an: _Analysis, node: Node) -> float:
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    from certify.conv_norm import conv_operator_bound

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
    """Per-channel ``|gamma| / sqrt(running_var + eps)`` (float64) of an eval-mode batch_norm call."""
    if running_var is None:
        raise _Unsupported("batch_norm without running statistics uses batch statistics (couples samples)")
    var = torch.as_tensor(running_var).detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + float(eps))
    if weight is not None:
        scale = scale * torch.as_tensor(weight).detach().to(device=scale.device, dtype=torch.float64).abs()
    if not torch.isfinite(scale).all():
        raise _Unsupported("batch_norm with non-finite scale")
    return scale


_CONV_FUNCTIONS = {F.conv1d, F.conv2d, torch.conv1d, torch.conv2d}


def _fold_functional(an: _Analysis, node: Node, scale: Tensor) -> float | None:
    """Fold an eval batch_norm into the functional convolution / linear map that only feeds it.

    ``batch_norm(conv(x, W))`` is the convolution with kernel ``W`` scaled per output channel by
    ``s`` (plus a constant), as for modules (:mod:`certify.folding`); returns its bound times the
    bound of ``x``, or None when the pattern does not apply.
    """
    prev = node.args[0]
    if not an.fold_batchnorm or not (isinstance(prev, Node) and prev.op == "call_function"):
        return None
    if len(prev.users) != 1 or not prev.args or an.is_dyn(prev.args[1:]) or an.is_dyn(prev.kwargs):
        return None
    aten = _aten_name(prev.target)
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
        from certify.conv_norm import conv_operator_bound

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


def _bn_bound(an: _Analysis, node: Node, scale: Tensor) -> float:
    an.static(node, 0)
    folded = _fold_functional(an, node, scale)
    if folded is not None:
        return folded
    return _weighted(an, node, "batch_norm", float(scale.max().item()) * (1.0 + 1e-12), None)


@_rule(functions=(F.batch_norm,))
def _batch_norm_rule(an: _Analysis, node: Node) -> float:
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if bool(an.value(_arg(node, 5, "training", False))):
        raise _Unsupported("batch_norm in training mode uses batch statistics (couples samples)")
    scale = _bn_scale(
        an.value(_arg(node, 3, "weight", None)),
        an.value(_arg(node, 2, "running_var")),
        an.value(_arg(node, 7, "eps", 1e-5)),
    )
    return _bn_bound(an, node, scale)


@_rule(
    aten=(
        "batch_norm",
        "_native_batch_norm_legit_no_training",
        "native_batch_norm",
        "_native_batch_norm_legit_functional",
        "cudnn_batch_norm",
    )
)
def _aten_batch_norm_rule(an: _Analysis, node: Node) -> float | list[float | None]:
    # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...);
    # _native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps).
    name = _aten_name(node.target)
    if name == "_native_batch_norm_legit_no_training":
        eps = an.value(node.args[6])
    else:
        if bool(an.value(node.args[5])):
            raise _Unsupported("batch_norm in training mode uses batch statistics (couples samples)")
        eps = an.value(node.args[7])
    bound = _bn_bound(an, node, _bn_scale(an.value(node.args[1]), an.value(node.args[4]), eps))
    return bound if isinstance(an.values[node], Tensor) else [bound] + [None] * (len(an.values[node]) - 1)


@_rule(
    functions=(F.instance_norm, F.layer_norm, F.group_norm, F.normalize, F.local_response_norm, F.rms_norm),
    aten=("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm"),
)
def _normalisation_rule(an: _Analysis, node: Node) -> float:
    raise _Unsupported(
        "divides by a statistic of the input (layer/group/instance norm): not globally Lipschitz"
    )


# -- pooling: the bound of the equivalent module ----------------------------------------------


def _pool_module(an: _Analysis, node: Node) -> nn.Module:
    target = node.target
    name = _aten_name(target) or getattr(target, "__name__", "")
    v = an.value
    if target in (F.avg_pool1d, F.avg_pool2d) or name in ("avg_pool1d", "avg_pool2d"):
        cls = nn.AvgPool1d if name.endswith("1d") or target is F.avg_pool1d else nn.AvgPool2d
        kernel = v(_arg(node, 1, "kernel_size"))
        stride = v(_arg(node, 2, "stride", None)) or kernel
        kwargs = {
            "padding": v(_arg(node, 3, "padding", 0)),
            "ceil_mode": v(_arg(node, 4, "ceil_mode", False)),
            "count_include_pad": v(_arg(node, 5, "count_include_pad", True)),
        }
        if cls is nn.AvgPool2d:
            kwargs["divisor_override"] = v(_arg(node, 6, "divisor_override", None))
        return cls(kernel, stride, **kwargs)
    if target in (F.max_pool1d, F.max_pool2d) or name in (
        "max_pool1d",
        "max_pool2d",
        "max_pool2d_with_indices",
    ):
        cls = nn.MaxPool1d if name.endswith("1d") or target is F.max_pool1d else nn.MaxPool2d
        kernel = v(_arg(node, 1, "kernel_size"))
        stride = v(_arg(node, 2, "stride", None)) or kernel
        return cls(
            kernel,
            stride,
            v(_arg(node, 3, "padding", 0)),
            v(_arg(node, 4, "dilation", 1)),
            ceil_mode=v(_arg(node, 5, "ceil_mode", False)),
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
        return cls(v(_arg(node, 1, "output_size")))
    if target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d) or name in ("adaptive_max_pool2d",):
        cls = nn.AdaptiveMaxPool1d if target is F.adaptive_max_pool1d else nn.AdaptiveMaxPool2d
        return cls(v(_arg(node, 1, "output_size")))
    if target in (F.lp_pool1d, F.lp_pool2d):
        cls = nn.LPPool1d if target is F.lp_pool1d else nn.LPPool2d
        return cls(
            v(_arg(node, 1, "norm_type")),
            v(_arg(node, 2, "kernel_size")),
            v(_arg(node, 3, "stride", None)),
            v(_arg(node, 4, "ceil_mode", False)),
        )
    raise _Unsupported("unknown pooling operation")


@_rule(
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
def _pool_rule(an: _Analysis, node: Node) -> float | list[float | None]:
    x = _arg(node, 0, "input")
    an.static(node, 0)
    module = _pool_module(an, node)
    factor = an.leaf_bound(module, an.shape(x)[1:], _module_path(node))
    factor = an.add_layer(node, type(module).__name__, factor, module)
    out = an.values[node]
    bound = factor * an.L(x)
    return bound if isinstance(out, Tensor) else [bound, None]


# ---------------------------------------------------------------------------------------------
# Entry points


def _head(an: _Analysis, out: Node) -> tuple[Tensor, float, str] | None:
    """``(W, Lip(g), path)`` when the output is ``W g(x) + b`` on per-sample feature vectors."""
    value = an.values[out]
    if not (isinstance(value, Tensor) and value.ndim == 2):
        return None
    if out.op == "call_module":
        module = an.modules[out.target]
        if (
            isinstance(module, nn.Linear)
            and type(module).forward is nn.Linear.forward
            and len(out.args) == 1
            and not module._forward_hooks
            and not module._forward_pre_hooks
        ):
            return module.weight.detach(), an.L(out.args[0]), str(out.target)
        return None
    if out.op == "call_function" and (out.target is F.linear or _aten_name(out.target) == "linear"):
        if an.is_dyn(out.args[1]) or (len(out.args) > 2 and an.is_dyn(out.args[2])):
            return None
        return an.value(out.args[1]).detach(), an.L(out.args[0]), _module_path(out) or out.name
    if out.op == "call_function" and _aten_name(out.target) == "addmm":
        if an.is_dyn(out.args[0]) or an.is_dyn(out.args[2]) or out.kwargs:
            return None
        return an.value(out.args[2]).detach().T, an.L(out.args[1]), _module_path(out) or out.name
    return None


def _iter_modes(model: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    for m in model.modules():
        yield m, m.training


def analyze(
    model: nn.Module,
    input_shape: Shape,
    *,
    fold_batchnorm: bool = True,
    example: Tensor | None = None,
    layer_value: Callable[[LayerBound], float] | None = None,
) -> GraphAnalysis:
    """Trace and bound ``model`` for per-sample inputs of ``input_shape``; see the module docstring.

    The model is analysed in eval mode (its modes are restored afterwards). ``example`` (a batch
    of real inputs) replaces the random recording inputs, so that each :class:`LayerBound` carries
    the input a real sample gives that layer. The model's own ``lipschitz_bound`` (if any) is not
    used: the root is always traced; its submodules with bounds are leaves.

    ``layer_value`` is for tightness studies only: it replaces each leaf's factor by its value for
    the leaf's row (for instance a converged power-iteration norm), so that the same composition
    along the graph can be compared; the result is then a bound only if every value is one.

    Raises:
        UnsupportedOperationsError: listing every operation that cannot be bounded.
        UnboundableModuleError: when the model cannot be traced at all.
        ValueError: when the traced graph does not reproduce the model, or the model mixes samples.
    """
    shape = tuple(int(s) for s in input_shape)
    modes = list(_iter_modes(model))
    try:
        model.eval()
        x = _record_input(model, shape, example)
        gm, problems = trace(model, x)
        recorder = _Recorder(gm)
        with torch.no_grad():
            try:
                traced_out = recorder.run(x.clone())
                real_out = model(x.clone())
            except Exception as err:
                raise ValueError(
                    f"the model does not accept inputs of shape {shape}: {_one_line(err)}"
                ) from err
        # Bound first: an unsupported operation (a random one, say) explains a mismatch below.
        an = _Analysis(model, gm, recorder.values, fold_batchnorm, problems, layer_value)
        bound = an.run()
        with torch.no_grad():
            if not _close(traced_out, real_out):
                raise ValueError(
                    "the traced graph of the model does not reproduce its output (data-dependent behaviour "
                    "that torch.fx cannot see): give the model a bound of its own or register one"
                )
            if isinstance(real_out, Tensor) and real_out.shape[:1] == (_BATCH,):
                other = x.clone()
                other[1] = 1.0 - other[1]
                if not _close(model(other)[:1], real_out[:1]):
                    raise ValueError(
                        "the model's output for one sample depends on the other samples of the batch "
                        "(batch statistics?): put it in eval mode; such a model cannot be certified "
                        "per sample"
                    )
        head = _head(an, an.output_node)
    finally:
        for m, mode in modes:
            m.training = mode
    result = GraphAnalysis(bound=bound, input_shape=shape, layers=an.layers)
    if head is not None:
        result.head_weight = head[0].to(torch.float64)
        result.body_bound = head[1]
        result.head_path = head[2]
    return result


def graph_bound(
    model: nn.Module, input_shape: Shape, *, path: str = "", fold_batchnorm: bool = True
) -> float:
    """Sound float64 bound of ``model``'s Lipschitz constant along its traced graph (see :func:`analyze`)."""
    try:
        return analyze(model, input_shape, fold_batchnorm=fold_batchnorm).bound
    except UnsupportedOperationsError as err:
        if path:
            raise UnsupportedOperationsError(model, err.problems, path) from None
        raise
