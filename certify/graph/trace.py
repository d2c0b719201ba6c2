"""Tracing a model into a ``torch.fx`` graph for bounding, and recording one pass through it.

:func:`trace` returns the graph: modules with a bound of their own or a registered bound
(:func:`certify.contract.has_bound`) are leaves, every other module is traced into, parameters and
buffers enter as constants (so computations on weights alone run eagerly), and a submodule that
cannot be traced becomes a leaf reported as a :class:`Problem`. A TorchScript model is converted to
an aten-level graph for the input shape at hand (:mod:`certify.graph.torchscript`). :class:`Recorder`
then runs the graph once on a batch of :data:`BATCH` inputs
(:func:`record_input`) and keeps every node's value, which the engine reads for shapes and
constants; :func:`same_output` compares the graph's output with the model's.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import Node

from certify.contract import Shape, UnboundableModuleError, has_bound
from certify.graph.torchscript import TorchScriptError, script_to_graph

__all__ = [
    "BATCH",
    "BoundTracer",
    "Problem",
    "Recorder",
    "UnsupportedOperationsError",
    "one_line",
    "record_input",
    "same_output",
    "trace",
]

#: Batch size of the recording pass: two samples, so that mixing samples can be detected.
BATCH = 2
#: An unsupported-operations error details this many problems, then names this many more, then counts.
_DETAILED, _NAMED = 3, 10


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
        # one line of bounded length: the first problems in full, the names of a few more, the count
        shown = problems[:_DETAILED]
        lines = "; ".join(f"({i}) {p}" for i, p in enumerate(shown, 1))
        more = problems[_DETAILED:]
        if more:
            names = ", ".join(f"'{p.node}' ({p.target})" for p in more[:_NAMED])
            rest = f" and {len(more) - _NAMED} more" if len(more) > _NAMED else ""
            lines += f"; also {names}{rest}"
        first = f", first {len(shown)}" if more else ""
        detail = (
            f"cannot bound the Lipschitz constant of {name}{where}: {len(problems)} unsupported "
            f"operation(s){first}: {lines}. To certify such a model, put the unsupported part in a module "
            "and "
            "give it a sound bound: a method lipschitz_bound(self, input_shape=None) -> float, or "
            "certify.register_bound(YourModule, fn) with fn(module, input_shape) -> float. "
            "certify never guesses a bound."
        )
        super().__init__(model, path, detail=detail)
        self.problems = problems


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
                reason=f"has no registered bound and cannot be traced ({one_line(err)})",
            )
            for path, err in forced.items()
        ]
        return gm, problems
    raise _untraceable(model, "", RuntimeError("tracing did not converge"))


def _convert_torchscript(model: torch.jit.ScriptModule, example: Tensor | None) -> fx.GraphModule:
    if example is None:
        raise ValueError("bounding a TorchScript model needs an example input batch")
    try:
        return script_to_graph(model, example)
    except TorchScriptError as err:
        raise UnboundableModuleError(model, detail=one_line(err)) from None


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
            f"cannot trace {where}{type(model).__qualname__} with torch.fx ({one_line(err)}). This usually "
            "means data-dependent control flow (an `if` or loop on tensor values or shapes). Give the "
            "module a bound of its own (lipschitz_bound(input_shape=None) or certify.register_bound) so "
            "that it is not traced into; certify does not fall back to anything it cannot prove."
        ),
    )


def one_line(err: BaseException) -> str:
    """An error as one line of at most 300 characters (for lists of problems)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------
# Recording


class Recorder(fx.Interpreter):
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


def record_input(model: nn.Module, input_shape: Shape, example: Tensor | None) -> Tensor:
    device, dtype = _model_ref(model)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand((BATCH, *input_shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if example is not None:
        if tuple(example.shape[1:]) != tuple(input_shape):
            raise ValueError(
                f"example inputs have shape {tuple(example.shape[1:])}, expected {tuple(input_shape)}"
            )
        k = min(BATCH, example.shape[0])
        x[:k] = example[:k].to(device=device, dtype=dtype)
    return x


def same_output(a: Any, b: Any) -> bool:
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
        return len(a) == len(b) and all(same_output(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b)
