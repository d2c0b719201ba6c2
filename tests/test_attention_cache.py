"""The normalised attention modules compute their divisor once per weight version in eval mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from catalog import CATALOG
from torch import Tensor

from lipnet.attention._bounds import NormalizedModule
from lipnet.layers.parametrization import EvalTensorCache

_CASES = [
    pytest.param(factory, i, id=f"{cls.__name__}-{i}")
    for cls, factory in CATALOG.items()
    if issubclass(cls, NormalizedModule)
    for i in range(len(factory()))
]


def _count_bound_calls(module: NormalizedModule) -> list[int]:
    """Count the calls of the module's bound computation (``_raw_bound``, or MTAN's per-task bounds)."""
    calls = [0]
    for name in ("_raw_bound", "_task_raw_bounds"):
        original = getattr(module, name, None)
        if original is None:
            continue

        def counted(*args: Any, _original: Callable[..., Tensor] = original, **kwargs: Any) -> Any:
            calls[0] += 1
            return _original(*args, **kwargs)

        object.__setattr__(module, name, counted)
    return calls


def _fresh(module: NormalizedModule, x: Tensor) -> Tensor:
    """The eval output with the divisor recomputed from the current weights (an emptied cache)."""
    module._divisor_cache = EvalTensorCache()
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize(("factory", "index"), _CASES)
def test_divisor_is_cached_per_weight_version(factory: Callable[[], list[Any]], index: int) -> None:
    torch.manual_seed(index)
    case = factory()[index]
    module: NormalizedModule = case.module
    module.normalize = True
    module.eval()
    x = torch.randn(2, *case.input_shape)
    calls = _count_bound_calls(module)
    with torch.no_grad():
        first = module(x)
        repeated = [module(x) for _ in range(3)]
    assert calls[0] == 1, "the bound was recomputed by an eval forward with unchanged weights"
    for y in repeated:
        assert torch.equal(y, first)
    assert torch.equal(_fresh(module, x), first)
    assert calls[0] == 2
    state = {k: v.clone() for k, v in module.state_dict().items()}

    # an optimiser step changes the weights in place: the next eval forward recomputes the bound
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    module(x).square().sum().backward()
    optimizer.step()
    module.eval()
    calls[0] = 0
    with torch.no_grad():
        stepped = module(x)
        assert torch.equal(module(x), stepped)
    assert calls[0] == 1
    assert torch.equal(_fresh(module, x), stepped)
    assert not torch.equal(stepped, first)

    # load_state_dict copies into the same tensors (new versions): recomputed, the old outputs back
    module.load_state_dict(state)
    calls[0] = 0
    with torch.no_grad():
        restored = module(x)
        assert torch.equal(module(x), restored)
    assert calls[0] == 1
    assert torch.equal(restored, first)


def test_cam_maps_and_logits_share_the_forward_divisor() -> None:
    from lipnet.attention import CAMHead

    head = CAMHead(4, 3).eval()
    calls = _count_bound_calls(head)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        logits = head(x)
        maps = head.maps(x)
        from_maps = head.logits_from_maps(maps)
    assert calls[0] == 1
    torch.testing.assert_close(from_maps, logits, rtol=1e-5, atol=1e-6)
