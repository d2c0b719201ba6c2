"""Sound Lipschitz bounds of arbitrary models, along their ``torch.fx`` graph: the entry points.

:func:`analyze` traces a model (:func:`certify.graph.trace.trace`: modules with a bound of their
own or a registered bound are leaves; every other module is traced into), runs the traced graph
once on a batch of the given input shape to record each node's value and shape, and then bounds,
in topological order, each node's output with respect to the model input
(:class:`certify.graph.engine.Analysis`, with the per-op rules of :mod:`certify.graph.rules`):

* the input has bound 1; a node that does not depend on the input (weights, buffers, shapes,
  ``zeros_like``) is a constant, with bound 0;
* a leaf module call: (its bound for the recorded input shape) x (bound of its input). A
  BatchNorm whose input is a ``Conv1d``/``Conv2d``/``Linear`` output used by nothing else is
  folded into that layer (:mod:`certify.rules.folding`), which is tighter than the product;
* every other call: the rule registered for it (sums, products with constants, linear maps,
  copies, activations, pooling; see :mod:`certify.graph.rules`).

The traced graph is checked against the model (same output on the recorded batch) and the model
is checked not to mix samples of a batch. Products or quotients of two input-dependent tensors
(``x * x``, attention), data-dependent indexing, random operations, and anything not listed raise
**one** :class:`~certify.graph.trace.UnsupportedOperationsError` that lists every such node (name,
target, module path) and says how to register a bound. Nothing is guessed. When the model ends in
a linear layer on per-sample features, :class:`GraphAnalysis` also gives that layer's weight and
the bound of the body: the last-layer certificate of :func:`certify.radius.certified_radius`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import Node

from certify.contract import Shape, is_plain
from certify.graph import patterns as _patterns  # noqa: F401  (registers the op-pattern rules)
from certify.graph import rules as _rules  # noqa: F401  (registers every per-op rule)
from certify.graph.engine import Analysis, LayerBound, module_path
from certify.graph.ops import aten_name
from certify.graph.trace import (
    BATCH,
    Recorder,
    UnsupportedOperationsError,
    one_line,
    record_input,
    same_output,
    trace,
)

__all__ = ["GraphAnalysis", "analyze", "graph_bound"]


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
# Entry points


def _head(an: Analysis, out: Node) -> tuple[Tensor, float, str] | None:
    """``(W, Lip(g), path)`` when the output is ``W g(x) + b`` on per-sample feature vectors."""
    value = an.values[out]
    if not (isinstance(value, Tensor) and value.ndim == 2):
        return None
    if out.op == "call_module":
        module = an.modules[out.target]
        if is_plain(module, nn.Linear) and len(out.args) == 1:
            return cast(nn.Linear, module).weight.detach(), an.L(out.args[0]), str(out.target)
        return None
    if out.op == "call_function" and (out.target is F.linear or aten_name(out.target) == "linear"):
        if an.is_dyn(out.args[1]) or (len(out.args) > 2 and an.is_dyn(out.args[2])):
            return None
        return an.value(out.args[1]).detach(), an.L(out.args[0]), module_path(out) or out.name
    if out.op == "call_function" and aten_name(out.target) == "addmm":
        if an.is_dyn(out.args[0]) or an.is_dyn(out.args[2]) or out.kwargs:
            return None
        return an.value(out.args[2]).detach().T, an.L(out.args[1]), module_path(out) or out.name
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
        x = record_input(model, shape, example)
        gm, problems = trace(model, x)
        recorder = Recorder(gm)
        with torch.no_grad():
            try:
                traced_out = recorder.run(x.clone())
                real_out = model(x.clone())
            except Exception as err:
                raise ValueError(
                    f"the model does not accept inputs of shape {shape}: {one_line(err)}"
                ) from err
        # Bound first: an unsupported operation (a random one, say) explains a mismatch below.
        an = Analysis(model, gm, recorder.values, fold_batchnorm, problems, layer_value)
        bound = an.run()
        with torch.no_grad():
            if not same_output(traced_out, real_out):
                raise ValueError(
                    "the traced graph of the model does not reproduce its output (data-dependent behaviour "
                    "that torch.fx cannot see): give the model a bound of its own or register one"
                )
            if isinstance(real_out, Tensor) and real_out.shape[:1] == (BATCH,):
                other = x.clone()
                other[1] = 1.0 - other[1]
                if not same_output(model(other)[:1], real_out[:1]):
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
