"""torch.compile: a compiled training step of every model family with every layer kind it takes gives the
eager step's outputs, gradients and (after the update) sound bounds; ``compile: true`` trains and certifies.

Compiled on the CPU with ``backend="aot_eager"`` (dynamo's capture and AOTAutograd's joint graph, eager
kernels): what inductor and CUDA graphs then do to that graph changes no semantics. Bounds and
certificates are never computed by compiled code (certify reads the weights in float64, eagerly).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from certify.bounds import lipschitz_bound
from lipnet.layers.batching import batch_weights
from lipnet.layers.kinds import list_layer_kinds
from lipnet.models import create
from lipnet.training.config import Config, ConfigError, load_config
from lipnet.training.run import train

#: The smallest model of each family the constructors accept (one model per family).
FAMILIES: dict[str, dict[str, Any]] = {
    "small_cnn": {"width": 2, "input_size": 4},
    "bethune_vgg": {"widths": (2, 4), "depths": (1, 1), "hidden": 2, "input_size": 4},
    "fmnist_convnet_s": {"input_size": 4},
    "lipconvnet_xs": {"input_size": 4},
    "liresnet": {"width": 4, "depth": 1, "hidden": 4, "input_size": 8},
    "sll_small": {"input_size": 4},
}
#: Kinds whose compilation takes a minute on a loaded CPU (orthogonium's AOC layer, the Cayley FFT layer):
#: compiled in one family, whose layers are the same code as in every other family.
_EXPENSIVE = {"aoc": "bethune_vgg", "cayley": "bethune_vgg"}


def _cases() -> list[Any]:
    cases = []
    for family, kwargs in FAMILIES.items():
        for kind in list_layer_kinds() if family != "sll_small" else [None]:
            if kind in _EXPENSIVE and _EXPENSIVE[kind] != family:
                continue
            try:
                create(family, **kwargs, **({} if kind is None else {"conv": kind}))
            except (ValueError, ImportError):  # the family refuses the kind, or orthogonium is missing
                continue
            marks = [pytest.mark.slow] if kind in _EXPENSIVE else []
            cases.append(pytest.param(family, kind, marks=marks, id=f"{family}-{kind}"))
    return cases


@pytest.mark.parametrize(("family", "kind"), _cases())
def test_compiled_training_step_matches_eager(family: str, kind: str | None) -> None:
    torch.manual_seed(0)
    eager = batch_weights(create(family, **FAMILIES[family], **({} if kind is None else {"conv": kind})))
    twin = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, *eager.input_shape, generator=gen)
    y = torch.randint(0, eager(x).shape[1], (2,), generator=gen)
    compiled = torch.compile(twin, backend="aot_eager")
    results = []
    for model, run in ((eager, eager), (twin, compiled)):
        # SGD keeps the updates proportional to the gradients (Adam's normalisation would magnify
        # float-rounding differences of tiny gradients into different steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        logits = run(x)
        nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logits.detach(), grads, lipschitz_bound(model.eval(), eager.input_shape)))
    (logits, grads, bound), (c_logits, c_grads, c_bound) = results
    # float32 rounding (u = 6e-8) of the same operations in another order (AOTAutograd decomposes some),
    # amplified by up to 25 orthogonalisation steps: far below 1e-4 on these O(1) quantities
    torch.testing.assert_close(c_logits, logits, atol=1e-5, rtol=1e-5)
    assert len(c_grads) == len(grads)
    for c, g in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(c, g, atol=1e-4, rtol=1e-4)
    assert c_bound == pytest.approx(bound, rel=1e-4)


def test_compile_mode_is_checked() -> None:
    cfg = load_config(None, ["compile=true", "compile_mode=reduce-overhead"])
    assert cfg.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        load_config(None, ["compile_mode=fast"])


@pytest.mark.slow
def test_train_with_compile_certifies_the_eager_model(
    tmp_path: Path, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = torch.compile

    def aot_eager(model: nn.Module, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", functools.partial(aot_eager))
    cfg = tiny_config(tmp_path / "run", "compile=true", "optim.epochs=1")
    result = train(cfg, progress=False)
    assert seen == [{"mode": "default"}]
    assert result.finished and result.results is not None
    cert = result.results["certify"]
    # certified on the eager model (float32 forward, float64 bound), which the run returns uncompiled
    assert not isinstance(result.model, torch._dynamo.eval_frame.OptimizedModule)
    assert cert["n"] == 32 and 0 < cert["lipschitz"] <= 1 + 1e-5
