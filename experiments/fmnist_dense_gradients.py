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
* ``exp:rko+dense3st``: lipnet's sound Gram-bound scaling and 3 differentiated order-2 steps (its default
  map), then 12 more without gradient (the forward converged, the gradient the 3-step one).

Rows are ``exp`` rows: their weights are not batched (the batched Björck call has no such map). Run (one row,
about 3 minutes on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fmnist_dense_gradients.py --taus 50 --seed 3 \\
        --models exp:rko+deellike --out experiments/results/fmnist_bench/dense_gradients/seed3
"""

from __future__ import annotations

import argparse
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


def _dense(
    parametrization: type[StraightThroughBjorck], steps: int, extra: int
) -> Callable[[int, int], nn.Module]:
    def build(in_features: int, out_features: int) -> nn.Module:
        layer = BjorckLinear(in_features, out_features, train_iterations=steps)
        chain = layer.parametrizations.weight
        chain[0] = parametrization(chain[0], extra)
        return layer

    return build


def contenders(arch: dict[str, int]) -> list[Contender]:
    """The networks of the module docstring for the layout ``arch``."""
    rko = get_layer_kind("rko_bcop")
    kinds = {
        "rko+deellike": _dense(SpectralLinearMap, 4, 11),
        "rko+dense3st": _dense(StraightThroughBjorck, 3, 12),
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
