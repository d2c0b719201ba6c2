"""The analysis engine: bounds every node of a recorded graph, in topological order.

For each node, :class:`Analysis` decides whether it depends on the model input (a node that does
not is a constant, with bound 0), refuses what cannot be certified (random operations, work in
place on weights or on values read later, half precision), bounds a leaf module call by its own
bound times the bound of its input (folding an eval-mode BatchNorm into the convolution or linear
layer that only feeds it, :mod:`certify.rules.folding`), and bounds every other call with the rule
registered for it (:func:`rule`; the rules are in :mod:`certify.graph.rules`), after the rules of
op patterns that are Lipschitz as a whole (:func:`pre_rule`, :mod:`certify.graph.patterns`). A
boolean computed from the input is no error by itself, only where it is used. Each leaf with a
weight becomes a :class:`LayerBound` row. Unsupported nodes are collected, not raised one by one,
so that one :class:`~certify.graph.trace.UnsupportedOperationsError` lists all of them.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import Argument, Node, map_aggregate
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from certify.contract import Shape, UnboundableModuleError, has_bound, leaf_bound
from certify.graph.ops import (
    DROPOUT_FUNCTIONS,
    INPLACE_OPERATORS,
    LOW_PRECISION,
    METADATA_ATEN,
    METADATA_ATTRS,
    METADATA_FUNCTIONS,
    METADATA_METHODS,
    RANDOM_ATEN,
    RANDOM_FUNCTIONS,
    RANDOM_METHODS,
    SHAPE_ONLY_SECOND,
    Unsupported,
    UnsupportedValue,
    arg,
    aten_name,
    target_name,
)
from certify.graph.trace import Problem, UnsupportedOperationsError, one_line
from certify.rules.folding import can_fold, folded_bound

__all__ = [
    "CONDITION",
    "SQUARE_REASON",
    "Analysis",
    "LayerBound",
    "PreRule",
    "Rule",
    "module_path",
    "pre_rule",
    "rule",
]


#: A per-op rule: ``fn(analysis, node)`` -> the bound of the node's output (see :func:`rule`).
Rule = Callable[["Analysis", Node], "float | list[float | None]"]
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
_ATEN_RULES: dict[str, Rule] = {}
#: Rules of op patterns (:mod:`certify.graph.patterns`), asked first: each returns None when its
#: pattern does not match ``node``, else the node's bound (or a symbolic value, such as a sum of squares).
PreRule = Callable[["Analysis", Node], Any]
_PRE_RULES: list[PreRule] = []


def rule(
    functions: tuple[Any, ...] = (), methods: tuple[str, ...] = (), aten: tuple[str, ...] = ()
) -> Callable[[Rule], Rule]:
    """Register a per-op rule for calls of ``functions``, tensor ``methods`` and ``aten`` operators.

    A rule ``fn(analysis, node)`` returns the bound of the node's output with respect to the model
    input (a list for a node that returns several tensors) or raises :class:`Unsupported`.
    """

    def deco(fn: Rule) -> Rule:
        for f in functions:
            _FUNCTION_RULES[f] = fn
        for m in methods:
            _METHOD_RULES[m] = fn
        for a in aten:
            _ATEN_RULES[a] = fn
        return fn

    return deco


#: The bound recorded for a boolean tensor computed from the input (see :meth:`Analysis.L`).
CONDITION = object()
#: Why a square of an input-dependent value is refused where it is used.
SQUARE_REASON = (
    "product of two input-dependent tensors (here a square, e.g. x * x) is not globally Lipschitz; only the "
    "square root of a non-negative combination of squares (an L2 norm) is bounded"
)


def pre_rule(fn: PreRule) -> PreRule:
    """Register a pattern rule, asked before the per-op rules (see :data:`PreRule`)."""
    _PRE_RULES.append(fn)
    return fn


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


class Analysis:
    """One bounding pass over a recorded graph (see the module docstring); :meth:`run` returns the bound."""

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
                raise Unsupported("an input-dependent value is nested in a container argument")
            return 0.0
        bound = self.lip[a]
        if isinstance(bound, list):
            raise Unsupported(f"'{a.name}' is a tuple of tensors, used here as one tensor")
        if bound is CONDITION:
            raise UnsupportedValue(
                a, "a condition computed from the input, used as a number or a selector: not continuous"
            )
        if not isinstance(bound, (int, float)):  # a pattern's symbolic value (a sum of squares)
            raise UnsupportedValue(a, SQUARE_REASON)
        return float(bound)

    def static(self, node: Node, *exclude: int) -> None:
        """Require every argument except positions ``exclude`` (and the kwargs named alike) to be constant."""
        if node.op == "call_method" and node.target in SHAPE_ONLY_SECOND:
            exclude = (*exclude, 1)
        for i, a in enumerate(node.args):
            if i not in exclude and self.is_dyn(a):
                raise Unsupported(f"argument {i} depends on the input, which this bound does not allow")
        for key, a in node.kwargs.items():
            if key not in ("input", "self") and self.is_dyn(a):
                raise Unsupported(f"argument '{key}' depends on the input, which this bound does not allow")

    def shape(self, a: Argument) -> Shape:
        v = self.value(a)
        if not isinstance(v, Tensor):
            raise Unsupported("expected a tensor argument")
        return tuple(v.shape)

    def replication(self, a: Argument, out: Tensor) -> float:
        """``sqrt(numel(out) / numel(a))``: broadcasting copies each entry of ``a`` that many times."""
        v = self.value(a)
        n_in = v.numel() if isinstance(v, Tensor) else 1
        if n_in == 0:
            return 1.0
        return math.sqrt(max(1.0, out.numel() / n_in))

    def leaf_bound(self, module: nn.Module, shape: Shape) -> float:
        """The bound of a leaf module (one with a bound of its own or a registered one) for ``shape``."""
        key = (id(module), shape)
        if key not in self._leaf_cache:
            self._leaf_cache[key] = leaf_bound(module, shape)
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
            path=path if path is not None else module_path(node),
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
            except UnsupportedValue as why:
                # the value without a bound is the problem, not each of its uses
                if why.node.name not in {p.node for p in self.problems}:
                    self._problem(why.node, str(why))
                self.dynamic[node], self.lip[node] = True, math.inf
            except Unsupported as why:
                self._problem(node, str(why))
            except (UnboundableModuleError, ValueError) as err:
                self._problem(node, one_line(err))
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
        # a Node: any other result was recorded as a problem above
        self.output_node = cast(Node, result)
        try:
            return self.L(self.output_node)
        except Unsupported as why:
            self._problem(output, str(why))
            raise UnsupportedOperationsError(self.model, self.problems) from None

    def _problem(self, node: Node, reason: str) -> None:
        self.dynamic[node] = True
        self.lip[node] = math.inf
        self.problems.append(Problem(node.name, target_name(node), module_path(node), reason))

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
                raise Unsupported("changes a weight or buffer in place: the model changes with every call")
            return
        self.dynamic[node] = True
        self._check_inplace(node)
        value = self.values[node]
        if isinstance(value, Tensor) and value.dtype in LOW_PRECISION:
            raise Unsupported(
                f"computes in {value.dtype}, whose rounding the certificate's float slack does not cover"
            )
        if node.op == "call_module":
            self.lip[node] = self._module_call(node)
            return
        for pattern in _PRE_RULES:
            found = pattern(self, node)
            if found is not None:
                self.lip[node] = found
                return
        if isinstance(value, Tensor) and value.dtype == torch.bool:
            # A condition computed from the input (a comparison): not Lipschitz, and not refused here but
            # where it is used, by a pattern that proves its use continuous or by the rule that refuses it.
            self.lip[node] = CONDITION
            return
        rule = self._find_rule(node)
        if rule is None:
            raise Unsupported("no sound bound is known for this operation")
        self.lip[node] = rule(self, node)

    def _find_rule(self, node: Node) -> Rule | None:
        if node.op == "call_method":
            return _METHOD_RULES.get(str(node.target))
        if node.op == "call_function":
            rule = _FUNCTION_RULES.get(node.target)
            if rule is not None:
                return rule
            aten = aten_name(node.target)
            if aten is not None:
                return _ATEN_RULES.get(aten)
        return None

    def _is_metadata(self, node: Node) -> bool:
        if node.op == "call_method":
            return node.target in METADATA_METHODS
        if node.op == "call_function":
            if node.target is builtins.getattr:
                return node.args[1] in METADATA_ATTRS
            if node.target in METADATA_FUNCTIONS:
                return True
            return aten_name(node.target) in METADATA_ATEN
        return False

    def _check_random(self, node: Node) -> None:
        random = False
        if node.op == "call_function":
            if node.target in RANDOM_FUNCTIONS:
                random = True
            elif node.target in DROPOUT_FUNCTIONS:
                random = bool(self.value(arg(node, 2, "training", DROPOUT_FUNCTIONS[node.target])))
            else:
                aten = aten_name(node.target)
                if aten in RANDOM_ATEN or (
                    aten in ("dropout", "feature_dropout", "alpha_dropout")
                    and bool(self.value(arg(node, 2, "train", False)))
                ):
                    random = True
        elif node.op == "call_method":
            random = node.target in RANDOM_METHODS
        if random:
            raise Unsupported("is random (put the model in eval mode; random layers cannot be certified)")

    def _mutates(self, node: Node) -> bool:
        """Whether ``node`` works in place on its first argument."""
        if node.op == "call_method":
            name = str(node.target)
            return name.endswith("_") and not name.startswith("__")
        if node.op == "call_function":
            return (
                bool(node.kwargs.get("inplace", False))
                or node.target in INPLACE_OPERATORS
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
            raise Unsupported(
                f"works in place on the constant '{mutated.name}' (a weight or buffer): the model would "
                "change with every call"
            )
        later = [u for u in mutated.users if u is not node and self.order[u] > self.order[node]]
        if later:
            raise Unsupported(
                f"works in place on '{mutated.name}', which is read again afterwards by "
                f"{', '.join(u.name for u in later)}: the graph's values would not be the model's"
            )

    def _module_call(self, node: Node) -> float:
        module = self.modules[node.target]
        path = str(node.target)
        if len(node.args) != 1 or node.kwargs:
            raise Unsupported(
                "a bounded module called with more than one argument: its bound is for a map of one input"
            )
        x = node.args[0]
        if not isinstance(x, Node) or not isinstance(self.values[x], Tensor):
            raise Unsupported("a bounded module applied to something other than a tensor")
        if not has_bound(module):
            if path in self._reported:
                return math.inf
            raise Unsupported("has no registered bound")
        _check_hooks(module)
        shape = tuple(self.values[x].shape[1:])
        own = self.leaf_bound(module, shape)
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


def module_path(node: Node) -> str:
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
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    if any(not isinstance(h, (SpectralNorm, WeightNorm)) for h in hooks):
        raise Unsupported(
            "has forward hooks, which may change its output: remove them (or bound the model without them)"
        )
