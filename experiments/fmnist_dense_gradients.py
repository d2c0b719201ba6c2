"""Does the accurate end (rko_bcop, τ ≥ 5) underfit because of its dense layers' training gradient?
(docs/benchmarks.md, "The default front", five seeds at τ = 10, 50, 100.)

deel-torchlip's ``SpectralLinear`` scales its weight by a power-iteration estimate of the largest singular
value, runs up to 15 Björck steps of order 1 (``W <- 1.5 W - 0.5 W W^T W``) and detaches the cubic term of
every step after the fourth: its forward is the converged weight, its gradient that of the 4-step map (times
1.5 per detached step, a factor Adam removes). This script gives lipnet's ``rko_bcop`` convolutions dense
layers with such training maps, their eval path lipnet's own (``BjorckOrthonormal``: float64 to convergence,
the weight ``certify`` bounds):

* ``exp:rko+deellike``: exact ``sigma_max`` scaling with constant singular vectors, order 1, 4 differentiated
  steps then 11 detached (``SpectralLinear``'s map);
* ``exp:rko+deelreplica``: ``SpectralLinear``'s map as that layer runs it: the scale from one power-iteration
  step per forward pass on kept vectors, order-1 steps until one moves the weight by less than 1e-3 in
  Frobenius norm (at most 15; about 9 on the 1568 -> 128 layer and 3 on the 128 -> 10 layer once training
  is under way), the cubic term detached after the fourth;
* ablations of the replica: ``exp:rko+deelfixed`` (always 15 steps, no tolerance: the gain is the constant
  1.5^11), ``exp:rko+deelfixed9`` (always 9: 1.5^5), ``exp:rko+deelsvd`` (exact top singular pair instead
  of the power iteration), ``exp:rko+deelunit`` (the tolerance kept, but the detached steps pass the
  gradient on unchanged: no gain);
* ``exp:rko+gain`` (its rows; the contender until e93d111): the gain without the data-dependent loop:
  lipnet's sound pre-scaling, 15 order-1 steps on the device, the first 4 differentiated, the gradient times
  1.5^(n - 4) with ``n`` counted on the device as the replica counts its steps. It is now
  :func:`lipnet.layers.bjorck.bjorck_settled`, the ``rko_bcop`` kind's dense layers (``lipnet:rko_bcop``);
* ``exp:rko+dense3st``: lipnet's sound Gram-bound scaling and 3 differentiated order-2 steps (its default
  map), then 12 more without gradient (the forward converged, the gradient the 3-step one);
* ``exp:rko+densex1``, ``exp:rko+densex2``, ``exp:rko+densex4``: lipnet's 3-step ``BjorckLinear`` with its
  raw weight drawn 1, 1/2 or 1/4 times its usual size, i.e. a learning rate 1, 2 or 4 times the recipe's
  for the dense layers alone (is the gain a learning rate?).

Rows are ``exp`` rows: their weights are not batched (the batched Björck call has no such map; batched and
unbatched weights agree to rounding, and so do not whole trainings: ``exp:rko+densex1`` against the rows of
``lipnet:rko_bcop`` with the same dense layers, before the kind took ``bjorck_settled``, is the size of
that). Run (one row, about 3 minutes on one
thread)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fmnist_dense_gradients.py --taus 50 --seed 3 \\
        --models exp:rko+deellike --out experiments/results/fmnist_bench/dense_gradients/seed3
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from fmnist_hybrids import add_bench_arguments, network, run_bench
from torch import Tensor, nn

from lipnet.bench.fmnist import Contender
from lipnet.layers.bjorck import BjorckLinear, BjorckOrthonormal, bjorck_orthonormalize
from lipnet.layers.kinds import LayerKind, get_layer_kind


class StraightThroughBjorck(BjorckOrthonormal):
    """In training: ``steps`` differentiated Björck steps (lipnet's pre-scaling and order), then ``extra``
    steps whose result replaces the forward value but not the gradient. In eval: the parent's converged
    float64 weight. Each training iterate has singular values in [0, 1] in exact arithmetic."""

    def __init__(self, base: BjorckOrthonormal, extra: int) -> None:
        super().__init__(
            groups=base.groups,
            scale=base.scale,
            train_iterations=base.train_iterations,
            order=base.order,
            eval_max_iterations=base.eval_max_iterations,
            eval_tol=base.eval_tol,
            bound_steps=base.bound_steps,
        )
        self.extra = extra

    def forward(self, original: Tensor) -> Tensor:
        # no cache in training: the weight changes every step
        return self.compute(original) if self.training else super().forward(original)

    def compute(self, original: Tensor) -> Tensor:
        if not self.training:
            return super().compute(original)
        w = original.reshape(self.groups, original.shape[0] // self.groups, -1)
        head = bjorck_orthonormalize(w, self.train_iterations, self.order, None, self.bound_steps)
        with torch.no_grad():
            tail = bjorck_orthonormalize(head, self.extra, self.order, None, self.bound_steps)
        return (head + (tail - head).detach()).reshape(original.shape)


class SpectralLinearMap(StraightThroughBjorck):
    """``SpectralLinear``'s training map: ``W / (u^T W v)`` with the top singular pair ``u, v`` held
    constant, then ``train_iterations`` differentiated order-1 Björck steps and ``extra`` with the cubic term
    detached."""

    def compute(self, original: Tensor) -> Tensor:
        if not self.training:
            return BjorckOrthonormal.compute(self, original)
        w = original.reshape(original.shape[0], -1)
        with torch.no_grad():
            left, _, right = torch.linalg.svd(w, full_matrices=False)
        w = w / (left[:, 0] @ w @ right[0])
        wide = w.shape[0] <= w.shape[1]
        for step in range(self.train_iterations + self.extra):
            cube = w @ w.T @ w if wide else w @ (w.T @ w)
            w = 1.5 * w - 0.5 * (cube.detach() if step >= self.train_iterations else cube)
        return w.reshape(original.shape)


class SpectralLinearReplica(StraightThroughBjorck):
    """``SpectralLinear``'s training map as that layer runs it: ``W / (u^T W v)`` with ``u, v`` from one
    power-iteration step per forward pass on vectors kept between steps (PyTorch's ``spectral_norm``), then
    order-1 Björck steps until a step moves the weight by less than ``tol`` in Frobenius norm (at most
    ``train_iterations + extra``), the cubic term detached from the ``train_iterations + 1``-th step on."""

    def __init__(
        self,
        base: BjorckOrthonormal,
        extra: int,
        tol: float | None = 1e-3,
        power: bool = True,
        unit: bool = False,
    ) -> None:
        super().__init__(base, extra)
        self.tol = tol
        self.power = power
        self.unit = unit
        self.register_buffer("left", torch.empty(0), persistent=False)

    def compute(self, original: Tensor) -> Tensor:
        if not self.training:
            return BjorckOrthonormal.compute(self, original)
        w = original.reshape(original.shape[0], -1)
        with torch.no_grad():
            if self.left.numel() == 0 or not self.power:
                self.left = torch.linalg.svd(w, full_matrices=False)[0][:, 0].clone()
            right = nn.functional.normalize(w.T @ self.left, dim=0)
            self.left = nn.functional.normalize(w @ right, dim=0)
        w = w / (self.left @ w @ right)
        wide = w.shape[0] <= w.shape[1]
        for step in range(self.train_iterations + self.extra):
            cube = w @ w.T @ w if wide else w @ (w.T @ w)
            previous = w
            if step < self.train_iterations:
                w = 1.5 * w - 0.5 * cube
            elif self.unit:  # the step's value, the identity's gradient
                w = w + (0.5 * (w - cube)).detach()
            else:
                w = 1.5 * w - 0.5 * cube.detach()
            if self.tol is not None and torch.linalg.norm(w - previous) < self.tol:
                break
        return w.reshape(original.shape)


def _dense(
    parametrization: Callable[[BjorckOrthonormal, int], StraightThroughBjorck], steps: int, extra: int
) -> Callable[[int, int], nn.Module]:
    def build(in_features: int, out_features: int) -> nn.Module:
        layer = BjorckLinear(in_features, out_features, train_iterations=steps)
        chain = layer.parametrizations.weight
        chain[0] = parametrization(chain[0], extra)
        return layer

    return build


def _scaled_dense(scale: float) -> Callable[[int, int], nn.Module]:
    """lipnet's ``BjorckLinear`` (3 order-2 steps) with its raw weight drawn ``scale`` times its usual size:
    the map is scale-invariant and Adam's step is not, so Adam moves this layer ``1 / scale`` times as far
    relative to its weight, a learning rate ``1 / scale`` times the recipe's for the dense layers alone."""

    def build(in_features: int, out_features: int) -> nn.Module:
        layer = BjorckLinear(in_features, out_features)
        with torch.no_grad():
            layer.parametrizations.weight.original.mul_(scale)
        return layer

    return build


def contenders(arch: dict[str, int]) -> list[Contender]:
    """The networks of the module docstring for the layout ``arch``."""
    rko = get_layer_kind("rko_bcop")
    kinds = {
        "rko+deellike": _dense(SpectralLinearMap, 4, 11),
        "rko+dense3st": _dense(StraightThroughBjorck, 3, 12),
        "rko+deelreplica": _dense(SpectralLinearReplica, 4, 11),
        "rko+deelfixed": _dense(functools.partial(SpectralLinearReplica, tol=None), 4, 11),
        "rko+deelsvd": _dense(functools.partial(SpectralLinearReplica, power=False), 4, 11),
        "rko+deelfixed9": _dense(functools.partial(SpectralLinearReplica, tol=None), 4, 5),
        "rko+deelunit": _dense(functools.partial(SpectralLinearReplica, unit=True), 4, 11),
        "rko+densex1": _scaled_dense(1.0),
        "rko+densex2": _scaled_dense(0.5),
        "rko+densex4": _scaled_dense(0.25),
    }
    return [
        Contender("exp", name, network(LayerKind(name, rko.block, rko.conv, dense, ""), arch))
        for name, dense in kinds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, taus=[50.0])
    args = parser.parse_args()
    if args.models is None or args.out is None:
        parser.error("give --models and --out")
    torch.set_num_threads(args.threads)
    run_bench(args, "Dense-layer training maps of experiments/fmnist_dense_gradients.py", contenders)


if __name__ == "__main__":
    main()
