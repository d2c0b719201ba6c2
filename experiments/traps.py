"""The layers whose Lipschitz constant a library gets wrong, with the exact norm and certify's bound.

    python experiments/traps.py

For each trap: what the library claims (or estimates), the exact operator norm on an 8x8 input
(dense float64 matrix, SVD), certify's bound for that size and certify's bound for every input
size. The same cases are regression tests in ``tests/test_conv_norm.py``.
"""

from __future__ import annotations

import torch
from deel.torchlip import ScaledAvgPool2d, SpectralConv2d
from torch import nn

from certify.bounds import lipschitz_bound
from certify.exact import dense_operator_norm


def _exact(module: nn.Module, shape: tuple[int, ...]) -> float:
    module = module.double().eval()
    return dense_operator_norm(lambda x: module(x) - module(torch.zeros_like(x)), shape)


def _reshaped(k: int, padding: int, mode: str) -> nn.Module:
    torch.manual_seed(0)
    return SpectralConv2d(1, k * k, k, padding=padding, padding_mode=mode).vanilla_export()


def _grouped() -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False).double()
    weight = torch.zeros((4, 2, 3, 3), dtype=torch.float64)
    weight[:2, :, 1, 1] = 2 * torch.linalg.qr(torch.randn((2, 2), generator=gen, dtype=torch.float64))[0]
    weight[2:] = 0.1 * torch.randn((2, 2, 3, 3), generator=gen, dtype=torch.float64)
    conv.weight.data.copy_(weight)
    return conv


def _one_by_one_circular() -> nn.Module:
    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="circular", bias=False).double()
    conv.weight.data.fill_(1.0)
    return conv


def main() -> None:
    cases: list[tuple[str, str, nn.Module, tuple[int, ...]]] = [
        ("deel SpectralConv2d 3x3, reflect p1", "1", _reshaped(3, 1, "reflect"), (1, 8, 8)),
        ("deel SpectralConv2d 5x5, reflect p2", "1", _reshaped(5, 2, "reflect"), (1, 8, 8)),
        ("deel SpectralConv2d 5x5, replicate p2", "1", _reshaped(5, 2, "replicate"), (1, 8, 8)),
        ("deel SpectralConv2d 3x3, circular p2", "1", _reshaped(3, 2, "circular"), (1, 8, 8)),
        ("1x1 conv (weight 1), circular p1", "1 (= |w|)", _one_by_one_circular(), (1, 8, 8)),
        ("deel ScaledAvgPool2d(2, ceil_mode) on 5x5", "1", ScaledAvgPool2d(2, ceil_mode=True), (1, 5, 5)),
        ("grouped conv, one group 2·orthogonal", "1.01 (orthogonium)", _grouped(), (4, 8, 8)),
    ]
    print("| layer | claimed | exact (this size) | certify, this size | certify, every size |")
    print("|---|---:|---:|---:|---:|")
    for name, claim, module, shape in cases:
        module = module.double().eval()
        exact = _exact(module, shape)
        sized = lipschitz_bound(module, shape)
        every = lipschitz_bound(module)
        print(f"| {name} | {claim} | {exact:.4f} | {sized:.4f} | {every:.4f} |")


if __name__ == "__main__":
    main()
