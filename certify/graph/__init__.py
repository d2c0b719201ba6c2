"""Sound Lipschitz bounds of arbitrary models along their ``torch.fx`` graph.

* :mod:`~certify.graph.trace`: tracing (bounded modules are leaves) and the recording pass;
* :mod:`~certify.graph.ops`: tables of torch operations (random, metadata, copies) and call helpers;
* :mod:`~certify.graph.engine`: the analysis engine, node by node, and the rule registry;
* :mod:`~certify.graph.rules`: the per-operation rules;
* :mod:`~certify.graph.analysis`: the entry points :func:`analyze` and :func:`graph_bound`.
"""

from certify.graph.analysis import GraphAnalysis, analyze, graph_bound
from certify.graph.engine import LayerBound
from certify.graph.trace import BoundTracer, Problem, UnsupportedOperationsError

__all__ = [
    "BoundTracer",
    "GraphAnalysis",
    "LayerBound",
    "Problem",
    "UnsupportedOperationsError",
    "analyze",
    "graph_bound",
]
