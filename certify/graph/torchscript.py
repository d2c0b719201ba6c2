"""A TorchScript model as an aten-level ``torch.fx`` graph, specialised to one input shape.

:func:`script_to_graph` runs the model's inlined TorchScript graph once, node by node, on an
example batch, and writes every operation whose result depends on the input into a new fx graph
(calls of ``torch.ops.aten`` overloads), with the module path of the weights it reads in the
node's ``nn_module_stack`` (so that the audit's per-layer rows name the layers). Everything else
is computed on the spot: constants, attributes (weights enter the graph as constants, so a
weight computed from parameters by the model's own code is the weight it uses), shapes, and the
control flow, whose conditions may depend on the input's shape but not on its values: an ``if``
takes the branch its condition selects, a loop runs its trip count, and a scalar or a condition read
from the input's values (``x.item()``, ``bool(x.sum() > 0)``) is refused. The graph is therefore the
model on inputs of the example's shape (the analysis checks that it reproduces the model's output),
and the same operations must run for a batch of another size.

Operations that cannot be run this way are collected and refused together in one
:class:`TorchScriptError` whose message is one line that counts them and names the first few.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from certify.graph.builder import Dyn, GraphBuilder, concrete, has_dyn, summarise

__all__ = ["TorchScriptError", "script_to_graph"]


class TorchScriptError(ValueError):
    """A TorchScript model that cannot be run as a graph specialised to its input shape (one line)."""


#: aten operations on Python values (ints, floats, bools, strings, lists): run as Python.
def _format(fmt: str, *args: Any) -> str:
    out, i = "", 0
    for k, piece in enumerate(fmt.split("{}")):
        out += piece
        if k < fmt.count("{}"):
            out += str(args[i]) if i < len(args) else "{}"
            i += 1
    return out


_PYTHON_OPS: dict[str, Callable[..., Any]] = {
    "__getitem__": lambda seq, i: seq[i],
    "slice": lambda seq, start=None, end=None, step=1: seq[start:end:step],
    "extend": lambda seq, more: seq.extend(more),
    "insert": lambda seq, i, x: seq.insert(i, x),
    "pop": lambda seq, i=-1: seq.pop(i),
    "index": lambda seq, x: seq.index(x),
    "count": lambda seq, x: seq.count(x),
    "len": len,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "le": operator.le,
    "ge": operator.ge,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "floordiv": operator.floordiv,
    "remainder": lambda a, b: a % b,
    "neg": operator.neg,
    "__not__": operator.not_,
    "__and__": operator.and_,
    "__or__": operator.or_,
    "__xor__": operator.xor,
    "__is__": operator.is_,
    "__isnot__": operator.is_not,
    "__contains__": lambda seq, x: x in seq,
    "format": _format,
    "append": lambda seq, x: seq.append(x),
    "list": list,
    "Int": int,
    "Float": float,
    "Bool": bool,
    "str": str,
    "min": lambda *a: min(a) if len(a) > 1 else min(a[0]),
    "max": lambda *a: max(a) if len(a) > 1 else max(a[0]),
    "abs": abs,
    "sqrt": math.sqrt,
    "floor": math.floor,
    "ceil": math.ceil,
    "pow": operator.pow,
    "warn": lambda *a: None,
    "__range_length": lambda lo, hi, step: max(0, -(-(hi - lo) // step)),
    "__derive_index": lambda index, start, step: start + index * step,
}

#: aten operations that read only the shape, dtype or device of a tensor (constants for a given shape).
_METADATA = {"size", "dim", "numel", "len", "is_floating_point", "is_complex", "stride", "sym_size"}
#: aten operations that read a tensor's values into a Python scalar (data-dependent).
_DATA_SCALARS = {
    "Int",
    "Float",
    "Bool",
    "item",
    "is_nonzero",
    "ScalarImplicit",
    "IntImplicit",
    "FloatImplicit",
}


class _Converter(GraphBuilder):
    """Runs a TorchScript graph node by node on the example, writing the input-dependent aten calls."""

    def __init__(self, model: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.model = model
        self.paths = {
            id(m): (path, str(getattr(m, "original_name", type(m).__name__)))
            for path, m in model.named_modules()
        }
        self.owner: dict[int, tuple[str, str]] = {}  # id(tensor attribute) -> (module path, class name)
        self.names = {path: name for path, name in self.paths.values()}
        self.unsupported: list[str] = []
        self.data_dependent: list[str] = []

    def scope(self, node: Any) -> tuple[str, str] | None:
        """``(module path, class name)`` of a traced node (``torch.jit.trace`` records its scope as
        ``__module.a/__module.a.b``); scripted graphs have none, and their nodes are named by the module
        whose weights they read."""
        scope = node.scopeName().rpartition("/")[2]
        if not scope.startswith("__module"):
            return None
        path = scope.removeprefix("__module").removeprefix(".")
        return path, self.names.get(path, "")

    # -- running ------------------------------------------------------------------------------

    def run_block(self, nodes: Any, env: dict[Any, Any]) -> bool:
        """Run ``nodes``; False when a raise was reached (the model fails on this input)."""
        for node in nodes:
            if not self.run_node(node, env):
                return False
        return True

    def run_node(self, node: Any, env: dict[Any, Any]) -> bool:
        kind = node.kind()
        inputs = [env.get(i) for i in node.inputs()]
        outputs = list(node.outputs())
        if kind == "prim::Constant":
            env[outputs[0]] = outputs[0].toIValue()
        elif kind == "prim::GetAttr":
            obj = inputs[0]
            value = getattr(obj, node.s("name"))
            if isinstance(value, Tensor) and id(obj) in self.paths:
                self.owner[id(value)] = self.paths[id(obj)]
            env[outputs[0]] = value
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            env[outputs[0]] = list(inputs) if kind == "prim::ListConstruct" else tuple(inputs)
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            for k, out in enumerate(outputs):
                env[out] = self.item(inputs[0], k)
        elif kind == "prim::TupleIndex":
            env[outputs[0]] = self.item(inputs[0], int(concrete(inputs[1])))
        elif kind == "prim::unchecked_cast":
            env[outputs[0]] = inputs[0]
        elif kind == "aten::__getitem__" and isinstance(inputs[0], (list, tuple, Dyn)):
            env[outputs[0]] = self.item(inputs[0], int(concrete(inputs[1])))
        elif kind == "aten::len" and isinstance(inputs[0], (list, tuple)):
            env[outputs[0]] = len(inputs[0])
        elif kind == "prim::Uninitialized":
            env[outputs[0]] = None
        elif kind in ("prim::device", "prim::dtype", "prim::layout"):
            t = concrete(inputs[0])
            env[outputs[0]] = getattr(t, kind.split("::")[1])
        elif kind == "prim::isinstance" or kind == "aten::__isinstance__":
            env[outputs[0]] = True  # TorchScript refines types statically; the runtime check holds
        elif kind == "prim::If":
            cond = inputs[0]
            if has_dyn(cond):
                self.data_dependent.append("if on a value of the input")
                return False
            block = list(node.blocks())[0 if bool(cond) else 1]
            if not self.run_block(block.nodes(), env):
                return False
            for out, value in zip(outputs, block.outputs(), strict=True):
                env[out] = env[value]
        elif kind == "prim::Loop":
            return self.run_loop(node, inputs, outputs, env)
        elif kind == "prim::RaiseException":
            message = concrete(inputs[0]) if inputs else "an exception"
            raise TorchScriptError(
                f"the model raises on inputs of this shape: {' '.join(str(message).split())}"
            )
        elif kind in ("prim::CallMethod", "prim::CallFunction"):
            self.unsupported.append(kind)
            return False
        elif kind.startswith("aten::") or kind.startswith("prim::"):
            result = self.run_op(node, inputs)
            if result is _FAILED:
                return False
            if len(outputs) == 1:
                env[outputs[0]] = result
            else:
                for k, out in enumerate(outputs):
                    env[out] = self.item(result, k)
        else:
            self.unsupported.append(kind)
            return False
        return True

    def run_loop(self, node: Any, inputs: list[Any], outputs: list[Any], env: dict[Any, Any]) -> bool:
        trips, cond, carried = inputs[0], inputs[1], list(inputs[2:])
        if has_dyn(trips) or has_dyn(cond):
            self.data_dependent.append("loop bound read from the input's values")
            return False
        body = next(iter(node.blocks()))
        params = list(body.inputs())
        i = 0
        while bool(cond) and i < int(trips):
            env[params[0]] = i
            for p, v in zip(params[1:], carried, strict=True):
                env[p] = v
            if not self.run_block(body.nodes(), env):
                return False
            results = [env[v] for v in body.outputs()]
            cond, carried = results[0], results[1:]
            if has_dyn(cond):
                self.data_dependent.append("loop condition read from the input's values")
                return False
            i += 1
        for out, value in zip(outputs, carried, strict=True):
            env[out] = value
        return True

    def run_op(self, node: Any, inputs: list[Any]) -> Any:
        kind = node.kind()
        name = kind.split("::", 1)[1]
        tensors = any(isinstance(concrete(v), Tensor) or _is_tensor_list(concrete(v)) for v in inputs)
        if name in _METADATA and tensors:
            op = _overload(node)
            return op(*concrete(inputs)) if op is not None else _PYTHON_OPS.get(name, len)(*concrete(inputs))
        if name in _DATA_SCALARS and has_dyn(inputs):
            self.data_dependent.append(kind)
            return _FAILED
        if not tensors and kind.startswith("aten::") and name in _PYTHON_OPS:
            return _PYTHON_OPS[name](*concrete(inputs))
        if kind.startswith("prim::"):
            if name in ("NumToTensor",) and not has_dyn(inputs):
                return torch.tensor(concrete(inputs[0]))
            if name in ("min", "max", "abs") and not tensors:
                return _PYTHON_OPS[name](*concrete(inputs))
            self.unsupported.append(kind)
            return _FAILED
        op = _overload(node)
        if op is None:
            self.unsupported.append(kind)
            return _FAILED
        args, kwargs = _split_arguments(op, inputs)
        try:
            value = op(*concrete(args), **concrete(kwargs))
        except Exception as err:  # the op refuses its arguments: the model itself would fail
            raise TorchScriptError(
                f"{kind} fails on inputs of this shape: {' '.join(str(err).split())[:200]}"
            ) from None
        if not has_dyn(inputs):
            return value
        result = self.write(op, args, kwargs, value)
        owner = self.scope(node) or next(
            (self.owner[id(v)] for v in concrete(inputs) if isinstance(v, Tensor) and id(v) in self.owner),
            None,
        )
        if owner is not None:
            result.node.meta["nn_module_stack"] = {owner[0]: owner}
        return result


_FAILED = object()


def _is_tensor_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and any(isinstance(x, Tensor) for x in v)


def _overload(node: Any) -> Any:
    """The ``torch.ops.aten`` overload a TorchScript node calls, from its schema (None if unknown)."""
    try:
        schema = node.schema()
    except RuntimeError:
        return None
    if not schema or schema == "(no schema)":
        return None
    qualified = schema.split("(", 1)[0]
    namespace, _, rest = qualified.partition("::")
    name, _, overload = rest.partition(".")
    packet = getattr(getattr(torch.ops, namespace, None), name, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


def _split_arguments(op: Any, inputs: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword-only arguments of ``op`` (TorchScript passes all of them in order)."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for spec, value in zip(op._schema.arguments, inputs, strict=False):
        if spec.kwarg_only:
            kwargs[spec.name] = value
        else:
            args.append(value)
    return args, kwargs


def _run(model: torch.jit.ScriptModule, example: Tensor) -> fx.GraphModule:
    conv = _Converter(model)
    graph = model.inlined_graph
    params = list(graph.inputs())
    if len(params) != 2:
        raise TorchScriptError(
            f"the TorchScript model's forward takes {len(params) - 1} inputs: certify bounds maps of one "
            "input tensor"
        )
    placeholder = conv.graph.placeholder("input")
    env: dict[Any, Any] = {params[0]: model, params[1]: Dyn(example, placeholder)}
    with torch.no_grad():
        finished = conv.run_block(graph.nodes(), env)
    if conv.unsupported:
        raise TorchScriptError(
            f"the TorchScript model uses {summarise(conv.unsupported, 'operation')} that certify cannot run "
            "as a graph; audit its weights with its architecture (--arch) instead"
        )
    if conv.data_dependent or not finished:
        raise TorchScriptError(
            "the TorchScript model's control flow or scalars depend on its input's values "
            f"({summarise(conv.data_dependent or ['unknown'], 'place')}): it cannot be bounded as one graph"
        )
    result = env[list(graph.outputs())[0]]
    if not isinstance(result, Dyn):
        raise TorchScriptError("the TorchScript model's output does not depend on its input")
    conv.graph.output(result.node)
    return fx.GraphModule(
        conv.root, conv.graph, class_name=f"TorchScript_{getattr(model, 'original_name', 'Module')}"
    )


def _same_program(a: fx.GraphModule, b: fx.GraphModule, sizes: tuple[int, int]) -> bool:
    """Whether two conversions for batch sizes ``sizes`` run the same operations with the same constants,
    up to integers that scale with the batch size (a reshape to ``(batch, -1)``, say)."""
    a_nodes, b_nodes = list(a.graph.nodes), list(b.graph.nodes)
    if len(a_nodes) != len(b_nodes):
        return False
    a_index = {n: i for i, n in enumerate(a_nodes)}
    b_index = {n: i for i, n in enumerate(b_nodes)}

    def same(u: Any, v: Any) -> bool:
        if isinstance(u, fx.Node) and isinstance(v, fx.Node):
            return a_index[u] == b_index[v]
        if isinstance(u, (list, tuple)) and isinstance(v, (list, tuple)):
            return len(u) == len(v) and all(same(x, y) for x, y in zip(u, v, strict=True))
        if isinstance(u, int) and isinstance(v, int) and not isinstance(u, bool) and u != v:
            return u * sizes[1] == v * sizes[0]
        return type(u) is type(v) and u == v

    for m, n in zip(a_nodes, b_nodes, strict=True):
        if (
            m.op != n.op
            or m.target != n.target
            or not same(m.args, n.args)
            or m.kwargs.keys() != n.kwargs.keys()
        ):
            return False
        if not all(same(m.kwargs[k], n.kwargs[k]) for k in m.kwargs):
            return False
        if m.op == "get_attr":
            # weights the model computes on each call (power iterations, Björck steps) repeat up to
            # float rounding, not bit for bit: a batch-dependent constant differs by far more
            t, u = getattr(a, str(m.target)), getattr(b, str(n.target))
            if t.shape != u.shape or t.dtype != u.dtype:
                return False
            scale = float(t.abs().max()) if t.numel() and t.is_floating_point() else 0.0
            if not torch.allclose(t, u, rtol=1e-5, atol=1e-5 * scale):
                return False
    return True


def script_to_graph(model: torch.jit.ScriptModule, example: Tensor) -> fx.GraphModule:
    """The graph of ``model`` on inputs of ``example``'s shape (see the module docstring).

    The model is also run on a batch of one more sample: a model whose operations change with the
    batch size (control flow on ``x.shape[0]``) computes another map on the batches it certifies
    than on the example, and is refused.

    Raises :class:`TorchScriptError` (one line) when the model calls something that cannot be run
    node by node here, reads control flow or scalars from its input's values or its batch size, or
    fails on the example.
    """
    graph = _run(model, example)
    other = _run(model, torch.cat([example, example[:1]]))
    sizes = (example.shape[0], example.shape[0] + 1)
    if not _same_program(graph, other, sizes):
        raise TorchScriptError(
            "the TorchScript model computes otherwise for other batch sizes (control flow or constants "
            "that depend on the batch size): it cannot be bounded as one per-sample map"
        )
    return graph
