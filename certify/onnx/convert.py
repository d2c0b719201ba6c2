"""Reading an ONNX file into a ``torch.fx`` graph (:func:`onnx_to_graph`), checked against onnxruntime.

See :mod:`certify.onnx` for what the conversion guarantees.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from certify.graph.builder import Dyn, GraphBuilder, summarise
from certify.onnx.ops import OPS, OnnxError, Unsupported, split

__all__ = ["onnx_input_shape", "onnx_to_graph", "run_onnxruntime"]

#: The two batch sizes the graph is converted for (see the module docstring): odd primes, so that a
#: batch-dependent constant is told apart from a shape that happens to equal the batch size.
_BATCHES = (3, 5)


# -- reading the file ----------------------------------------------------------------------------


def _load(data: bytes | str | Path) -> Any:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise OnnxError("reading ONNX files needs the onnx extra: pip install 'lipnet[onnx]'") from None
    try:
        model = onnx.load_from_string(data) if isinstance(data, bytes) else onnx.load(str(data))
        onnx.checker.check_model(model)
    except Exception as err:
        raise OnnxError(
            f"not a valid ONNX model (truncated or corrupted?): {' '.join(str(err).split())[:200]}"
        ) from None
    return model, onnx, numpy_helper


def onnx_input_shape(data: bytes | str | Path) -> tuple[int, ...] | None:
    """The per-sample input shape an ONNX file declares (None when a non-batch axis is symbolic)."""
    model, _, _ = _load(data)
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxError(f"the ONNX model takes {len(inputs)} inputs: certify bounds maps of one input tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    sizes = [int(d.dim_value) if d.HasField("dim_value") else None for d in dims][1:]
    known = [s for s in sizes if s is not None]
    return tuple(known) if sizes and len(known) == len(sizes) else None


def _graph_inputs(model: Any) -> list[Any]:
    initialised = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initialised]


def _convert(model: Any, onnx: Any, numpy_helper: Any, example: Tensor) -> tuple[fx.GraphModule, list[str]]:
    from onnx import helper

    builder = GraphBuilder()
    env: dict[str, Any] = {"": None}
    for t in model.graph.initializer:
        env[t.name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxError(f"the ONNX model takes {len(inputs)} inputs: certify bounds maps of one input tensor")
    placeholder = builder.graph.placeholder("input")
    builder.values[placeholder] = example
    env[inputs[0].name] = Dyn(example, placeholder)
    unsupported: list[str] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            unsupported.append(f"{node.domain}.{node.op_type}")
            continue
        fn = OPS.get(node.op_type)
        if fn is None:
            unsupported.append(node.op_type)
            continue
        attrs = {}
        for at in node.attribute:
            value = helper.get_attribute_value(at)
            attrs[at.name] = (
                torch.from_numpy(numpy_helper.to_array(value).copy()) if hasattr(value, "dims") else value
            )
        args = [env[name] for name in node.input]
        try:
            if node.op_type == "Split":
                result = split(builder, args, attrs, outputs=len(node.output))
            else:
                result = fn(builder, args, attrs)
        except Unsupported as why:
            unsupported.append(f"{node.op_type} ({why})")
            continue
        except KeyError as err:
            raise OnnxError(f"ONNX node {node.name or node.op_type} reads an unknown value {err}") from None
        if len(node.output) == 1:
            env[node.output[0]] = result
        else:
            for k, name in enumerate(node.output):
                if name:
                    env[name] = builder.item(result, k)
    if unsupported:
        return fx.GraphModule(builder.root, fx.Graph()), unsupported
    outputs = list(model.graph.output)
    if len(outputs) != 1:
        raise OnnxError(f"the ONNX model has {len(outputs)} outputs: certify bounds models with one output")
    result = env[outputs[0].name]
    if not isinstance(result, Dyn):
        raise OnnxError("the ONNX model's output does not depend on its input")
    builder.graph.output(result.node)
    return fx.GraphModule(builder.root, builder.graph, class_name="OnnxGraph"), []


def _batch_polymorphic(
    first: fx.GraphModule, second: fx.GraphModule, sizes: tuple[int, int]
) -> fx.GraphModule:
    """``first`` with every constant argument that differs in ``second`` as a multiple of the batch size."""
    a_nodes, b_nodes = list(first.graph.nodes), list(second.graph.nodes)
    if len(a_nodes) != len(b_nodes):
        raise OnnxError("the ONNX graph's operations depend on the batch size")
    placeholder = next(n for n in a_nodes if n.op == "placeholder")
    batch: fx.Node | None = None

    def symbolic(u: Any, v: Any) -> Any:
        nonlocal batch
        if isinstance(u, fx.Node) or u == v:
            return u
        if isinstance(u, (list, tuple)) and isinstance(v, (list, tuple)) and len(u) == len(v):
            return type(u)(symbolic(x, y) for x, y in zip(u, v, strict=True))
        if isinstance(u, int) and isinstance(v, int) and u * sizes[1] == v * sizes[0] and u % sizes[0] == 0:
            if batch is None:
                with first.graph.inserting_after(placeholder):
                    batch = first.graph.call_function(torch.ops.aten.sym_size.int, (placeholder, 0))
            factor = u // sizes[0]
            if factor == 1:
                return batch
            with first.graph.inserting_after(batch):
                return first.graph.call_function(operator.mul, (batch, factor))
        raise OnnxError(f"the ONNX graph holds a constant that depends on the batch size ({u!r} vs {v!r})")

    for a, b in zip(a_nodes, b_nodes, strict=True):
        if a.op != b.op or a.target != b.target:
            raise OnnxError("the ONNX graph's operations depend on the batch size")
        if a.op == "get_attr":
            ta, tb = getattr(first, str(a.target)), getattr(second, str(b.target))
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                raise OnnxError("the ONNX graph holds a constant tensor that depends on the batch size")
            continue
        a.args = symbolic(a.args, b.args)
        a.kwargs = {k: symbolic(v, b.kwargs[k]) for k, v in a.kwargs.items()}
    first.recompile()
    return first


def run_onnxruntime(data: bytes | str | Path, x: Tensor) -> Tensor:
    """The file's output on ``x`` as onnxruntime (CPU) computes it."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxError("checking an ONNX file needs onnxruntime: pip install 'lipnet[onnx]'") from None
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})
    except Exception as err:  # onnxruntime's own errors (its pybind classes): the file fails on x
        raise OnnxError(
            f"onnxruntime cannot run the file on inputs of shape {tuple(x.shape)}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from None
    return torch.from_numpy(out)


def onnx_to_graph(data: bytes | str | Path, example: Tensor, *, probes: int = 4) -> fx.GraphModule:
    """The ONNX model ``data`` (bytes or a path) as an fx graph of torch operations (module docstring).

    ``example`` is a batch of inputs of the per-sample shape to convert for. Raises :class:`OnnxError`
    (a :class:`~certify.io.CheckpointError`, one line) for a file that is not ONNX, that uses
    operations the table does not cover (all of them counted in the message), or whose graph does
    not reproduce onnxruntime's outputs on the example and ``probes`` random batches.
    """
    model, onnx, numpy_helper = _load(data)
    inputs = _graph_inputs(model)
    batch = inputs[0].type.tensor_type.shape.dim[:1] if len(inputs) == 1 else []
    if batch and batch[0].HasField("dim_value"):
        raise OnnxError(
            f"the ONNX model was exported for batches of exactly {batch[0].dim_value} inputs: certify runs "
            "it on batches of other sizes; export it with a dynamic batch axis (torch.onnx.export(..., "
            "dynamic_axes={'input': {0: 'batch'}}), as lipnet export does)"
        )
    sample = example[:1].detach().float().cpu()
    graphs = []
    for size in _BATCHES:
        x = sample.expand(size, *sample.shape[1:]).clone()
        gm, unsupported = _convert(model, onnx, numpy_helper, x)
        if unsupported:
            raise OnnxError(
                f"the ONNX model uses {summarise(unsupported, 'unsupported operation')}; certify converts "
                f"{len(OPS)} ONNX operations (certify.onnx.OPS)"
            )
        graphs.append(gm)
    graph = _batch_polymorphic(graphs[0], graphs[1], _BATCHES)
    gen = torch.Generator().manual_seed(0)
    checks = [example.detach().float().cpu()] + [
        torch.rand((3, *sample.shape[1:]), generator=gen) for _ in range(probes)
    ]
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    worst = 0.0
    with torch.no_grad():
        for x in checks:
            want = run_onnxruntime(raw, x).double()
            got = graph(x).double()
            if got.shape != want.shape:
                raise OnnxError("the converted ONNX graph returns another shape than onnxruntime")
            scale = float(want.abs().max()) if want.numel() else 0.0
            diff = float((got - want).abs().max()) if want.numel() else 0.0
            worst = max(worst, diff)
            if not diff <= 1e-4 * scale + 1e-5 * max(scale, 1e-12):
                raise OnnxError(
                    f"the ONNX graph as certify converts it differs from onnxruntime's output by {diff:.3g} "
                    "on a probe input: refused (the bound would not be the file's)"
                )
    graph.meta["onnxruntime_max_difference"] = worst
    return graph
