"""The ONNX operations certify converts (:data:`OPS`), each as the torch operation with the same semantics.

Each entry ``OPS[op_type](builder, inputs, attributes)`` computes the ONNX operation on the example's
values through ``builder.call(torch_function, ...)``, which also writes it into the fx graph when
an input depends on the model input (see :mod:`certify.onnx`). An operation with attributes or
inputs outside what an entry covers raises ``Unsupported`` (the file is then refused, with every
such operation counted in one line). The entries follow the ONNX operator specification (opset 17;
the attributes of later opsets that torch's exporter does not write are refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from certify.graph.builder import Dyn, GraphBuilder, concrete, has_dyn
from certify.io import CheckpointError

__all__ = ["OPS", "OnnxError", "Unsupported"]


class OnnxError(CheckpointError):
    """An ONNX file certify cannot read as a graph it can bound (one line)."""


def _ints(v: Any) -> list[int]:
    return [int(x) for x in torch.as_tensor(concrete(v)).flatten().tolist()]


class Unsupported(Exception):
    pass


# -- the operations ------------------------------------------------------------------------------

Op = Callable[[GraphBuilder, list[Any], dict[str, Any]], Any]
OPS: dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def _attr(attrs: dict[str, Any], name: str, default: Any) -> Any:
    return attrs.get(name, default)


def _binary(fn: Callable[..., Any]) -> Op:
    return lambda b, i, a: b.call(fn, i[0], i[1])


_BINARY: dict[str, Callable[..., Any]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Greater": torch.gt,
    "Less": torch.lt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "Equal": torch.eq,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = _binary(_fn)


def _unary(fn: Callable[..., Any]) -> Op:
    return lambda b, i, a: b.call(fn, i[0])


_UNARY: dict[str, Callable[..., Any]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "Exp": torch.exp,
    "Log": torch.log,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Softsign": F.softsign,
    "Erf": torch.erf,
    "Reciprocal": torch.reciprocal,
}
for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


@_op("Identity", "Dropout")
def _identity(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return i[0]


@_op("Mod")
def _mod(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    fn = torch.fmod if _attr(a, "fmod", 0) else torch.remainder
    return b.call(fn, i[0], i[1])


@_op("Pow")
def _pow(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    exponent = i[1]
    if not has_dyn(exponent) and isinstance(exponent, Tensor) and exponent.numel() == 1:
        exponent = float(exponent.item())
    return b.call(torch.pow, i[0], exponent)


@_op("LeakyRelu")
def _leaky_relu(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return b.call(F.leaky_relu, i[0], float(_attr(a, "alpha", 0.01)))


@_op("Elu")
def _elu(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return b.call(F.elu, i[0], float(_attr(a, "alpha", 1.0)))


@_op("Softplus")
def _softplus(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return b.call(F.softplus, i[0])


@_op("HardSigmoid")
def _hard_sigmoid(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    alpha, beta = float(_attr(a, "alpha", 0.2)), float(_attr(a, "beta", 0.5))
    return b.call(torch.clamp, b.call(torch.add, b.call(torch.mul, i[0], alpha), beta), 0.0, 1.0)


OPS["Softmax"] = lambda b, i, a: b.call(torch.softmax, i[0], int(_attr(a, "axis", -1)))
OPS["LogSoftmax"] = lambda b, i, a: b.call(torch.log_softmax, i[0], int(_attr(a, "axis", -1)))


@_op("Clip")
def _clip(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    low = i[1] if len(i) > 1 else None
    high = i[2] if len(i) > 2 else None
    if has_dyn(low) or has_dyn(high):
        raise Unsupported("Clip with input-dependent bounds")
    low = None if low is None else float(torch.as_tensor(low).item())
    high = None if high is None else float(torch.as_tensor(high).item())
    if high is None and low is None:
        return i[0]
    if high is None:
        return b.call(torch.clamp_min, i[0], low)
    if low is None:
        return b.call(torch.clamp_max, i[0], high)
    return b.call(torch.clamp, i[0], low, high)


def _variadic(fn: Callable[..., Any]) -> Op:
    def run(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
        out = i[0]
        for other in i[1:]:
            out = b.call(fn, out, other)
        return out

    return run


OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)
OPS["Sum"] = _variadic(torch.add)


@_op("Where")
def _where(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return b.call(torch.where, i[0], i[1], i[2])


#: ONNX TensorProto element types and the torch dtypes they are.
_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


@_op("Cast")
def _cast(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    dtype = _DTYPES.get(int(a["to"]))
    if dtype is None:
        raise Unsupported(f"Cast to ONNX type {int(a['to'])}")
    return b.method("to", i[0], dtype)


@_op("Constant")
def _constant(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in a:
            return torch.as_tensor(a[key])
    raise Unsupported("Constant of an unsupported kind")


@_op("Shape")
def _shape(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    shape = list(concrete(i[0]).shape)
    start, end = int(_attr(a, "start", 0)), _attr(a, "end", None)
    return torch.tensor(shape[start : None if end is None else int(end)], dtype=torch.int64)


@_op("Size")
def _size(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return torch.tensor(concrete(i[0]).numel(), dtype=torch.int64)


@_op("ConstantOfShape")
def _constant_of_shape(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    value = a.get("value", torch.zeros(1))
    value = torch.as_tensor(value)
    return torch.full(_ints(i[0]), value.flatten()[0].item(), dtype=value.dtype)


@_op("Range")
def _range(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    start, limit, delta = (concrete(v) for v in i)
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=torch.as_tensor(start).dtype)


@_op("Reshape")
def _reshape(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    target = _ints(i[1])
    if not int(_attr(a, "allowzero", 0)):
        target = [int(concrete(x).shape[k]) if t == 0 else t for k, t in enumerate(target)]
    return b.call(torch.reshape, x, target)


@_op("Flatten")
def _flatten(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    axis = int(_attr(a, "axis", 1))
    shape = list(concrete(i[0]).shape)
    axis = axis + len(shape) if axis < 0 else axis
    if axis == 1:
        return b.call(torch.flatten, i[0], 1)
    return b.call(torch.reshape, i[0], [math.prod(shape[:axis]), math.prod(shape[axis:])])


@_op("Transpose")
def _transpose(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    ndim = concrete(i[0]).ndim
    perm = list(_attr(a, "perm", list(range(ndim))[::-1]))
    return b.call(torch.permute, i[0], perm)


def _axes(b: GraphBuilder, i: list[Any], a: dict[str, Any], index: int = 1) -> list[int] | None:
    if len(i) > index and i[index] is not None:
        return _ints(i[index])
    if "axes" in a:
        return [int(x) for x in a["axes"]]
    return None


@_op("Unsqueeze")
def _unsqueeze(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    axes = _axes(b, i, a) or []
    ndim = concrete(i[0]).ndim + len(axes)
    out = i[0]
    for axis in sorted(x + ndim if x < 0 else x for x in axes):
        out = b.call(torch.unsqueeze, out, axis)
    return out


@_op("Squeeze")
def _squeeze(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    axes = _axes(b, i, a)
    if axes is None:
        return b.call(torch.squeeze, i[0])
    ndim = concrete(i[0]).ndim
    return b.call(torch.squeeze, i[0], tuple(x + ndim if x < 0 else x for x in axes))


def _circular_pad(b: GraphBuilder, parts: list[Any], axis: int) -> Any | None:
    """``F.pad(x, circular)`` when ``parts`` are ``[x[n - l:], x, x[:r]]`` along ``axis`` (how torch's ONNX
    exporter writes a circular padding, one axis at a time), merged into a circular padding of ``x``
    that the graph already holds; else None."""
    if len(parts) != 3 or not all(isinstance(p, Dyn) for p in parts):
        return None
    head, x, tail = parts
    value = x.value
    ndim, n = value.ndim, value.shape[axis]
    if not (2 <= axis < ndim <= 5):
        return None

    def piece(p: Dyn, start: int) -> int | None:
        node = p.node
        ok = node.target is torch.narrow and node.args[0] is x.node and node.args[1:3] == (axis, start)
        length = node.args[3] if ok else None
        return length if isinstance(length, int) else None

    left = piece(head, n - head.value.shape[axis])
    right = piece(tail, 0)
    if left is None or right is None or left > n or right > n:
        return None
    pads = [0] * (2 * (ndim - 2))
    k = ndim - 1 - axis
    pads[2 * k], pads[2 * k + 1] = left, right
    source = x
    node = x.node
    if (
        node.target is F.pad
        and len(node.args) >= 3
        and node.args[2] == "circular"
        and len(node.args[1]) == len(pads)
    ):
        inner = list(node.args[1])
        if inner[2 * k] == inner[2 * k + 1] == 0:
            pads = [p + q for p, q in zip(pads, inner, strict=True)]
            source = Dyn(b.values[node.args[0]], node.args[0])
    return b.call(F.pad, source, pads, "circular")


@_op("Concat")
def _concat(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    parts = [
        p for p in i if not (isinstance(concrete(p), Tensor) and concrete(p).numel() == 0 and not has_dyn(p))
    ]
    ndim = concrete(parts[0]).ndim
    axis = int(a["axis"])
    axis = axis + ndim if axis < 0 else axis
    padded = _circular_pad(b, parts, axis)
    if padded is not None:
        return padded
    return b.call(torch.cat, list(parts), axis)


def split(b: GraphBuilder, i: list[Any], a: dict[str, Any], *, outputs: int = 0) -> Any:
    """ONNX Split: sizes from the second input or the ``split`` attribute, else ``outputs`` equal parts."""
    axis = int(_attr(a, "axis", 0))
    sizes = _ints(i[1]) if len(i) > 1 and i[1] is not None else a.get("split")
    if sizes is None:
        n = int(_attr(a, "num_outputs", outputs))
        length = concrete(i[0]).shape[axis]
        chunk = -(-length // n)
        sizes = [min(chunk, length - k * chunk) for k in range(n)]
    return b.call(torch.split, i[0], [int(s) for s in sizes], axis)


OPS["Split"] = split  # the converter passes the number of outputs of opset-18 files


@_op("Slice")
def _slice(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    shape = list(concrete(x).shape)
    starts, ends = _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis + len(shape) if axis < 0 else axis
        n = shape[axis]
        if step == 0:
            raise Unsupported("Slice with step 0")
        # ONNX clamps starts and ends (negative ones counted from the end) as Python's slices do
        indices = list(range(*slice(start, end, step).indices(n)))
        if indices == list(range(n)):
            continue
        if indices == list(range(n - 1, -1, -1)):
            out = b.call(torch.flip, out, [axis])
        elif step == 1 and indices:
            out = b.call(torch.narrow, out, axis, indices[0], len(indices))
        else:
            out = b.call(torch.index_select, out, axis, torch.tensor(indices, dtype=torch.long))
    return out


@_op("Gather")
def _gather(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x, index = i[0], i[1]
    if has_dyn(index):
        raise Unsupported("Gather with input-dependent indices")
    axis = int(_attr(a, "axis", 0))
    shape = list(concrete(x).shape)
    axis = axis + len(shape) if axis < 0 else axis
    idx = torch.as_tensor(index).long()
    idx = torch.where(idx < 0, idx + shape[axis], idx)
    if not has_dyn(x):
        return torch.index_select(concrete(x), axis, idx.flatten()).reshape(
            shape[:axis] + list(idx.shape) + shape[axis + 1 :]
        )
    if idx.ndim == 0:
        return b.call(torch.select, x, axis, int(idx.item()))
    picked = b.call(torch.index_select, x, axis, idx.flatten())
    if idx.ndim == 1:
        return picked
    return b.call(torch.reshape, picked, shape[:axis] + list(idx.shape) + shape[axis + 1 :])


@_op("Expand")
def _expand(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    target = torch.broadcast_shapes(tuple(concrete(i[0]).shape), tuple(_ints(i[1])))
    return b.call(torch.broadcast_to, i[0], list(target))


@_op("Tile")
def _tile(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return b.call(torch.tile, i[0], _ints(i[1]))


def _pads(a: dict[str, Any], spatial: int, kernel: list[int] | None = None, dilation: list[int] | None = None,
          strides: list[int] | None = None, shape: list[int] | None = None) -> list[int]:  # fmt: skip
    """ONNX pads ``[x1_begin, x2_begin, ..., x1_end, ...]`` of the spatial axes (auto_pad resolved)."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", ""):
        return [int(p) for p in a.get("pads", [0] * (2 * spatial))]
    if auto == "VALID":
        return [0] * (2 * spatial)
    if kernel is None or shape is None:
        raise Unsupported(f"auto_pad={auto}")
    begins, ends = [], []
    for k, d, s, n in zip(kernel, dilation or [1] * spatial, strides or [1] * spatial, shape, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX ``[b1, b2, ..., e1, e2, ...]`` as F.pad's ``[b_last, e_last, ..., b1, e1]``."""
    n = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(n)):
        out += [pads[axis], pads[n + axis]]
    return out


