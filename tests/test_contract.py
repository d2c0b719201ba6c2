"""The contract and the registry: the one "redefines forward" check, the public Protocol, and the one
table of activation constants serving module and functional forms alike."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from certify.bounds import lipschitz_bound, module_bound
from certify.contract import (
    LipschitzBounded,
    UnboundableModuleError,
    is_plain,
    redefines_behaviour,
    registered_bound,
    require_plain,
)
from certify.graph import analyze
from certify.rules.activations import ACTIVATIONS, Activation


class _TenTimes(nn.Hardtanh):
    def forward(self, x: Tensor) -> Tensor:
        return 10 * x


class _Mixed(nn.ReLU6, _TenTimes):
    """nn.ReLU6 inherits Hardtanh's forward; _TenTimes sits between them in the MRO: _Mixed computes 10 x."""


def test_a_forward_inherited_from_behind_the_registered_class_cancels_its_bound() -> None:
    # The MRO is _Mixed, ReLU6, _TenTimes, Hardtanh: ReLU6 is registered (bound 1) and defines no
    # forward of its own, so _Mixed's forward is _TenTimes's. A check of the classes before ReLU6
    # alone (_Mixed) saw no redefinition and gave 10 x the bound 1.
    module = _Mixed()
    assert torch.equal(module(torch.ones(3)), torch.full((3,), 10.0))
    assert redefines_behaviour(_Mixed, nn.ReLU6) == ("forward",)
    assert registered_bound(module) is None
    assert lipschitz_bound(module, (4,)) == pytest.approx(10.0)  # bounded along its graph instead


def test_one_check_serves_registrations_plain_layers_and_folding() -> None:
    class Doubled(nn.Conv2d):
        def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return 2 * super()._conv_forward(x, weight, bias)

    conv, doubled = nn.Conv2d(1, 1, 3), Doubled(1, 1, 3)
    assert redefines_behaviour(Doubled, nn.Conv2d) == ("_conv_forward",)
    assert redefines_behaviour(nn.Conv2d, nn.Conv2d) == ()
    assert is_plain(conv, nn.Conv2d) and not is_plain(doubled, nn.Conv2d)
    assert registered_bound(doubled) is None
    with pytest.raises(UnboundableModuleError, match="redefines _conv_forward"):
        require_plain(doubled, nn.Conv2d)
    conv.register_forward_hook(lambda module, args, out: 2 * out)
    assert not is_plain(conv, nn.Conv2d)
    with pytest.raises(ValueError, match="hooks"):
        require_plain(conv, nn.Conv2d)


def test_lipschitz_bounded_is_the_public_protocol() -> None:
    class Own(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 3 * x

        def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
            return 3.0

    assert isinstance(Own(), LipschitzBounded)
    assert not isinstance(nn.Linear(2, 2), LipschitzBounded)
    assert module_bound(Own()) == 3.0


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # nn.Softmax() and F.softmax without dim
@pytest.mark.parametrize(
    "activation",
    [a for a in ACTIVATIONS if a.modules and a.functions and not any(p.required for p in a.params)],
    ids=lambda a: a.modules[0].__name__,
)
def test_module_and_functional_forms_read_one_constant(activation: Activation) -> None:
    """The registered bound of each module equals the graph rule of its functional form (defaults)."""
    function = activation.functions[0]

    class Functional(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return function(x)

    for cls in activation.modules:
        module = cls().eval()
        assert module_bound(module) == analyze(Functional(), (5,)).bound == analyze(module, (5,)).bound
