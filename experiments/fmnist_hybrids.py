"""Which half of the network carries orthogonium AOC's per-epoch edge over lipnet's ``bcop`` network
(docs/benchmarks.md, "What carries AOC's per-epoch edge")?

The Fashion-MNIST bench's layout and recipe (:func:`lipnet.bench.fmnist.bench_fmnist`), with networks that
swap the convolutions and the dense layers of the two libraries, all with lipnet's GroupSort2 and scaled
L2-norm pooling:

* ``lipnet:bcop+ortholinear``: lipnet's BCOP convolutions, orthogonium's ``OrthoLinear`` dense layers;
* ``lipnet:aoc+bjorcklinear``: orthogonium's ``AdaptiveOrthoConv2d``, lipnet's ``BjorckLinear`` (3 steps,
  its default);
* ``orthogonium:aoc+groupsort``: orthogonium's AOC network with GroupSort2 instead of ``MaxMin``;
* ``lipnet:bcop+dense3``, ``lipnet:bcop+dense8``, ``lipnet:bcop+dense12o1``, ``lipnet:bcop+dense2``:
  lipnet's BCOP convolutions with dense layers that run 3 Björck steps of order 2 in training (the
  ``bcop`` kind before 36b112a), 8 of order 2 (the ``bcop`` kind since), 12 of order 1 (orthogonium's count
  and order) or 2 of order 2;
* ``lipnet:bcop8+dense8``: the projector frames of the BCOP convolutions converged too (8 steps);
* ``lipnet:bcop+settled``: BCOP convolutions with the ``rko_bcop`` kind's dense layers (4 order-1 steps,
  settled by up to 11 more, the gradient gained 3/2 per settling step: ``bjorck_settled``);
* ``lipnet:rko+deeldense``, ``lipnet:rko+dense15``: the ``rko_bcop`` kind's convolutions with deel-torchlip's
  ``SpectralLinear`` dense layers, or with lipnet's ``BjorckLinear`` at 15 steps (the large-τ end,
  docs/benchmarks.md "The default front");
* ``lipnet:bcop+hh``, ``lipnet:rko_bcop+hh``: the default kinds' networks with lipnet's
  :class:`~lipnet.activations.HouseholderActivation` (a learned reflection angle per channel pair,
  initialised at MaxMin) instead of GroupSort2;
* ``lipnet:cayley+settled``: lipnet's Cayley convolutions (exactly orthogonal with circular padding, a
  kernel spanning the whole image) with the ``bcop`` kind's settled dense layers.

Rows marked ``lipnet`` have their Björck weights batched as ``lipnet train`` batches them. The reference
rows (``lipnet:bcop``, ``orthogonium:aoc``) are the bench's own and can be selected too.

Run (one row, about 3 minutes on one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fmnist_hybrids.py --epochs 4 --taus 0.5 --seed 1 \\
        --models lipnet:bcop+dense8 --out experiments/results/fmnist_bench/hybrids/seed1

``--gradients`` instead compares the dense layers' training-mode weights and gradients on a drifted raw
weight (:func:`compare_gradients`, seconds).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.io import atomic_write_text
from lipnet.activations import GroupSort, HouseholderActivation
from lipnet.bench.anchors import deel_kind, orthogonium_kinds
from lipnet.bench.fmnist import Contender, bench_fmnist, layout_of, to_csv, to_markdown
from lipnet.cli.argtypes import positive_float_list
from lipnet.layers.bcop import BCOPConv2d
from lipnet.layers.bjorck import BjorckLinear
from lipnet.layers.kinds import LayerKind, get_layer_kind
from lipnet.models.fmnist import SIZES, fmnist_layers
from lipnet.pooling import ScaledL2NormPool2d
from lipnet.training.config import apply_overrides, load_config


def network(
    kind: LayerKind,
    arch: dict[str, int],
    activation: Callable[[int], nn.Module] = lambda _channels: GroupSort(2),
) -> Callable[[], nn.Module]:
    """A builder of the bench layout ``arch`` from ``kind``'s layers, ``activation`` (GroupSort2 by
    default), scaled L2-norm pooling."""

    def build() -> nn.Module:
        layers = fmnist_layers(kind, activation=activation, pool=lambda: ScaledL2NormPool2d(2), **arch)
        return nn.Sequential(*layers)

    return build


def hybrids(arch: dict[str, int]) -> list[Contender]:
    """The networks of the module docstring for the layout ``arch`` (``fmnist_layers``' size arguments)."""
    bcop, rko, aoc = get_layer_kind("bcop"), get_layer_kind("rko_bcop"), orthogonium_kinds()["aoc"]
    deel = deel_kind()

    def dense(**options: int) -> Callable[[int, int], nn.Module]:
        return lambda i, o: BjorckLinear(i, o, **options)

    kinds = {
        ("lipnet", "bcop+ortholinear"): LayerKind("bcop+ortholinear", bcop.block, bcop.conv, aoc.dense, ""),
        ("lipnet", "aoc+bjorcklinear"): LayerKind("aoc+bjorcklinear", aoc.block, aoc.conv, BjorckLinear, ""),
        ("orthogonium", "aoc+groupsort"): aoc,
        ("lipnet", "bcop+dense3"): LayerKind("bcop+dense3", bcop.block, bcop.conv, BjorckLinear, ""),
        ("lipnet", "bcop8+dense8"): LayerKind(
            "bcop8+dense8",
            lambda c, k: BCOPConv2d(c, c, k, padding=k // 2, train_iterations=8),
            lambda i, o, k: BCOPConv2d(i, o, k, padding=k // 2, train_iterations=8),
            dense(train_iterations=8),
            "",
        ),
        ("lipnet", "rko+deeldense"): LayerKind("rko+deeldense", rko.block, rko.conv, deel.dense, ""),
        ("lipnet", "rko+dense15"): LayerKind(
            "rko+dense15", rko.block, rko.conv, dense(train_iterations=15), ""
        ),
        ("lipnet", "bcop+dense2"): LayerKind(
            "bcop+dense2", bcop.block, bcop.conv, dense(train_iterations=2), ""
        ),
        ("lipnet", "bcop+dense8"): LayerKind(
            "bcop+dense8", bcop.block, bcop.conv, dense(train_iterations=8), ""
        ),
        ("lipnet", "bcop+dense12o1"): LayerKind(
            "bcop+dense12o1", bcop.block, bcop.conv, dense(train_iterations=12, order=1), ""
        ),
        ("lipnet", "bcop+settled"): LayerKind(
            "bcop+settled",
            bcop.block,
            bcop.conv,
            dense(train_iterations=4, order=1, settle_iterations=11),
            "",
        ),
    }
    cayley = get_layer_kind("cayley")
    kinds[("lipnet", "cayley+settled")] = LayerKind(
        "cayley+settled", cayley.block, cayley.conv, bcop.dense, ""
    )
    out = [Contender(library, name, network(kind, arch)) for (library, name), kind in kinds.items()]
    out += [
        Contender("lipnet", f"{name}+hh", network(get_layer_kind(name), arch, HouseholderActivation))
        for name in ("bcop", "rko_bcop")
    ]
    return out


def compare_gradients(condition: float = 8.0, seed: int = 0) -> None:
    """Print, for a 1568 -> 128 raw weight of condition number ``condition`` (the trained dense layer's
    drift), the smallest singular value each dense parametrisation gives in training and the cosine and
    norm ratio of its gradient (of ``<A, weight>`` for a random ``A``) to orthogonium's ``OrthoLinear``'s."""
    from orthogonium.layers import OrthoLinear

    torch.manual_seed(seed)
    left = torch.linalg.qr(torch.randn(128, 128)).Q
    right = torch.linalg.qr(torch.randn(1568, 128)).Q
    raw = (left * torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 128)) @ right.T
    probe = torch.randn(128, 1568)
    layers: dict[str, nn.Module] = {
        "OrthoLinear (12 x order 1, power iteration)": OrthoLinear(1568, 128),
        "BjorckLinear 3 x order 2 (lipnet's default)": BjorckLinear(1568, 128),
        "BjorckLinear 8 x order 2": BjorckLinear(1568, 128, train_iterations=8),
        "BjorckLinear 12 x order 1": BjorckLinear(1568, 128, train_iterations=12, order=1),
    }
    reference: torch.Tensor | None = None
    for name, layer in layers.items():
        original = layer.parametrizations.weight.original
        with torch.no_grad():
            original.copy_(raw)
            for _ in range(20):  # OrthoLinear's power iteration warms up over steps, as in training
                _ = layer.weight
        weight = layer.weight
        (weight * probe).sum().backward()
        grad = original.grad
        assert grad is not None
        reference = grad if reference is None else reference
        cosine = float((grad * reference).sum() / grad.norm() / reference.norm())
        sigma_min = float(torch.linalg.svdvals(weight.detach().double()).min())
        print(
            f"{name}: sigma_min {sigma_min:.4f}, gradient cosine {cosine:.6f}, norm ratio "
            f"{float(grad.norm() / reference.norm()):.4f}"
        )


def add_bench_arguments(parser: argparse.ArgumentParser, *, taus: list[float]) -> None:
    """The options of an experiment that trains its own networks in the bench (:func:`run_bench`)."""
    parser.add_argument("--config", default="experiments/configs/fmnist_convnet_s.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--taus", type=positive_float_list, default=taus)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=lambda text: text.split(","))
    parser.add_argument("--out")
    parser.add_argument("--threads", type=int, default=1)


def run_bench(
    args: argparse.Namespace, title: str, extra: Callable[[dict[str, int]], list[Contender]]
) -> None:
    """Train and certify ``args.models`` (:func:`add_bench_arguments`) under the bench's recipe, the
    networks ``extra(arch)`` offered beside the bench's own, rows kept in ``args.out``; after each row the
    folder's table (``fmnist.csv``, ``fmnist.md`` headed ``title``) lists every finished row in it, of
    this call and earlier ones."""
    recipe = apply_overrides(load_config(args.config), [f"optim.epochs={args.epochs}", f"seed={args.seed}"])
    size, layout, _options = layout_of(recipe)
    arch = {**SIZES[size], **layout, "num_classes": 10}
    header = (
        f"{title}: {args.config}, {args.epochs} epochs, seed {args.seed}, "
        f"{torch.get_num_threads()} thread(s); columns as in lipnet bench fmnist"
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
        extra=extra(arch),
        progress=False,
        log=print,
    )
    print(to_markdown(rows, header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, taus=[0.5])
    parser.add_argument(
        "--gradients", action="store_true", help="only compare the dense layers' training gradients"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.gradients:
        compare_gradients()
        return
    if args.models is None or args.out is None:
        parser.error("give --models and --out (or --gradients)")
    run_bench(args, "Hybrids of experiments/fmnist_hybrids.py", hybrids)


if __name__ == "__main__":
    main()
