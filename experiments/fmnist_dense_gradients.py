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
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fmnist_hybrids import network
from torch import Tensor, nn

from certify.io import atomic_write_text
from lipnet.bench.fmnist import Contender, bench_fmnist, layout_of, to_csv, to_markdown
from lipnet.cli.argtypes import positive_float_list
from lipnet.layers.bjorck import BjorckLinear, BjorckOrthonormal, bjorck_orthonormalize
from lipnet.layers.kinds import LayerKind, get_layer_kind
from lipnet.models.fmnist import SIZES
from lipnet.training.config import apply_overrides, load_config


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
    parser.add_argument("--config", default="experiments/configs/fmnist_convnet_s.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--taus", type=positive_float_list, default=[50.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=lambda text: text.split(","), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = apply_overrides(load_config(args.config), [f"optim.epochs={args.epochs}", f"seed={args.seed}"])
    size, layout, _options = layout_of(recipe)
    arch = {**SIZES[size], **layout, "num_classes": 10}
    header = (
        f"Dense-layer training maps of experiments/fmnist_dense_gradients.py: {args.config}, {args.epochs} "
        f"epochs, seed {args.seed}; columns as in lipnet bench fmnist"
    )
    out = Path(args.out)

    def write(_rows: list[dict[str, Any]]) -> None:
        rows = [json.loads(path.read_text(encoding="utf-8")) for path in (out / "rows").glob("*.json")]
        rows.sort(key=lambda r: (r["tau"], r["library"], r["kind"]))
        atomic_write_text(out / "fmnist.csv", to_csv(rows))
        atomic_write_text(out / "fmnist.md", to_markdown(rows, header))

    rows = bench_fmnist(
        recipe,
        taus=args.taus,
        models=args.models,
        attack_n=0,
        out=out,
        on_row=write,
        extra=contenders(arch),
        progress=False,
        log=print,
    )
    print(to_markdown(rows, header))


if __name__ == "__main__":
    main()
