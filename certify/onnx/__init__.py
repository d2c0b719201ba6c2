"""An ONNX file as a ``torch.fx`` graph of torch operations, checked against onnxruntime, for bounding.

:func:`onnx_to_graph` reads the file with ``onnx`` (an optional dependency, imported here only) and
runs its graph once, node by node, on an example batch: each ONNX operation is computed by the
torch operation with the same semantics (the table :data:`OPS`; ONNX's broadcasting is numpy's,
as torch's), and the ones whose result depends on the input values are written into a new fx graph
that certify's analysis bounds like any other (:mod:`certify.graph`). Weights, shapes and
everything computed from them alone are evaluated on the spot. The graph is specialised to the
per-sample shape of the example, not to its batch size: it is converted twice, for batches of
3 and 5, and every constant that differs between the two runs must be a multiple of the
batch size (a reshape target, say), which becomes a product of the input's batch dimension.

Before the graph is trusted, :func:`onnx_to_graph` runs it and the file in onnxruntime (the
``onnx`` extra) on probe inputs (the example and uniform random batches) and refuses it unless the
outputs agree within float32 rounding (``rtol 1e-4``, ``atol 1e-5`` of the output scale): the bound
is then the bound of the map onnxruntime computes. Operations outside the table, or with
attributes it does not cover, are refused together in one line (``"3 unsupported ONNX operations,
first 3: ..."``).
"""

from certify.onnx.convert import onnx_input_shape, onnx_to_graph, run_onnxruntime
from certify.onnx.ops import OPS, OnnxError

__all__ = ["OPS", "OnnxError", "onnx_input_shape", "onnx_to_graph", "run_onnxruntime"]
