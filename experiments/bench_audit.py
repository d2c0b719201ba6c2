"""Tightness and cost of ``certify.audit`` on two CIFAR-sized networks (a script, not a test).

For a plain VGG-style CNN with BatchNorm and a CIFAR ResNet-18 (both written below in plain torch,
briefly trained on ``shapes10`` so that their weights and BatchNorm statistics are not those of
initialisation), it prints

* the sound network bound of :func:`certify.graph.analyze` (BatchNorm folded, residual paths summed);
* the same composition along the graph with every layer's bound replaced by its exact norm (power
  iteration run to convergence on the layer's Jacobian at a real input: exact for linear layers,
  the local slope for activations): what the bound would be with perfect per-layer bounds;
* the plain product of the per-layer bounds (for the ResNet this ignores the skips and is *not* a
  bound; shown for comparison only);
* the empirical lower bound (Jacobian power iteration plus gradient ascent on difference quotients)
  and the ratios bound / lower;
* the wall time of a full audit of ``--n`` test images (bound, per-layer table, certification) with
  attacks on ``--n-attack`` of them.

Usage::

    python experiments/bench_audit.py                      # both models, 1000 images, attacks on 100
    python experiments/bench_audit.py --quick              # tiny widths and counts, a smoke test
    python experiments/bench_audit.py --device cuda --out runs/bench_audit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.audit import audit, empirical_lipschitz_lower, jacobian_norm_lower
from certify.graph import LayerBound, analyze
from lipnet import data


def plain_cnn(width: int = 64, classes: int = 10) -> nn.Module:
    """VGG-style CIFAR CNN: three stages of two conv-BN-ReLU, 2x2 max pooling, a linear head."""
    layers: list[nn.Module] = []
    cin = 3
    for stage in range(3):
        cout = width * 2**stage
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(cin * 4 * 4, classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The usual CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pooling."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train_briefly(model: nn.Module, train: data.ImageDataset, steps: int, device: torch.device) -> None:
    """A few Adam steps of cross-entropy so that weights and BatchNorm statistics are those of training."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=gen)
        x, y = train.images[idx].to(device), train.labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def exact_layer_norm(iterations: int) -> Callable[[LayerBound], float]:
    """A layer's exact norm from below: converged power iteration on its Jacobian at its recorded input."""

    def value(row: LayerBound) -> float:
        if row.fn is None or row.example is None:
            return row.bound
        return jacobian_norm_lower(row.fn, row.example, iterations=iterations)

    return value


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def bench(name: str, model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    root = Path(args.data_dir)
    train = data.load("shapes10", "train", data_dir=root, n=args.n_train)
    test = data.load("shapes10", "test", data_dir=root, n=args.n)
    model = model.to(device)
    start = time.perf_counter()
    train_briefly(model, train, args.train_steps, device)
    train_s = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(False)
    x = test.images[:8].to(device)
    shape = tuple(test.images.shape[1:])

    start = time.perf_counter()
    analysis = analyze(model, shape, example=x[:2])
    bound_s = time.perf_counter() - start
    exact = analyze(model, shape, example=x[:2], layer_value=exact_layer_norm(args.power_iterations)).bound
    product = math.prod(row.bound for row in analysis.layers if row.folded_into is None)
    start = time.perf_counter()
    lower = empirical_lipschitz_lower(model, x, iterations=50, steps=args.ascent_steps)
    lower_s = time.perf_counter() - start

    batches = [(test.images[i : i + 250], test.labels[i : i + 250]) for i in range(0, len(test), 250)]
    attack = "autoattack" if not args.pgd else "pgd"
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = audit(
        model,
        batches,
        eps=["36/255", "72/255", "108/255"],
        attack=attack,
        n_attack=args.n_attack,
        out_dir=Path(args.out) / name if args.out else None,
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    audit_s = time.perf_counter() - start
    row = {
        "bound": analysis.bound,
        "exact_composed": exact,
        "product_of_layer_bounds": product,
        "empirical_lower": lower,
        "bound_over_lower": _ratio(analysis.bound, lower),
        "exact_composed_over_lower": _ratio(exact, lower),
        "clean_accuracy": report.clean_accuracy,
        "certified_36": report.certified_accuracy[36 / 255],
        "audit_passed": float(report.passed),
        "train_s": train_s,
        "bound_s": bound_s,
        "lower_s": lower_s,
        "audit_s": audit_s,
        **{f"audit_{k}_s": v for k, v in report.timings.items()},
    }
    print(f"\n== {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {device}) ==")
    print(f"sound bound (graph, BN folded)          {analysis.bound:12.6g}   [{bound_s:.1f} s]")
    print(f"exact per-layer norms, composed         {exact:12.6g}")
    print(f"product of per-layer bounds             {product:12.6g}")
    print(f"empirical lower bound                   {lower:12.6g}   [{lower_s:.1f} s]")
    print(f"bound / lower                           {_ratio(analysis.bound, lower):12.4g}")
    print(f"exact composed / lower                  {_ratio(exact, lower):12.4g}")
    print(
        f"clean {100 * report.clean_accuracy:.1f}%, certified at 36/255 {100 * row['certified_36']:.1f}%, "
        f"audit {'PASSED' if report.passed else 'FAILED'}"
    )
    print(
        f"audit of {report.n} images ({attack} on {report.n_attack}): {audit_s:.1f} s "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items())
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-attack", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--power-iterations", type=int, default=200)
    parser.add_argument("--ascent-steps", type=int, default=300)
    parser.add_argument("--pgd", action="store_true", help="PGD instead of AutoAttack")
    parser.add_argument("--quick", action="store_true", help="tiny widths and counts (a smoke test)")
    parser.add_argument("--data-dir", default=os.environ.get("LIPNET_DATA") or tempfile.mkdtemp())
    parser.add_argument("--out", help="folder for the audit reports and bench.json")
    args = parser.parse_args()
    if args.quick:
        args.n, args.n_attack, args.n_train, args.train_steps = 64, 8, 256, 5
        args.power_iterations, args.ascent_steps = 30, 20
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    width = 8 if args.quick else 64
    torch.manual_seed(0)
    results = {
        "plain_cnn_bn": bench("plain_cnn_bn", plain_cnn(width), args, device),
        "resnet18": bench("resnet18", ResNet18(width), args, device),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".bench.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out / "bench.json")


if __name__ == "__main__":
    main()
