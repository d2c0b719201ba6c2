"""Every Björck weight of a model in a few batched calls per training forward: :func:`batch_weights`.

A Björck layer recomputes its weight in every training forward: a Gram matrix, a Gram-iteration bound
and a few polynomial steps, a dozen small kernels forward and twice that backward, per layer. On a GPU
a small network is then bound by kernel launches, not by arithmetic. :func:`batch_weights` attaches a
:class:`WeightBatcher` to a model: during each forward pass of the model (between a forward pre-hook and
a forward hook on it), the first Björck weight requested computes the training-mode weights of all the
model's Björck layers at once and every layer takes its own. Matrices of different sizes share one call
by zero padding: each layer's Gram matrix ``W W^T`` (or ``W^T W``, the smaller) is placed in the
top-left block of an ``M x M`` zero matrix, the stack goes through the computation of
:func:`~lipnet.layers.bjorck.bjorck_gram_transform` (bound, pre-scaling, polynomial steps) once, and each
layer applies its block to its own raw weight. The whole call is one autograd node whose backward is
written by hand (:class:`_BatchedBjorck`): the same gradient in exact arithmetic in about half the
kernels of autograd's, each sum accumulated inside the product that makes its last term (a GPU step of a
small network is bound by kernel launches).

Same function: zero padding changes nothing in exact arithmetic (every quantity stays block diagonal and
the Gram-iteration bound sees the same Frobenius norms, ``docs/proofs/convolutions.md#lemma-batched-bjorck``),
and the per-layer path runs the same iterates (its near-square matrices iterate on the matrix itself, the
same iterates in exact arithmetic): the weights agree to float rounding, and so do their gradients. The
guarantee of each layer (singular values in ``[0, 1]`` times its scale, ``#lemma-bjorck``) is unchanged.

Which layers share a call: those with the same device, dtype, order, step count and bound steps, split
into buckets of decreasing size by ``max_padding``, the largest ratio of a bucket's padded work
``E M^3`` to its matrices' own ``sum m^3`` (matrix products cost ``m^3``). Padding is free on a GPU
that waits for launches and not on a CPU that waits for arithmetic: the default is
:data:`MAX_PADDING` for the device.

Eval mode, a forward under ``torch.compile`` (compiled code fuses the per-layer kernels itself), a weight
read outside the model's forward, a layer whose parametrization is not alone on its weight: each layer
computes its own weight, as without the batcher. The batched backward is differentiable once: a second
derivative through the weights (a gradient penalty on the parameters) needs the per-layer computation
(``model.weight_batcher.remove()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList
from torch.utils.hooks import RemovableHandle

from lipnet.layers.bjorck import (
    BjorckOrthonormal,
    GramTape,
    _gram_prescale_backward,
    _gram_space,
    _gram_space_backward,
    _identities,
    _inner,
    _monomial_coefficients,
    gram_norm_bound,
)

__all__ = ["MAX_PADDING", "WeightBatcher", "batch_weights", "buckets"]

#: Default ``max_padding`` by device type (others: the CPU's). On a CPU padding costs arithmetic, so only
#: near-equal sizes share a call; on a GPU the padded products cost microseconds and each call saved is a
#: few dozen launches, so sizes within a factor 16 of work share one.
MAX_PADDING: dict[str, float] = {"cpu": 1.5, "cuda": 16.0}

_GroupKey = tuple[torch.device, torch.dtype, int, int, int]


@dataclass(frozen=True)
class _Item:
    """One layer's weight in a batched call: ``groups`` matrices ``(rows, cols)`` of its raw weight."""

    parametrization: BjorckOrthonormal
    original: Tensor
    groups: int
    rows: int
    cols: int

    @property
    def side(self) -> int:
        """The side ``m`` of its Gram matrices (the smaller of rows and columns)."""
        return min(self.rows, self.cols)


def buckets(sides: Sequence[int], counts: Sequence[int], max_padding: float) -> list[list[int]]:
    """Indices of the entries (``counts[i]`` matrices of side ``sides[i]``) grouped into calls.

    Greedily by decreasing side: a bucket whose largest side is ``M`` takes the next entry when the sides
    are equal or when its padded work ``n M^3`` (``n`` its matrices) stays within ``max_padding`` times its
    matrices' own work ``sum side^3``. Every index is in exactly one bucket.
    """
    if not max_padding >= 1:
        raise ValueError(f"max_padding must be >= 1, got {max_padding}")
    order = sorted(range(len(sides)), key=lambda i: -sides[i])
    out: list[list[int]] = []
    matrices = work = 0
    for i in order:
        own = counts[i] * sides[i] ** 3
        if out:
            top = sides[out[-1][0]]
            if sides[i] == top or (matrices + counts[i]) * top**3 <= max_padding * (work + own):
                out[-1].append(i)
                matrices += counts[i]
                work += own
                continue
        out.append([i])
        matrices, work = counts[i], own
    return out


