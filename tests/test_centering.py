"""BatchCentering: running statistics through a state_dict, the plain export, the model option.

(Its eval-mode bound is in the generic soundness test, tests/catalog.py; the training map of the whole
batch in tests/test_layers.py; the synchronised batch mean under DDP in tests/test_ddp.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipnet
from certify.bounds import lipschitz_bound
from certify.contract import FLOAT64_SLACK
from lipnet.layers import BatchCentering, InputSizeUnknownError
from lipnet.models import create


def _trained(layer: BatchCentering, shape: tuple[int, ...], steps: int = 5) -> BatchCentering:
    """A few training batches (shifted per channel) and a bias step, so that every state is non-trivial."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1) if layer.bias is not None else None
    offset = torch.arange(layer.num_features, dtype=torch.float32).view(1, -1, *([1] * (len(shape) - 2)))
    for _ in range(steps):
        y = layer(torch.randn(shape, generator=g) + offset)
        if opt is not None:
            opt.zero_grad()
            (y * torch.randn(y.shape, generator=g)).sum().backward()
            opt.step()
    return layer.eval()


@pytest.mark.parametrize("momentum", [0.3, None])
def test_state_dict_round_trip_into_a_fresh_layer(momentum: float | None) -> None:
    layer = _trained(BatchCentering(3, momentum=momentum), (8, 3, 4, 4))
    state = layer.state_dict()
    assert set(state) == {"running_mean", "num_batches_tracked", "bias"}
    assert int(state["num_batches_tracked"]) == 5
    fresh = BatchCentering(3, momentum=momentum)
    fresh.load_state_dict(state)  # strict
    fresh.eval()
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fresh(x), layer(x))


def test_cumulative_average_without_momentum() -> None:
    layer = BatchCentering(2, momentum=None, bias=False)
    batches = [torch.randn(4, 2, 3) + k for k in range(4)]
    for b in batches:
        layer(b)
    expected = torch.stack([b.mean(dim=(0, 2)) for b in batches]).mean(dim=0)
    torch.testing.assert_close(layer.running_mean, expected)


def test_a_state_dict_saved_before_the_counter_loads() -> None:
    """A checkpoint of the layer as it was (running_mean and bias, version 1) loads strictly, with the
    counter at 0; so does a dict without torch's metadata (what a safetensors file gives)."""
    layer = _trained(BatchCentering(3), (6, 3))
    versioned = layer.state_dict()
    del versioned["num_batches_tracked"]
    versioned._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    bare = {k: v for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    for state in (versioned, bare):
        fresh = BatchCentering(3)
        fresh.load_state_dict(state)
        assert int(fresh.num_batches_tracked) == 0
        assert torch.equal(fresh.running_mean, layer.running_mean)
    # a version-2 checkpoint without the counter is damaged: the strict load says what is missing
    current = layer.state_dict()
    del current["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BatchCentering(3).load_state_dict(current)


@pytest.mark.parametrize(
    ("shape", "plain"),
    [((5, 3), nn.BatchNorm1d), ((5, 3, 7), nn.BatchNorm1d), ((5, 3, 4, 4), nn.BatchNorm2d)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_export_is_a_plain_batchnorm_with_the_same_outputs(
    shape: tuple[int, ...], plain: type[nn.Module], bias: bool
) -> None:
    layer = _trained(BatchCentering(3, bias=bias), shape)
    exported = layer.export()
    assert type(exported) is plain and not exported.training
    assert not any(p.requires_grad for p in exported.parameters())
    x = 10 * torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(exported(x), layer(x))  # CPU: the same one rounding of x + (b - mu)
    bound = lipschitz_bound(exported, shape[1:])
    assert 1.0 <= bound <= 1.0 + 4 * FLOAT64_SLACK


def test_export_before_a_forward_pass_asks_for_one() -> None:
    fresh = BatchCentering(3)
    with pytest.raises(InputSizeUnknownError, match="forward pass"):
        fresh.export()


def test_small_cnn_with_centering_trains_loads_and_exports() -> None:
    torch.manual_seed(0)
    model = create("small_cnn", in_channels=1, num_classes=4, width=4, input_size=8, norm="centering")
    assert sum(isinstance(m, BatchCentering) for m in model.modules()) == 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    # a fresh model loads the state_dict (running means and counters included) and has not seen an input
    fresh = create("small_cnn", in_channels=1, num_classes=4, width=4, input_size=8, norm="centering")
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # the export walker runs one forward pass (model.input_shape) for the BatchCentering layers' rank
    exported = lipnet.export(fresh)
    assert not any(isinstance(m, BatchCentering) for m in exported.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in exported.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)
    # the same sound bound with or without the centering layers (each is a translation)
    plain = create("small_cnn", in_channels=1, num_classes=4, width=4, input_size=8)
    kept = [m for m in model if not isinstance(m, BatchCentering)]
    plain.load_state_dict(nn.Sequential(*kept).state_dict())
    without = lipschitz_bound(plain.eval(), (1, 8, 8))
    assert lipschitz_bound(model, (1, 8, 8)) == pytest.approx(without, rel=1e-12)
    assert lipschitz_bound(exported, (1, 8, 8)) <= lipschitz_bound(model, (1, 8, 8)) * (1 + 1e-6)


def test_small_cnn_rejects_an_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        create("small_cnn", norm="batch")
