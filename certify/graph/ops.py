"""Tables of torch operations for the graph analysis, and the helpers that read a node's call.

Which calls are random (refused), which only read shapes or dtypes (constants for a given input
shape), which work in place, which are pure copies or otherwise factor-1 maps: the engine
(:mod:`certify.graph.engine`) and the per-op rules (:mod:`certify.graph.rules`) look them up here.
A call is found by its Python function (``F.relu``), its tensor method name (``"relu"``) or, in a
TorchScript graph converted to aten, its aten operator name (``aten_name``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.node import Argument, Node

__all__ = [
    "COPY_ATEN",
    "COPY_FUNCTIONS",
    "COPY_METHODS",
    "DROPOUT_FUNCTIONS",
    "INPLACE_OPERATORS",
    "LOW_PRECISION",
    "METADATA_ATEN",
    "METADATA_ATTRS",
    "METADATA_FUNCTIONS",
    "METADATA_METHODS",
    "MISSING",
    "RANDOM_ATEN",
    "RANDOM_FUNCTIONS",
    "RANDOM_METHODS",
    "SELECTION_ATEN",
    "SELECTION_FUNCTIONS",
    "SELECTION_METHODS",
    "SHAPE_ONLY_SECOND",
    "Unsupported",
    "UnsupportedValue",
    "arg",
    "aten_name",
    "target_name",
]

#: Dtypes whose rounding the certificate's float slack does not cover.
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Default of :func:`arg`: the argument is required.
MISSING = object()


class Unsupported(Exception):
    """Raised by a rule: the node cannot be bounded (the message says why)."""


class UnsupportedValue(Unsupported):
    """Raised where a value that has no bound is used (a square, a condition): the problem is that value's
    node, ``node``, which is reported once however many operations use it."""

    def __init__(self, node: Node, reason: str) -> None:
        super().__init__(reason)
        self.node = node


def arg(node: Node, index: int, name: str, default: Any = MISSING) -> Argument:
    """Argument ``index`` (or keyword ``name``) of the call ``node``, else ``default`` (if not required)."""
    if len(node.args) > index:
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is MISSING:
        raise Unsupported(f"argument '{name}' is missing")
    return default


def aten_name(target: Any) -> str | None:
    """The aten operator name of a call target (``"relu"`` for ``aten.relu.default``), else None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket) and getattr(
        target, "_qualified_op_name", ""
    ).startswith("aten::"):
        return target.__name__
    return None


def target_name(node: Node) -> str:
    """A readable name of what ``node`` calls, for error messages."""
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


RANDOM_FUNCTIONS = {
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
RANDOM_METHODS = {
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
RANDOM_ATEN = {
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
DROPOUT_FUNCTIONS = {
    F.dropout: True,
    F.dropout1d: True,
    F.dropout2d: True,
    F.dropout3d: True,
    F.alpha_dropout: False,
    F.feature_alpha_dropout: False,
}
#: Methods whose second argument only lends its shape or dtype (``x.view_as(y)``): its values do not flow.
SHAPE_ONLY_SECOND = {"expand_as", "view_as", "reshape_as", "type_as"}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}

#: Calls whose result depends on the input's shape, dtype or device only (constants per input shape).
METADATA_METHODS = {
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
METADATA_FUNCTIONS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.numel,
    torch.is_floating_point,
    torch.is_tensor,
}
METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
METADATA_ATEN = {
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


# ---------------------------------------------------------------------------------------------
# Factor-1 maps and copies (bounded by the rules of certify.graph.rules; activations are in the
# one table of certify.rules.activations)

#: Maps whose bound is 1: reshapes, permutations, copies, dtype/device moves, and per-fibre
#: 1-Lipschitz reductions (max/min over dims: ``|max a - max b| <= max |a - b|``; logsumexp: its
#: gradient is a probability vector).
COPY_FUNCTIONS: tuple[Any, ...] = (
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
    F.pixel_shuffle,
    F.pixel_unshuffle,
    torch.amax,
    torch.amin,
    torch.logsumexp,
)
COPY_METHODS: tuple[str, ...] = (
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
    "amax",
    "amin",
    "logsumexp",
    "view_as",
    "reshape_as",
    "cpu",
    "cuda",
)
COPY_ATEN: tuple[str, ...] = (
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
    "amax",
    "amin",
    "logsumexp",
    "pixel_shuffle",
    "pixel_unshuffle",
    "lift_fresh_copy",
    "_reshape_alias",
    "squeeze_copy",
    "unsqueeze_copy",
    "view_copy",
    "permute_copy",
    "t_copy",
    "transpose_copy",
)

#: Maps that copy entries of their one input (each output entry is one input entry, or a zero):
#: bounded by ``sqrt(max copies of one entry)`` (``certify.graph.rules._selection``).
SELECTION_FUNCTIONS: tuple[Any, ...] = (
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
)
SELECTION_METHODS: tuple[str, ...] = (
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
)
SELECTION_ATEN: tuple[str, ...] = (
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
)