def _padded(b: GraphBuilder, x: Any, pads: list[int]) -> tuple[Any, int | tuple[int, ...]]:
    """``(input, symmetric padding)``: padding a convolution takes, or an explicit zero pad before it."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, tuple(pads[:n])
    return b.call(F.pad, x, _torch_pad(pads)), (0,) * n


@_op("Conv")
def _conv(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x, w = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    if has_dyn(w) or has_dyn(bias):
        raise Unsupported("Conv with input-dependent weights")
    spatial = concrete(w).ndim - 2
    if spatial not in (1, 2):
        raise Unsupported(f"Conv{spatial}d")
    kernel = list(_attr(a, "kernel_shape", list(concrete(w).shape[2:])))
    strides = list(_attr(a, "strides", [1] * spatial))
    dilations = list(_attr(a, "dilations", [1] * spatial))
    pads = _pads(a, spatial, kernel, dilations, strides, list(concrete(x).shape[2:]))
    x, padding = _padded(b, x, pads)
    conv = F.conv1d if spatial == 1 else F.conv2d
    return b.call(conv, x, w, bias, tuple(strides), padding, tuple(dilations), int(_attr(a, "group", 1)))


@_op("ConvTranspose")
def _conv_transpose(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x, w = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    if has_dyn(w) or has_dyn(bias):
        raise Unsupported("ConvTranspose with input-dependent weights")
    spatial = concrete(w).ndim - 2
    if spatial not in (1, 2) or "output_shape" in a:
        raise Unsupported("ConvTranspose with output_shape or more than 2 spatial axes")
    auto = a.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else str(auto)) not in ("NOTSET", ""):
        raise Unsupported("ConvTranspose with auto_pad")
    pads = [int(p) for p in a.get("pads", [0] * (2 * spatial))]
    if pads[:spatial] != pads[spatial:]:
        raise Unsupported("ConvTranspose with asymmetric pads")
    conv_t = F.conv_transpose1d if spatial == 1 else F.conv_transpose2d
    return b.call(
        conv_t,
        x,
        w,
        bias,
        tuple(_attr(a, "strides", [1] * spatial)),
        tuple(pads[:spatial]),
        tuple(_attr(a, "output_padding", [0] * spatial)),
        int(_attr(a, "group", 1)),
        tuple(_attr(a, "dilations", [1] * spatial)),
    )


@_op("Gemm")
def _gemm(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x, w = i[0], i[1]
    c = i[2] if len(i) > 2 else None
    alpha, beta = float(_attr(a, "alpha", 1.0)), float(_attr(a, "beta", 1.0))
    if int(_attr(a, "transA", 0)):
        x = b.call(torch.transpose, x, 0, 1)
    if not has_dyn(w) and (c is None or not has_dyn(c)) and alpha == 1.0 and beta == 1.0:
        weight = concrete(w) if int(_attr(a, "transB", 0)) else concrete(w).T.contiguous()
        bias = None if c is None else concrete(c)
        if bias is not None and bias.ndim > 1:  # a bias broadcast over rows as well
            out = b.call(F.linear, x, weight)
            return b.call(torch.add, out, bias)
        return b.call(F.linear, x, weight, bias)
    if int(_attr(a, "transB", 0)):
        w = b.call(torch.transpose, w, 0, 1)
    out = b.call(torch.matmul, x, w)
    if alpha != 1.0:
        out = b.call(torch.mul, out, alpha)
    if c is not None:
        out = b.call(torch.add, out, c if beta == 1.0 else b.call(torch.mul, c, beta))
    return out


@_op("MatMul")
def _matmul(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x, w = i
    if has_dyn(x) and not has_dyn(w) and isinstance(w, Tensor) and w.ndim == 2 and concrete(x).ndim >= 2:
        return b.call(F.linear, x, w.T.contiguous())  # x @ W, as a dense layer (what certify recognises)
    return b.call(torch.matmul, x, w)


@_op("BatchNormalization")
def _batch_norm(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    if int(_attr(a, "training_mode", 0)):
        raise Unsupported("BatchNormalization in training mode")
    x, scale, bias, mean, var = i[:5]
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, float(_attr(a, "epsilon", 1e-5)))


def _pool_common(a: dict[str, Any], x: Any) -> tuple[list[int], list[int], list[int], int]:
    kernel = [int(k) for k in a["kernel_shape"]]
    spatial = len(kernel)
    strides = [int(s) for s in _attr(a, "strides", [1] * spatial)]
    if any(int(d) != 1 for d in _attr(a, "dilations", [1] * spatial)):
        raise Unsupported("pooling with dilations")
    pads = _pads(a, spatial, kernel, None, strides, list(concrete(x).shape[2:]))
    return kernel, strides, pads, spatial


@_op("AveragePool")
def _avg_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    kernel, strides, pads, spatial = _pool_common(a, x)
    if spatial not in (1, 2):
        raise Unsupported(f"AveragePool over {spatial} axes")
    include = bool(int(_attr(a, "count_include_pad", 0)))
    ceil = bool(int(_attr(a, "ceil_mode", 0)))
    if pads[:spatial] != pads[spatial:]:
        if not include:
            raise Unsupported("AveragePool with asymmetric pads that are not counted")
        x, padding = b.call(F.pad, x, _torch_pad(pads)), (0,) * spatial
    else:
        padding = tuple(pads[:spatial])
    pool = F.avg_pool1d if spatial == 1 else F.avg_pool2d
    return b.call(pool, x, tuple(kernel), tuple(strides), padding, ceil, include)


@_op("MaxPool")
def _max_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    kernel, strides, pads, spatial = _pool_common(a, x)
    if spatial != 2 or pads[:2] != pads[2:] or int(_attr(a, "storage_order", 0)):
        raise Unsupported("MaxPool other than 2-D with symmetric pads")
    return b.call(
        F.max_pool2d,
        x,
        tuple(kernel),
        tuple(strides),
        tuple(pads[:2]),
        1,
        bool(int(_attr(a, "ceil_mode", 0))),
    )


@_op("LpPool")
def _lp_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    kernel, strides, pads, spatial = _pool_common(a, x)
    p = int(_attr(a, "p", 2))
    if spatial != 2 or p != 2 or int(_attr(a, "ceil_mode", 0)):
        raise Unsupported("LpPool other than 2-D with p = 2")
    if any(pads):
        x = b.call(F.pad, x, _torch_pad(pads))
    # (sum of squares over each window) ** 0.5, as onnxruntime computes it
    sums = b.call(torch.mul, b.call(F.avg_pool2d, b.call(torch.mul, x, x), tuple(kernel), tuple(strides)),
                  float(math.prod(kernel)))  # fmt: skip
    return b.call(torch.sqrt, sums)


@_op("GlobalAveragePool")
def _global_avg_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    dims = list(range(2, concrete(i[0]).ndim))
    return b.call(torch.mean, i[0], dims, True)


@_op("GlobalMaxPool")
def _global_max_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    dims = list(range(2, concrete(i[0]).ndim))
    return b.call(torch.amax, i[0], dims, True)


@_op("GlobalLpPool")
def _global_lp_pool(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    if int(_attr(a, "p", 2)) != 2:
        raise Unsupported("GlobalLpPool with p != 2")
    dims = list(range(2, concrete(i[0]).ndim))
    return b.call(torch.sqrt, b.call(torch.sum, b.call(torch.mul, i[0], i[0]), dims, True))


def _reduce(fn: Callable[..., Any]) -> Op:
    def run(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
        axes = _axes(b, i, a)
        keep = bool(int(_attr(a, "keepdims", 1)))
        if not axes:
            if int(_attr(a, "noop_with_empty_axes", 0)):
                return i[0]
            axes = list(range(concrete(i[0]).ndim))
        return b.call(fn, i[0], axes, keep)

    return run


OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceMax"] = _reduce(torch.amax)
OPS["ReduceMin"] = _reduce(torch.amin)


@_op("ReduceL2")
def _reduce_l2(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    squares = b.call(torch.mul, i[0], i[0])
    return b.call(torch.sqrt, _reduce(torch.sum)(b, [squares, *i[1:]], a))


@_op("ReduceSumSquare")
def _reduce_sum_square(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    return _reduce(torch.sum)(b, [b.call(torch.mul, i[0], i[0]), *i[1:]], a)


@_op("TopK")
def _topk(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    k = _ints(i[1])[0]
    return b.call(torch.topk, i[0], k, int(_attr(a, "axis", -1)), bool(int(_attr(a, "largest", 1))), True)


@_op("Pad")
def _pad(b: GraphBuilder, i: list[Any], a: dict[str, Any]) -> Any:
    x = i[0]
    ndim = concrete(x).ndim
    pads = _ints(i[1]) if len(i) > 1 else [int(p) for p in a["pads"]]
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(ndim))
    full = [0] * (2 * ndim)
    for k, axis in enumerate(axes):
        axis = axis + ndim if axis < 0 else axis
        full[axis], full[ndim + axis] = pads[k], pads[len(axes) + k]
    if any(p < 0 for p in full):
        raise Unsupported("Pad with negative pads")
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    value = 0.0
    if len(i) > 2 and i[2] is not None:
        if has_dyn(i[2]):
            raise Unsupported("Pad with an input-dependent value")
        value = float(torch.as_tensor(i[2]).flatten()[0].item()) if torch.as_tensor(i[2]).numel() else 0.0
    # F.pad pads trailing axes only: drop the leading pairs that are zero
    torch_pads = _torch_pad(full)
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise Unsupported(f"Pad mode {mode}")
    if mode == "constant":
        return b.call(F.pad, x, torch_pads, "constant", value)
    return b.call(F.pad, x, torch_pads, modes[mode])
