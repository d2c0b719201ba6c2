"""AutoAttack on a lipnet run's model on the CPU, before and after the attacks froze the parameters.

    python experiments/autoattack_timing.py RUN [--n 100] [--before-n 10] [--eps 0.5] [--threads 2]

Issue 15 found that AutoAttack did not finish on a CPU: the attacks ran the model with trainable
parameters, so every forward pass of every attack step recomputed each Björck weight under autograd,
and pyautoattack's ``custom`` version kept its constructor's 5 APGD-CE restarts. ``certify.attacks``
now runs every attack under :func:`certify.attacks.frozen` (parameters frozen: a cached
parametrization computes its weight once) with standard AutoAttack's one restart.

This script times :func:`certify.attacks.autoattack_l2` (APGD-CE + APGD-T, L2, one radius) on the
first ``--n`` test images as it is, then on the first ``--before-n`` images with the old behaviour
put back for the call (``frozen`` replaced by eval mode alone, 5 APGD-CE restarts), and prints both
times, the per-image ratio, and the robust accuracies. The old behaviour is re-created in this
process rather than checked out, so both sides use the same data, model file and machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from certify import attacks
from lipnet.training.run import load_run_model, load_split


@contextlib.contextmanager
def _eval_only(model: nn.Module) -> Iterator[nn.Module]:
    """What the attacks did before: eval mode, parameters left trainable."""
    mode = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(mode)


def _timed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[float, float]:
    start = time.perf_counter()
    adv = attacks.autoattack_l2(model, x, y, eps)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        robust = (model(adv).argmax(1) == y).float().mean().item()
    return seconds, robust


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a lipnet run folder")
    parser.add_argument("--n", type=int, default=100, help="images attacked after the change")
    parser.add_argument("--before-n", type=int, default=10, help="images attacked with the old behaviour")
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg = load_run_model(args.run, device="cpu")
    test = load_split(cfg, "test")
    x, y = test.images[: args.n], test.labels[: args.n]

    after_s, after_acc = _timed(model, x, y, args.eps)
    per_image = after_s / args.n
    print(f"after:  {args.n} images in {after_s:.1f} s ({per_image:.2f} s/image), robust {after_acc:.1%}")

    frozen, autoattack = attacks.frozen, attacks.autoattack_l2

    def five_restarts(*a: object, **k: object) -> torch.Tensor:
        # autoattack_l2 sets one restart on the adversary it builds; the old code left pyautoattack's 5.
        import pyautoattack

        original = pyautoattack.AutoAttack.run_standard_evaluation

        def run(self: pyautoattack.AutoAttack, *ra: object, **rk: object) -> object:
            self.apgd.n_restarts = 5
            return original(self, *ra, **rk)

        pyautoattack.AutoAttack.run_standard_evaluation = run  # type: ignore[method-assign]
        try:
            return autoattack(*a, **k)  # type: ignore[arg-type]
        finally:
            pyautoattack.AutoAttack.run_standard_evaluation = original  # type: ignore[method-assign]

    xb, yb = x[: args.before_n], y[: args.before_n]
    after_small_s, _ = _timed(model, xb, yb, args.eps)
    attacks.frozen = _eval_only  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        adv = five_restarts(model, xb, yb, args.eps)
        before_s = time.perf_counter() - start
    finally:
        attacks.frozen = frozen
    with torch.no_grad():
        before_acc = (model(adv).argmax(1) == yb).float().mean().item()
    print(
        f"before: {args.before_n} images in {before_s:.1f} s ({before_s / args.before_n:.2f} s/image), "
        f"robust {before_acc:.1%}; after on the same {args.before_n}: {after_small_s:.1f} s; "
        f"ratio {before_s / after_small_s:.1f}x"
    )


if __name__ == "__main__":
    main()
