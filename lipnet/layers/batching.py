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
layer applies its block to its own raw weight. Wide one-group layers with the same number of columns
share their two products too: their matrices, padded with zero rows to the largest, are stacked by one
``cat`` (a *unit*, :class:`_Unit`; ``[W; 0]`` has the zero-padded Gram matrix of ``W`` and the weight
``[T W; 0]``, whose first rows are a contiguous view). The whole call is one autograd node whose backward
is written by hand (:class:`_BatchedBjorck`): the same gradient in exact arithmetic in about half the
kernels of autograd's, each sum accumulated inside the product that makes its last term.

Same function: zero padding changes nothing in exact arithmetic (every quantity stays block diagonal and
the Gram-iteration bound sees the same Frobenius norms, ``docs/proofs/convolutions.md#lemma-batched-bjorck``),
and the per-layer path runs the same iterates (its near-square matrices iterate on the matrix itself, the
same iterates in exact arithmetic): the weights agree to float rounding, and so do their gradients. The
guarantee of each layer (singular values in ``[0, 1]`` times its scale, ``#lemma-bjorck``) is unchanged.

Which layers share a call: those with the same device, dtype, order, step count and bound steps, split
into buckets of decreasing size by ``max_padding``, the largest ratio of a bucket's padded work
``E M^3`` to its matrices' own ``sum m^3`` (matrix products cost ``m^3``); the same rule, on their rows,
groups the layers of a bucket into units; settled weights (``BjorckOrthonormal.settle_iterations``) share a
call with those of the same settling steps and tolerance (:func:`~lipnet.layers.bjorck.bjorck_settled`: the
settling steps continue the call's Gram-space steps, the backward scales each matrix's cotangent by its
gain). Padding is free on a GPU
that waits for launches and not on a CPU that waits for arithmetic: the default is
:data:`MAX_PADDING` for the device.

Eval mode, a forward under ``torch.compile`` (compiled code fuses the per-layer kernels itself), a weight
read outside the model's forward, a layer whose Björck parametrization is not the first on its weight
or whose ``batcher`` was unset: each layer computes its own weight, as without the batcher. The batched
backward is differentiable once: a second derivative through the weights (a gradient penalty on the
parameters) needs the per-layer computation (``model.weight_batcher.remove()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    _gram_prescale_backward,
    _gram_space,
    _gram_space_backward,
    _GramTape,
    _identities,
    _inner,
    _monomial_coefficients,
    _settle,
    gram_norm_bound,
)
from lipnet.layers.parametrization import full_precision

__all__ = ["MAX_PADDING", "WeightBatcher", "batch_weights", "buckets"]

#: Default ``max_padding`` by device type (others: the CPU's). On a CPU padding costs arithmetic, so only
#: near-equal sizes share a call; on a GPU the padded products cost microseconds and each call saved is a
#: few dozen launches, so sizes within a factor 16 of work share one.
MAX_PADDING: dict[str, float] = {"cpu": 1.5, "cuda": 16.0}

_GroupKey = tuple[torch.device, torch.dtype, int, int, int, int, float]


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
class _Unit:
    """Matrices that share one Gram product and one application in a batched call: their ``start:stop``
    entries of the batch, their block side ``m`` (the largest of their Gram sides), ``wide`` (Gram matrix
    ``W W^T``, transform applied on the left) or not (``W^T W``, on the right), and each member layer's
    ``(rows, groups)``: a wide unit stacks its members' ``rows x n`` matrices (same ``n``), each padded with
    zero rows to ``m`` rows, into one ``(stop - start, m, n)`` batch. ``[W; 0]`` has the Gram matrix
    ``[[W W^T, 0], [0, 0]]`` (exactly the zero padding of the batch) and ``T [W; 0] = [T W; 0]``, so a
    member's weight is the first ``rows`` rows of its entries: a contiguous view. Only members of one group
    are padded (a view of several padded groups is not contiguous); a tall unit has one member."""

    start: int
    stop: int
    m: int
    wide: bool
    members: tuple[tuple[int, int], ...]

    @property
    def packed(self) -> bool:
        """Whether its batch is assembled from several members: else it is its one member's matrices."""
        return len(self.members) > 1


@dataclass(frozen=True)
class _Layout:
    """The units of a padded batch ``(entries, side, side)``, in the order of the layers."""

    entries: int
    side: int
    units: tuple[_Unit, ...]

    def block(self, batch: Tensor, unit: _Unit) -> Tensor:
        """The view of ``unit``'s top-left ``m x m`` blocks in ``batch`` (a contiguous batch)."""
        if unit.stop - unit.start == self.entries and unit.m == self.side:
            return batch
        offset = batch.storage_offset() + unit.start * self.side**2
        return batch.as_strided(
            (unit.stop - unit.start, unit.m, unit.m), (self.side**2, self.side, 1), offset
        )


@dataclass(frozen=True)
class _Settings:
    """What a batched call computes: ``iterations`` steps of order ``order`` after the Gram-iteration bound of
    ``bound_steps`` steps, then, when ``settle`` is positive, the settled weight of
    :func:`~lipnet.layers.bjorck.bjorck_settled` (``settle`` steps more, tolerance ``settle_tol``);
    ``scale`` ``(E,)`` multiplies each matrix (``None``: 1); ``identities``: the constants of
    :func:`~lipnet.layers.bjorck._polynomial` for the batch's side; ``zeros``: a zero matrix ``(rows, cols)``
    of the batch's dtype and device, never written (the padding rows of packed units)."""

    iterations: int
    order: int
    bound_steps: int
    settle: int
    settle_tol: float
    scale: Tensor | None
    identities: tuple[Tensor, Tensor]
    zeros: Callable[[int, int], Tensor]


def _pack(unit: _Unit, mats: Sequence[Tensor | None], zeros: Callable[[int, int], Tensor]) -> Tensor | None:
    """``unit``'s batch ``(stop - start, m, n)`` from its members' matrices (``None``: zero; all ``None``:
    ``None``), in one ``cat``; the member's own matrices when the unit is not packed."""
    if all(w is None for w in mats):
        return None
    if not unit.packed:
        return mats[0]
    n = next(w for w in mats if w is not None).shape[-1]
    pieces = []
    for (rows, groups), w in zip(unit.members, mats, strict=True):
        pieces.append(zeros(groups * rows, n) if w is None else w.reshape(groups * rows, n))
        if rows < unit.m:
            pieces.append(zeros(unit.m - rows, n))
    return torch.cat(pieces).view(unit.stop - unit.start, unit.m, n)


def _unpack(unit: _Unit, batch: Tensor) -> list[Tensor]:
    """Each member's matrices ``(groups, rows, n)`` in ``unit``'s batch, as contiguous views."""
    if not unit.packed:
        return [batch]
    out, start = [], 0
    for rows, groups in unit.members:
        out.append(batch[start : start + groups, :rows])
        start += groups
    return out


class _BatchedBjorck(torch.autograd.Function):
    """Every layer's training weight from its raw matrices in one autograd node, with a hand-written backward.

    Forward: the smaller Gram matrix of each unit's matrices (:class:`_Unit`) zero-padded into one batch ``G``
    ``(E, M, M)`` (one product per unit, written in its block), the transform
    ``T = scale b^(-1/2) P(X_(k-1)) ... P(X_0)`` of :func:`~lipnet.layers.bjorck.bjorck_gram_transform`
    (``b`` the clamped Gram-iteration bound, ``X_0 = G / b``) with its intermediates kept, and each unit's
    block of ``T`` applied to its matrices: ``T W`` (wide) or ``W T`` (tall), the same operations as autograd
    through those functions. Settled weights (``settings.settle``): the weight applies the transform of
    ``k + settle`` steps (the last ``settle`` continuing the recorded ones, no tape) and the backward below,
    which is that of the ``k``-step weight, starts from each matrix's cotangent times its gain: the value
    and gradient of :func:`~lipnet.layers.bjorck.bjorck_settled`.

    Backward, for the cotangent ``g`` of each unit's weights: the cotangent ``C`` of ``T`` (blocks ``g W^T`` /
    ``W^T g``), the reverse pass of the polynomial steps
    (:func:`~lipnet.layers.bjorck._gram_space_backward`) and of the pre-scaling
    (:func:`~lipnet.layers.bjorck._gram_prescale_backward`) to the cotangent ``S`` of ``G``, and each
    unit's ``T^T g + (S + S^T) W`` / ``g T^T + W (S + S^T)``. It equals autograd's gradient in exact
    arithmetic (the bound's derivative is taken in closed form, ``d b / d G = X_0^(2q-1)``); every sum is
    accumulated inside the ``baddbmm`` / ``addcmul`` that makes its last term, which is what saves the
    kernels: about half of autograd's backward through the same forward.
    """

    @staticmethod
    def forward(ctx: Any, layout: _Layout, settings: _Settings, *mats: Tensor) -> tuple[Tensor, ...]:
        gram = mats[0].new_zeros(layout.entries, layout.side, layout.side)
        packed, first = [], 0
        for unit in layout.units:
            members = mats[first : first + len(unit.members)]
            first += len(unit.members)
            w = _pack(unit, members, settings.zeros)
            assert w is not None
            packed.append(w)
            block = layout.block(gram, unit)
            if unit.wide:
                torch.bmm(w, w.mT, out=block)
            else:
                torch.bmm(w.mT, w, out=block)
        bound = gram_norm_bound(gram, settings.bound_steps).clamp_min(torch.finfo(gram.dtype).tiny)
        x = gram / bound[:, None, None]
        tape = _GramTape()
        coeffs = _monomial_coefficients(settings.order)
        raw = _gram_space(x, coeffs, settings.iterations, settings.identities, tape)
        coef = bound.rsqrt() if settings.scale is None else bound.rsqrt() * settings.scale
        transform = raw * coef[:, None, None]
        applied, gain = transform, None
        if settings.settle:
            settled, gain = _settle(tape, settings.identities, coeffs, settings.settle, settings.settle_tol)
            applied = settled * coef[:, None, None]
        outs: list[Tensor] = []
        for unit, w in zip(layout.units, packed, strict=True):
            block = layout.block(applied, unit)
            outs.extend(_unpack(unit, torch.bmm(block, w) if unit.wide else torch.bmm(w, block)))
        ctx.save_for_backward(*mats)
        # intermediates (neither inputs nor outputs) are kept on ctx; a unit that is not packed is its input
        ctx.packed = [w if unit.packed else None for unit, w in zip(layout.units, packed, strict=True)]
        ctx.layout, ctx.settings, ctx.coeffs, ctx.tape = layout, settings, coeffs, tape
        ctx.x, ctx.bound, ctx.raw, ctx.coef, ctx.transform = x, bound, raw, coef, transform
        ctx.gain = gain
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        # a backward called inside an autocast region must not run these products in bf16 either
        with full_precision(ctx.transform.device.type):
            return _BatchedBjorck._backward(ctx, grads)

    @staticmethod
    def _backward(ctx: Any, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        layout: _Layout = ctx.layout
        mats = ctx.saved_tensors
        transform: Tensor = ctx.transform
        grad_transform = torch.zeros_like(transform)
        units: list[tuple[_Unit, Tensor, Tensor | None]] = []
        first = 0
        for unit, w in zip(layout.units, ctx.packed, strict=True):
            end = first + len(unit.members)
            w = mats[first] if w is None else w
            g = _pack(unit, grads[first:end], ctx.settings.zeros)
            first = end
            if g is not None and ctx.gain is not None:
                g = g * ctx.gain[unit.start : unit.stop, None, None]
            units.append((unit, w, g))
            if g is not None:  # else no weight of this unit was used
                block = layout.block(grad_transform, unit)
                if unit.wide:
                    torch.bmm(g, w.mT, out=block)
                else:
                    torch.bmm(w.mT, g, out=block)
        grad_coef = _inner(grad_transform, ctx.raw)
        grad_raw = grad_transform * ctx.coef[:, None, None]
        grad_x = _gram_space_backward(ctx.tape, ctx.coeffs, grad_raw)
        sym = _gram_prescale_backward(ctx.x, ctx.bound, grad_x, ctx.coef, grad_coef, ctx.settings.bound_steps)
        grad_mats: list[Tensor | None] = []
        first = 0
        for unit, w, g in units:
            used = [grad is not None for grad in grads[first : first + len(unit.members)]]
            first += len(unit.members)
            if g is None:  # no weight of the unit was used: no gradient, as autograd gives
                grad_mats.extend([None] * len(unit.members))
                continue
            t_block, s_block = layout.block(transform, unit), layout.block(sym, unit)
            if unit.wide:  # G = W W^T, weight T W
                grad = torch.baddbmm(torch.bmm(t_block.mT, g), s_block, w)
            else:  # G = W^T W, weight W T
                grad = torch.baddbmm(torch.bmm(g, t_block.mT), w, s_block)
            # an unused member's entries get a zero cotangent (the entries are independent): None, as autograd
            grad_mats.extend(m if u else None for m, u in zip(_unpack(unit, grad), used, strict=True))
        return (None, None, *grad_mats)


def _units(items: Sequence[_Item], max_padding: float) -> list[list[int]]:
    """Indices of ``items`` grouped into units (:class:`_Unit`), in a deterministic order: the wide
    one-group matrices with the same number of columns share units by :func:`buckets` of their rows (the
    padded work of their products within ``max_padding`` of their own); every other layer is a unit."""
    by_cols: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for i, item in enumerate(items):
        if item.groups == 1 and item.rows <= item.cols:
            by_cols.setdefault(item.cols, []).append(i)
        else:
            out.append([i])
    for indices in by_cols.values():
        rows = [items[i].rows for i in indices]
        out.extend([indices[j] for j in bucket] for bucket in buckets(rows, [1] * len(rows), max_padding))
    return out


def _orthonormalize(
    items: Sequence[_Item],
    max_padding: float,
    identities: tuple[Tensor, Tensor],
    zeros: Callable[[int, int], Tensor],
    constant: Callable[[tuple[float, ...]], Tensor],
) -> list[Tensor]:
    """The training-mode weights of ``items`` (same device, dtype and settings) in one batched call, in their
    order (``identities``: the polynomial's constants for the batch's side; ``zeros``: cached zero
    matrices; ``constant``: a cached tensor of the given values, for the scales)."""
    first = items[0].parametrization
    grouped = _units(items, max_padding)
    units, start = [], 0
    for indices in grouped:
        members = tuple((items[i].rows, items[i].groups) for i in indices)
        entries = sum(groups for _, groups in members)
        wide = items[indices[0]].rows <= items[indices[0]].cols
        units.append(_Unit(start, start + entries, max(items[i].side for i in indices), wide, members))
        start += entries
    layout = _Layout(start, max(unit.m for unit in units), tuple(units))
    order = [i for indices in grouped for i in indices]
    mats = [items[i].original.reshape(items[i].groups, items[i].rows, items[i].cols) for i in order]
    scales = [items[i].parametrization.scale for i in order for _ in range(items[i].groups)]
    scale = constant(tuple(scales)) if any(s != 1.0 for s in scales) else None
    settings = _Settings(
        first.train_iterations,
        first.order,
        first.bound_steps,
        first.settle_iterations,
        first.settle_tol,
        scale,
        identities,
        zeros,
    )
    weights = dict(zip(order, _BatchedBjorck.apply(layout, settings, *mats), strict=True))
    return [weights[i].reshape(item.original.shape) for i, item in enumerate(items)]


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
        self._zero_cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}
        self._constant_cache: dict[tuple[tuple[float, ...], torch.dtype, torch.device], Tensor] = {}

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
            # a parametrization that was removed, or chained after another one, is not given the raw weight;
            # one detached from this batcher computes its own weight
            if not p.training or len(plist) == 0 or plist[0] is not p or p.batcher is not self:
                continue
            original = plist.original
            rows = original.shape[0] // p.groups
            items.append(_Item(p, original, p.groups, rows, original.numel() // (p.groups * rows)))
        return items

    def _compute(self) -> None:
        groups: dict[_GroupKey, list[_Item]] = {}
        for item in self._eligible():
            p, o = item.parametrization, item.original
            settle = p.settle_iterations, p.settle_tol
            key = (o.device, o.dtype, p.order, p.train_iterations, p.bound_steps, *settle)
            groups.setdefault(key, []).append(item)
        self._weights.clear()
        for (device, *_), items in groups.items():
            limit = self.max_padding or MAX_PADDING.get(device.type, MAX_PADDING["cpu"])
            sides, counts = [item.side for item in items], [item.groups for item in items]
            for bucket in buckets(sides, counts, limit):
                chosen = [items[i] for i in bucket]
                like = chosen[0].original
                weights = _orthonormalize(
                    chosen, limit, self._eyes(chosen), self._zeros(like), self._constant(like)
                )
                for item, weight in zip(chosen, weights, strict=True):
                    self._weights[id(item.parametrization)] = (item.original, item.original._version, weight)
        self._grad = torch.is_grad_enabled()

    def _zeros(self, like: Tensor) -> Callable[[int, int], Tensor]:
        """Zero matrices of ``like``'s dtype and device by shape, made once (they are only read)."""

        def zeros(rows: int, cols: int) -> Tensor:
            key = (rows, cols, like.dtype, like.device)
            if key not in self._zero_cache:
                self._zero_cache[key] = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
            return self._zero_cache[key]

        return zeros

    def _constant(self, like: Tensor) -> Callable[[tuple[float, ...]], Tensor]:
        """Tensors of given values in ``like``'s dtype and device, made once (no host-to-device copy per
        step; they are only read)."""

        def constant(values: tuple[float, ...]) -> Tensor:
            key = (values, like.dtype, like.device)
            if key not in self._constant_cache:
                self._constant_cache[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
            return self._constant_cache[key]

        return constant

    def _eyes(self, items: Sequence[_Item]) -> tuple[Tensor, Tensor]:
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
    :class:`~lipnet.layers.bjorck.BjorckOrthonormal` parametrization registered first on a weight of one
    of its submodules (``bjorck(...)``, ``BjorckLinear``, ``BjorckConv2d``; the frames of ``BCOPConv2d``,
    whose kernel parametrization follows it and is computed per layer from the batched frames). The
    weights are those of the per-layer computation up to float rounding
    (``docs/proofs/convolutions.md#lemma-batched-bjorck``); the state dict, eval mode, export and bounds
    are unchanged. ``max_padding`` (``>= 1``) bounds the
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
            # first on its weight: alone, or followed by a parametrization built on it (BCOP's kernel)
            if isinstance(plist, ParametrizationList) and isinstance(plist[0], BjorckOrthonormal):
                members.append((plist, plist[0]))
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
