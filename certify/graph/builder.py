"""Building an fx graph by running a model of another format once, on an example batch.

The TorchScript converter (:mod:`certify.graph.torchscript`) and the ONNX converter
(:mod:`certify.onnx`) both run their model operation by operation on an example and keep two kinds of
values apart: a :class:`Dyn` depends on the model input (its value on the example and the fx node
that computes it), everything else (weights, shapes, Python scalars) is a plain value computed on the
spot. :class:`GraphBuilder` holds the graph they write: a plain tensor an operation reads enters it as
a constant buffer (one per tensor object), and an operation enters it only when one of its arguments
is a :class:`Dyn`. :func:`summarise` words the list of operations a converter refuses on one line.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

__all__ = ["Dyn", "GraphBuilder", "concrete", "has_dyn", "summarise"]


@dataclass
class Dyn:
    """A value that depends on the model input: its value on the example and its fx node."""

    value: Any
    node: fx.Node


def concrete(v: Any) -> Any:
    """``v`` with every :class:`Dyn` replaced by its example value (lists and tuples keep their type)."""
    if isinstance(v, Dyn):
        return v.value
    if isinstance(v, (list, tuple)):
        return type(v)(concrete(x) for x in v)
    return v


def has_dyn(v: Any) -> bool:
    """Whether ``v`` is, or a list or tuple in it holds, a :class:`Dyn`."""
    return isinstance(v, Dyn) or (isinstance(v, (list, tuple)) and any(has_dyn(x) for x in v))


def summarise(items: Sequence[str], what: str, shown: int = 3) -> str:
    """``"17 unsupported ops, first 3: a, b, c"`` (``"1 unsupported op: a"``): long lists on one short line.

    Repeated items are counted once, with their number (``aten::foo (x4)``).
    """
    counts = Counter(items)
    names = [f"{k} (x{n})" if n > 1 else k for k, n in counts.items()]
    total = len(names)
    plural = what if total == 1 else what + "s"
    if total <= shown:
        return f"{total} {plural}: {', '.join(names)}"
    return f"{total} {plural}, first {shown}: {', '.join(names[:shown])}"


class GraphBuilder:
    """The fx graph a converter writes, its constants (buffers of :attr:`root`) and the example's value
    of every node written (:attr:`values`)."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.constants: dict[int, str] = {}  # id(tensor) -> buffer name: one buffer per tensor object
        self.values: dict[fx.Node, Any] = {}

    def const(self, t: Tensor) -> fx.Node:
        """A ``get_attr`` node that reads the plain tensor ``t`` (registered as a buffer once)."""
        name = self.constants.get(id(t))
        if name is None:
            name = f"_c{len(self.constants)}"
            self.constants[id(t)] = name
            self.root.register_buffer(name, t)
        return self.graph.get_attr(name)

    def arg(self, v: Any) -> Any:
        """``v`` as an fx argument: a :class:`Dyn` by its node, a plain tensor by a constant node."""
        if isinstance(v, Dyn):
            return v.node
        if isinstance(v, Tensor):
            return self.const(v)
        if isinstance(v, (list, tuple)):
            return type(v)(self.arg(x) for x in v)
        return v

    def write(self, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], value: Any) -> Dyn:
        """The node ``fn(*args, **kwargs)`` written into the graph; ``value`` is its result on the example."""
        node = self.graph.call_function(
            fn, tuple(self.arg(a) for a in args), {k: self.arg(v) for k, v in kwargs.items()}
        )
        self.values[node] = value
        return Dyn(value, node)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the example; an fx node too when an argument depends on the input."""
        value = fn(*concrete(args), **{k: concrete(v) for k, v in kwargs.items()})
        if not (has_dyn(args) or has_dyn(list(kwargs.values()))):
            return value
        return self.write(fn, args, kwargs, value)

    def method(self, name: str, x: Any, *args: Any) -> Any:
        """``x.name(*args)`` on the example; an fx node too when ``x`` depends on the input."""
        value = getattr(concrete(x), name)(*concrete(args))
        if not has_dyn(x):
            return value
        node = self.graph.call_method(name, (self.arg(x), *self.arg(args)))
        self.values[node] = value
        return Dyn(value, node)

    def item(self, v: Any, k: int) -> Any:
        """``v[k]``; for a :class:`Dyn`, a ``getitem`` node that keeps the container node's metadata."""
        if isinstance(v, Dyn):
            node = self.graph.call_function(operator.getitem, (v.node, k))
            node.meta.update(v.node.meta)
            self.values[node] = v.value[k]
            return Dyn(v.value[k], node)
        return v[k]