@dataclass(frozen=True)
class _Layout:
    """Where each layer's matrices sit in a padded batch ``(entries, side, side)``: rows ``start:stop``,
    top-left block ``m x m``; ``wide`` when its matrices have at most as many rows as columns (Gram
    matrix ``W W^T``, transform applied on the left), else ``W^T W`` and on the right."""

    entries: int
    side: int
    slots: tuple[tuple[int, int, int, bool], ...]

    def block(self, batch: Tensor, slot: tuple[int, int, int, bool]) -> Tensor:
        """The view of ``slot``'s blocks in ``batch`` (contiguous ``(entries, side, side)``), as one view."""
        start, stop, m, _ = slot
        if stop - start == self.entries and m == self.side:
            return batch
        offset = batch.storage_offset() + start * self.side**2
        return batch.as_strided((stop - start, m, m), (self.side**2, self.side, 1), offset)


@dataclass(frozen=True)
class _Settings:
    """What a batched call computes: ``iterations`` steps of order ``order`` after the Gram-iteration bound of
    ``bound_steps`` steps; ``scale`` ``(E,)`` multiplies each matrix (``None``: 1); ``identities``: the
    constants of :func:`~lipnet.layers.bjorck._polynomial` for the batch's side."""

    iterations: int
    order: int
    bound_steps: int
    scale: Tensor | None
    identities: tuple[Tensor, Tensor]


class _BatchedBjorck(torch.autograd.Function):
    """Every layer's training weight from its raw matrices in one autograd node, with a hand-written backward.

    Forward: the smaller Gram matrix of each layer's matrices zero-padded into one batch ``G`` ``(E, M, M)``
    (one product per layer, written in its block), the transform ``T = scale b^(-1/2) P(X_(k-1)) ... P(X_0)``
    of :func:`~lipnet.layers.bjorck.bjorck_gram_transform` (``b`` the clamped Gram-iteration bound,
    ``X_0 = G / b``) with its intermediates kept, and each layer's block of ``T`` applied to its matrices:
    ``T W`` (wide) or ``W T`` (tall), the same operations as autograd through those functions.

    Backward, for the cotangent ``g`` of each layer's weight: the cotangent ``C`` of ``T`` (blocks ``g W^T`` /
    ``W^T g``), the reverse pass of the polynomial steps
    (:func:`~lipnet.layers.bjorck._gram_space_backward`) and of the pre-scaling
    (:func:`~lipnet.layers.bjorck._gram_prescale_backward`) to the cotangent ``S`` of ``G``, and each
    layer's ``T^T g + (S + S^T) W`` / ``g T^T + W (S + S^T)``. It equals autograd's gradient in exact
    arithmetic (the bound's derivative is taken in closed form, ``d b / d G = X_0^(2q-1)``); every sum is
    accumulated inside the ``baddbmm`` / ``addcmul`` that makes its last term, which is what saves the
    kernels: about half of autograd's backward through the same forward.
    """

    @staticmethod
    def forward(ctx: Any, layout: _Layout, settings: _Settings, *mats: Tensor) -> tuple[Tensor, ...]:
        gram = mats[0].new_zeros(layout.entries, layout.side, layout.side)
        for slot, w in zip(layout.slots, mats, strict=True):
            block = layout.block(gram, slot)
            if slot[3]:
                torch.bmm(w, w.mT, out=block)
            else:
                torch.bmm(w.mT, w, out=block)
        bound = gram_norm_bound(gram, settings.bound_steps).clamp_min(torch.finfo(gram.dtype).tiny)
        x = gram / bound[:, None, None]
        tape = GramTape()
        coeffs = _monomial_coefficients(settings.order)
        raw = _gram_space(x, coeffs, settings.iterations, settings.identities, tape)
        coef = bound.rsqrt() if settings.scale is None else bound.rsqrt() * settings.scale
        transform = raw * coef[:, None, None]
        outs = []
        for slot, w in zip(layout.slots, mats, strict=True):
            block = layout.block(transform, slot)
            outs.append(torch.bmm(block, w) if slot[3] else torch.bmm(w, block))
        ctx.save_for_backward(*mats)
        # intermediates (neither inputs nor outputs) are kept on ctx
        ctx.layout, ctx.settings, ctx.coeffs, ctx.tape = layout, settings, coeffs, tape
        ctx.x, ctx.bound, ctx.raw, ctx.coef, ctx.transform = x, bound, raw, coef, transform
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        layout: _Layout = ctx.layout
        mats = ctx.saved_tensors
        transform: Tensor = ctx.transform
        grad_transform = torch.zeros_like(transform)
        for slot, w, g in zip(layout.slots, mats, grads, strict=True):
            if g is not None:  # else this layer's weight was not used
                block = layout.block(grad_transform, slot)
                if slot[3]:
                    torch.bmm(g, w.mT, out=block)
                else:
                    torch.bmm(w.mT, g, out=block)
        grad_coef = _inner(grad_transform, ctx.raw)
        grad_raw = grad_transform * ctx.coef[:, None, None]
        grad_x = _gram_space_backward(ctx.tape, ctx.coeffs, grad_raw)
        grad_gram = _gram_prescale_backward(
            ctx.x, ctx.bound, grad_x, ctx.coef, grad_coef, ctx.settings.bound_steps
        )
        sym = grad_gram + grad_gram.mT
        grad_mats: list[Tensor] = []
        for slot, w, g in zip(layout.slots, mats, grads, strict=True):
            t_block, s_block = layout.block(transform, slot), layout.block(sym, slot)
            if slot[3]:  # G = W W^T, weight T W
                through_gram = s_block, w
                direct = None if g is None else torch.bmm(t_block.mT, g)
            else:  # G = W^T W, weight W T
                through_gram = w, s_block
                direct = None if g is None else torch.bmm(g, t_block.mT)
            grad_mats.append(
                torch.bmm(*through_gram) if direct is None else torch.baddbmm(direct, *through_gram)
            )
        return (None, None, *grad_mats)


