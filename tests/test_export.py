"""``lipnet.export``: plain torch layers, identical eval outputs, still bounded by certify."""

from __future__ import annotations

import pytest
import torch
from test_models import SLL_TINY, TINY
from torch import nn

import lipnet
from certify.bounds import lipschitz_bound
from lipnet import models
from lipnet.models.sll import SLLNet

_KINDS = ["aol", "bjorck", "cayley", "sll", "cpl"]


def _trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Move the weights away from their initialisation with two Adam steps, then eval."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn((4, *shape))).square().sum().backward()
        opt.step()
    return model.eval()


def _check_export(model: nn.Module, shape: tuple[int, ...]) -> float:
    exported = lipnet.export(model)
    x = torch.randn((6, *shape))
    with torch.no_grad():
        diff = (exported(x) - model(x)).abs().max().item()
    assert diff <= 1e-6
    assert type(exported) is nn.Sequential
    for m in exported.modules():
        if isinstance(m, nn.Conv2d):
            assert type(m) is nn.Conv2d
        if isinstance(m, nn.Linear):
            assert type(m) is nn.Linear
        assert not hasattr(m, "parametrizations")
    ratio = lipschitz_bound(exported, shape) / model.lipschitz_bound(shape)
    assert ratio == pytest.approx(1.0, rel=0.01)
    return ratio


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_export_every_family(name: str, kind: str) -> None:
    torch.manual_seed(1)
    kwargs, shape = TINY[name]
    _check_export(_trained(models.create(name, conv=kind, **kwargs), shape), shape)


def test_export_sll_net() -> None:
    torch.manual_seed(1)
    kwargs, shape = SLL_TINY
    model = SLLNet(**kwargs, width=4, n_conv=2, n_dense=1, dense_inner=8)  # type: ignore[arg-type]
    _check_export(_trained(model, shape), shape)


def test_export_leaves_the_model_alone_and_is_independent() -> None:
    torch.manual_seed(2)
    kwargs, shape = TINY["bethune_vgg"]
    model = _trained(models.create("bethune_vgg", **kwargs), shape)
    exported = lipnet.export(model)
    assert model[0].__class__.__name__ != "Conv2d" and hasattr(model[0], "parametrizations")
    with torch.no_grad():
        exported[0].weight.zero_()
    x = torch.randn((2, *shape))
    assert not torch.equal(model(x), exported(x))
    assert lipnet.export is not None and "export" in lipnet.__all__
