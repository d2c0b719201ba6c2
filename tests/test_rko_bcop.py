"""The ``rko_bcop`` kind: RKO convolutions, BCOP where an RKO layer would be a fixed patch embedding."""

from __future__ import annotations

import pytest
import torch

from lipnet.layers import BCOPConv2d, BjorckConv2d, get_layer_kind
from lipnet.models import create


def _kind(layer: torch.nn.Module) -> type:
    """BCOPConv2d or BjorckConv2d (a parametrized layer's class is a generated subclass)."""
    matches = [cls for cls in (BCOPConv2d, BjorckConv2d) if isinstance(layer, cls)]
    assert len(matches) == 1
    return matches[0]


@pytest.mark.parametrize(
    ("c_in", "c_out", "expected"),
    [
        (1, 16, BCOPConv2d),
        (1, 9, BCOPConv2d),
        (3, 27, BCOPConv2d),
        (3, 26, BjorckConv2d),
        (16, 32, BjorckConv2d),
    ],
)
def test_conv_is_bcop_exactly_where_rko_degenerates(c_in: int, c_out: int, expected: type) -> None:
    conv = get_layer_kind("rko_bcop").conv(c_in, c_out, 3)
    assert _kind(conv) is expected and conv.padding == (1, 1)
    assert _kind(get_layer_kind("rko_bcop").block(c_out, 3)) is BjorckConv2d


def _position_gram(conv: BjorckConv2d, x: torch.Tensor) -> torch.Tensor:
    """Inner products between the layer's output vectors at every pair of positions."""
    y = conv(x).flatten(2)[0]  # (c_out, positions)
    return y.T @ y


@pytest.mark.parametrize(("c_in", "c_out", "degenerate"), [(1, 9, True), (1, 16, True), (2, 16, False)])
def test_rko_with_out_at_least_in_k2_is_a_fixed_embedding_up_to_rotation(
    c_in: int, c_out: int, degenerate: bool
) -> None:
    """Two converged RKO layers with ``c_out >= c_in k^2`` give outputs with the same inner products at
    every pair of positions (they differ by a rotation of the channels), whatever their weights: the
    reason the kind puts BCOP there. With ``c_out < c_in k^2`` (18 > 16) the layers differ."""
    torch.manual_seed(0)
    x = torch.randn(1, c_in, 6, 6, dtype=torch.float64)
    grams = []
    for _ in range(2):
        conv = BjorckConv2d(c_in, c_out, 3, padding=1, bias=False).double().eval()
        grams.append(_position_gram(conv, x))
    assert torch.allclose(grams[0], grams[1], atol=1e-9) is degenerate


def test_fashion_network_has_a_bcop_stem_and_rko_after() -> None:
    model = create("fmnist_convnet_s", conv="rko_bcop", blocks=0, hidden=16).eval()
    convs = [m for m in model.modules() if isinstance(m, (BCOPConv2d, BjorckConv2d))]
    assert [_kind(m) for m in convs] == [BCOPConv2d, BjorckConv2d]
    assert model.lipschitz_bound() <= 1 + 1e-6