def _orthonormalize(items: Sequence[_Item], identities: tuple[Tensor, Tensor]) -> list[Tensor]:
    """The training-mode weights of ``items`` (same device, dtype and settings) in one batched call
    (``identities``: the polynomial's constants for the batch's side)."""
    first = items[0].parametrization
    side = max(item.side for item in items)
    slots = []
    start = 0
    for item in items:
        slots.append((start, start + item.groups, item.side, item.rows <= item.cols))
        start += item.groups
    layout = _Layout(start, side, tuple(slots))
    mats = [item.original.reshape(item.groups, item.rows, item.cols) for item in items]
    scales = [item.parametrization.scale for item in items for _ in range(item.groups)]
    scale = None
    if any(s != 1.0 for s in scales):
        scale = torch.tensor(scales, dtype=mats[0].dtype, device=mats[0].device)
    settings = _Settings(first.train_iterations, first.order, first.bound_steps, scale, identities)
    weights = _BatchedBjorck.apply(layout, settings, *mats)
    return [w.reshape(item.original.shape) for item, w in zip(items, weights, strict=True)]


class WeightBatcher:
    """Computes the training-mode weights of a set of :class:`~lipnet.layers.bjorck.BjorckOrthonormal`
    parametrizations together, once per forward pass of the module it is attached to (see the module
    docstring; :func:`batch_weights` attaches one).

    :meth:`enter` and :meth:`leave` are the forward pre-hook and (always called) forward hook of that
    module: the weights computed in between are reused by every layer that asks again in the same pass
    (a layer applied twice reuses its weight) and released at the end, so that the autograd graph of a
    pass never outlives it. :meth:`weight` answers a parametrization's request, or ``None`` when the
    parametrization must compute its weight itself (outside a pass, under ``torch.compile``, not a
    member, eval mode).
    """

    def __init__(
        self, members: Sequence[tuple[ParametrizationList, BjorckOrthonormal]], max_padding: float | None
    ) -> None:
        if max_padding is not None and not max_padding >= 1:
            raise ValueError(f"max_padding must be >= 1, got {max_padding}")
        self.members = list(members)
        self.max_padding = max_padding
        self.handles: list[RemovableHandle] = []
        self._depth = 0
        self._grad: bool | None = None
        self._weights: dict[int, tuple[Tensor, int, Tensor]] = {}
        # the polynomial's constant matrices by (side, order, dtype, device): made once, not in every step
        self._identities: dict[tuple[int, int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: a pass of the module starts (passes may nest)."""
        if not torch.compiler.is_compiling():
            self._depth += 1

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook (also called when the pass raises): at the end of the outermost pass, forget the
        weights and their graph."""
        if not torch.compiler.is_compiling():
            self._depth = max(self._depth - 1, 0)
            if self._depth == 0:
                self._weights.clear()
                self._grad = None

    def _eligible(self) -> list[_Item]:
        items = []
        for plist, p in self.members:
            # a parametrization that was removed, or chained after another one, is not given the raw weight
            if not p.training or len(plist) != 1 or plist[0] is not p:
                continue
            original = plist.original
            rows = original.shape[0] // p.groups
            items.append(_Item(p, original, p.groups, rows, original.numel() // (p.groups * rows)))
        return items

    def _compute(self) -> None:
        groups: dict[_GroupKey, list[_Item]] = {}
        for item in self._eligible():
            p, o = item.parametrization, item.original
            key = (o.device, o.dtype, p.order, p.train_iterations, p.bound_steps)
            groups.setdefault(key, []).append(item)
        self._weights.clear()
        for (device, _, _, _, _), items in groups.items():
            limit = self.max_padding or MAX_PADDING.get(device.type, MAX_PADDING["cpu"])
            sides, counts = [item.side for item in items], [item.groups for item in items]
            for bucket in buckets(sides, counts, limit):
                chosen = [items[i] for i in bucket]
                weights = _orthonormalize(chosen, self._constants(chosen))
                for item, weight in zip(chosen, weights, strict=True):
                    self._weights[id(item.parametrization)] = (item.original, item.original._version, weight)
        self._grad = torch.is_grad_enabled()

    def _constants(self, items: Sequence[_Item]) -> tuple[Tensor, Tensor]:
        """The identities of the polynomial steps for a call on ``items`` (cached)."""
        original, order = items[0].original, items[0].parametrization.order
        key = (max(item.side for item in items), order, original.dtype, original.device)
        if key not in self._identities:
            self._identities[key] = _identities(key[0], _monomial_coefficients(order), original.detach())
        return self._identities[key]

    def weight(self, parametrization: BjorckOrthonormal, original: Tensor) -> Tensor | None:
        """``parametrization``'s training-mode weight for the raw weight ``original`` from this pass's
        batched computation (computed on the first request of the pass, or again when the grad mode has
        changed), or ``None`` when it must compute it itself."""
        if torch.compiler.is_compiling() or self._depth == 0:
            return None
        if self._grad != torch.is_grad_enabled() or id(parametrization) not in self._weights:
            self._compute()
        cached = self._weights.get(id(parametrization))
        if cached is None or cached[0] is not original or cached[1] != original._version:
            return None
        return cached[2]

    def remove(self) -> None:
        """Detach from the module and from every member (each computes its own weight again)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for _, p in self.members:
            if p.batcher is self:
                p.batcher = None
        self._weights.clear()


def batch_weights(model: nn.Module, *, max_padding: float | None = None) -> nn.Module:
    """Compute the training-mode weights of ``model``'s Björck layers in batched calls; returns ``model``.

    Attaches a :class:`WeightBatcher` (module docstring) to ``model`` for every
    :class:`~lipnet.layers.bjorck.BjorckOrthonormal` parametrization registered alone on a weight of one
    of its submodules (``bjorck(...)``, ``BjorckLinear``, ``BjorckConv2d``). The weights are those of the
    per-layer computation up to float rounding (``docs/proofs/convolutions.md#lemma-batched-bjorck``);
    the state dict, eval mode, export and bounds are unchanged. ``max_padding`` (``>= 1``) bounds the
    padded work of a call against its matrices' own (:func:`buckets`); ``None``: :data:`MAX_PADDING` of
    the weights' device. Calling it again replaces the previous batcher; ``model.weight_batcher.remove()``
    detaches it.
    """
    previous = getattr(model, "weight_batcher", None)
    if isinstance(previous, WeightBatcher):
        previous.remove()
    members: list[tuple[ParametrizationList, BjorckOrthonormal]] = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():  # type: ignore[operator]
            if isinstance(plist, ParametrizationList) and len(plist) == 1:
                first = plist[0]
                if isinstance(first, BjorckOrthonormal):
                    members.append((plist, first))
    batcher = WeightBatcher(members, max_padding)
    for _, p in members:
        if p.batcher is not None and p.batcher is not batcher:
            p.batcher.remove()
        p.batcher = batcher
    batcher.handles = [
        model.register_forward_pre_hook(batcher.enter),
        model.register_forward_hook(batcher.leave, always_call=True),
    ]
    model.weight_batcher = batcher  # type: ignore[assignment]
    return model
