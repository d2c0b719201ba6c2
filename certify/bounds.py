"""The dispatcher: sound upper bounds of L2 Lipschitz constants of any module, in float64.

The contract (see ``docs/design.md`` and :mod:`certify.contract`): every bound returned here is an
upper bound that holds, never an estimate. Per module the bound comes from, in this order,

1. the module's own ``lipschitz_bound(input_shape=None)`` method (lipnet's layers, or any user
   module that implements it: :class:`certify.contract.LipschitzBounded`);
2. a function registered for its type with :func:`register_bound` (plain torch layers are
   registered in :mod:`certify.rules`; deel-torchlip and orthogonium layers are registered on first
   sight, from their *effective* weights, never from their own claims);
3. composition: an ``nn.Sequential`` without an input shape multiplies the bounds of its
   children; any other model (or a Sequential with an input shape, so that BatchNorm can be
   folded and convolutions bounded for their actual input size) is traced with ``torch.fx`` and
   bounded along its graph by :mod:`certify.graph`.

Anything else raises :class:`UnboundableModuleError`, which names the module and says how to
register a bound. Nothing is guessed.
"""

from __future__ import annotations

import torch
from torch import nn

import certify.rules  # noqa: F401  (registers the bounds of plain torch layers: step 2)
from certify.contract import (
    Shape,
    UnboundableModuleError,
    has_bound,
    leaf_bound,
    register_bound,
)
from certify.graph import graph_bound

__all__ = [
    "UnboundableModuleError",
    "has_bound",
    "input_shapes",
    "lipschitz_bound",
    "module_bound",
    "register_bound",
]


def input_shapes(model: nn.Module, input_shape: Shape) -> dict[nn.Module, Shape]:
    """Record the per-sample input shape of every submodule for one input of ``input_shape``.

    Runs one forward pass of a zero batch of size 1 in eval mode (training-mode flags are
    restored afterwards); shapes exclude the batch dimension.
    """
    shapes: dict[nn.Module, Shape] = {}

    def hook(mod: nn.Module, args: tuple[object, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and mod not in shapes:
            shapes[mod] = tuple(args[0].shape[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    modes = {m: m.training for m in model.modules()}
    ref = next(iter(model.parameters()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def module_bound(
    module: nn.Module,
    input_shape: Shape | None = None,
    *,
    shapes: dict[nn.Module, Shape] | None = None,
    path: str = "",
) -> float:
    """Sound bound of one module: its own method, a registered bound, or its traced graph.

    An ``nn.Sequential`` without ``input_shape`` is bounded by the product of its children
    (``shapes`` gives their input shapes when known); with ``input_shape`` it is bounded along
    its graph, which also folds BatchNorm into the preceding layer. Any other module without a
    bound of its own is traced by :func:`certify.graph.graph_bound`, which needs ``input_shape``.
    """
    if has_bound(module):
        return leaf_bound(module, input_shape)
    if isinstance(module, nn.Sequential) and input_shape is None:
        total = 1.0
        for name, child in module.named_children():
            child_shape = shapes.get(child) if shapes is not None else None
            total *= module_bound(child, child_shape, shapes=shapes, path=f"{path}.{name}" if path else name)
        return total
    if input_shape is None:
        name = type(module).__qualname__
        where = f" at '{path}'" if path else ""
        raise UnboundableModuleError(
            module,
            path,
            detail=(
                f"module {name}{where} has no bound of its own, so certify bounds it along its traced "
                "graph, which needs the per-sample input shape: call "
                "certify.lipschitz_bound(model, input_shape=(C, H, W))"
            ),
        )
    return graph_bound(module, tuple(int(s) for s in input_shape), path=path)


def lipschitz_bound(model: nn.Module, input_shape: Shape | None = None) -> float:
    """Sound float64 upper bound of ``model``'s L2 Lipschitz constant w.r.t. its input.

    With ``input_shape`` (per sample, e.g. ``(3, 32, 32)``) convolution bounds are computed for
    that size, which can be tighter, and models that are not a plain ``nn.Sequential`` of
    bounded modules are bounded along their ``torch.fx`` graph (:mod:`certify.graph`; in eval
    mode, the mode in which certificates are used); without it the bounds hold for every size.
    """
    return module_bound(model, None if input_shape is None else tuple(int(s) for s in input_shape))
