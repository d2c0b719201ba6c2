"""lipnet.layers.batching: the batched Björck weights are the per-layer ones (values and gradients), the
batcher's lifetime (one forward pass), its fallbacks, and the bucketing rule."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lipnet.layers import BCOPConv2d, BjorckConv2d, BjorckLinear, BjorckOrthonormal, bjorck
from lipnet.layers.batching import WeightBatcher, _units, batch_weights, buckets
from lipnet.layers.bjorck import bjorck_gram_transform, gram_norm_bound
from lipnet.models import create


class _Net(nn.Module):
    """Björck layers of four sizes (tall, wide, grouped, square) and one layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = BjorckConv2d(2, 6, 3, padding=1)  # 6 x 18: wide
        self.grouped = BjorckConv2d(6, 4, 1, groups=2)  # 2 x (2 x 3): tall per group
        self.twice = BjorckLinear(4, 4)  # square, applied twice
        self.head = BjorckLinear(4, 9)  # 9 x 4: tall
        self.plain = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(self.stem(x)).mean(dim=(2, 3))
        return self.plain(self.head(self.twice(self.twice(h))))


def _pair(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    per_layer = _Net().to(dtype)
    with torch.no_grad():  # raw weights far from orthogonal, so that the iteration has work to do
        for p in per_layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return per_layer, batch_weights(copy.deepcopy(per_layer), max_padding=1e9)


def test_padded_gram_transform_is_the_per_matrix_transform() -> None:
    gen = torch.Generator().manual_seed(0)
    sides = [3, 7, 5]
    mats = [torch.randn(m, m + 4, generator=gen, dtype=torch.float64) for m in sides]
    grams = [w @ w.T for w in mats]
    padded = torch.zeros(3, 7, 7, dtype=torch.float64)
    for i, (m, g) in enumerate(zip(sides, grams, strict=True)):
        padded[i, :m, :m] = g
    scale = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    batched = bjorck_gram_transform(padded, 3, order=2, scale=scale)
    bounds = gram_norm_bound(padded, 2)
    for i, (m, g) in enumerate(zip(sides, grams, strict=True)):
        alone = bjorck_gram_transform(g[None], 3, order=2, scale=scale[i : i + 1])[0]
        torch.testing.assert_close(batched[i, :m, :m], alone, atol=1e-13, rtol=0)
        torch.testing.assert_close(bounds[i], gram_norm_bound(g, 2), atol=0, rtol=1e-14)
        # the padding block stays diagonal and never mixes with the matrix
        assert not batched[i, :m, m:].any() and not batched[i, m:, :m].any()


def _assert_same_outputs_and_gradients(
    per_layer: nn.Module, batched: nn.Module, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """float64: outputs within 1e-12 and every parameter's gradient of ``loss`` within 1e-11 (absolute)."""
    out_ref, out = per_layer(x), batched(x)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=0)
    loss(out_ref).backward()
    loss(out).backward()
    for (name, p), q in zip(per_layer.named_parameters(), batched.parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-11, rtol=0, msg=name)


@pytest.mark.parametrize("max_padding", [1.0, 4.0, 1e9])
def test_batched_weights_and_gradients_match_per_layer(max_padding: float) -> None:
    per_layer, batched = _pair()
    batch_weights(batched, max_padding=max_padding)
    _assert_same_outputs_and_gradients(
        per_layer, batched, torch.randn(3, 2, 5, 5, dtype=torch.float64), lambda out: out.square().sum()
    )


def test_bcop_frames_are_batched_and_match_per_layer() -> None:
    # BCOP's frames (six 6 x 3 and six 6 x 3 matrices) share the batched call with the Björck weights; the
    # kernels built from them, the outputs and every gradient are the per-layer ones
    torch.manual_seed(0)
    per_layer = nn.Sequential(
        BjorckConv2d(2, 6, 3, padding=1),
        BCOPConv2d(6, 6, 3, padding=1),
        BCOPConv2d(6, 4, 3, padding=1),
        nn.Flatten(),
        BjorckLinear(4 * 5 * 5, 3),
    ).double()
    with torch.no_grad():
        for p in per_layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batched = batch_weights(copy.deepcopy(per_layer), max_padding=1e9)
    assert len(batched.weight_batcher.members) == 4

    def not_per_layer(original: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a BCOP layer orthonormalised its own frames in a batched training forward")

    for layer in (batched[1], batched[2]):
        layer.parametrizations.weight[0].compute = not_per_layer
    _assert_same_outputs_and_gradients(
        per_layer, batched, torch.randn(3, 2, 5, 5, dtype=torch.float64), lambda out: out.square().sum()
    )


def test_batched_weights_are_the_per_layer_ones_in_float32() -> None:
    # float32 differs by the summation order only; the Björck weights are contractions either way
    per_layer, batched = _pair(dtype=torch.float32)
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(batched(x), per_layer(x), atol=2e-5, rtol=0)


def test_batched_gradients_pass_gradcheck() -> None:
    _, batched = _pair()
    names = [n for n, _ in batched.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in batched.parameters())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        # functional_call swaps the raw weights: the batcher sees them as the parametrizations' originals
        return functional_call(batched, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_one_computation_per_forward_and_reused_by_a_layer_applied_twice() -> None:
    _, net = _pair()
    batcher = net.weight_batcher
    assert isinstance(batcher, WeightBatcher) and len(batcher.members) == 4
    seen: list[torch.Tensor] = []
    handle = net.twice.register_forward_pre_hook(lambda m, args: seen.append(m.weight))
    calls = []
    original = batcher._compute

    def counted() -> None:
        calls.append(1)
        original()

    batcher._compute = counted  # type: ignore[method-assign]
    net(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    handle.remove()
    assert len(calls) == 1 and len(seen) == 2 and seen[0] is seen[1]
    # the weights and their graph are released with the pass
    assert batcher._weights == {} and batcher._depth == 0


def test_outside_a_forward_eval_mode_and_errors_fall_back_to_the_layer() -> None:
    per_layer, net = _pair()
    # outside the model's forward: the layer computes its own weight
    torch.testing.assert_close(net.head.weight, per_layer.head.weight, atol=1e-13, rtol=0)
    net.eval()
    per_layer.eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), per_layer(x), atol=1e-13, rtol=0)
    net.train()
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 3, 4, 4, dtype=torch.float64))  # wrong channels: the stem raises
    assert net.weight_batcher._weights == {} and net.weight_batcher._depth == 0


def test_copies_keep_their_own_batcher_and_the_state_dict_is_unchanged() -> None:
    per_layer, net = _pair()
    assert net.state_dict().keys() == per_layer.state_dict().keys()
    # (torch refuses to pickle parametrized modules; checkpoints are state dicts)
    for clone in (copy.deepcopy(net),):
        batcher = clone.weight_batcher
        assert batcher is not net.weight_batcher
        assert all(p.batcher is batcher for _, p in batcher.members)
        members = {id(m) for m in clone.modules()}
        assert all(id(plist) in members for plist, _ in batcher.members)
        x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(clone(x), per_layer(x), atol=1e-12, rtol=0)


def test_rebatching_replaces_and_remove_detaches() -> None:
    _, net = _pair()
    first = net.weight_batcher
    batch_weights(net)
    second = net.weight_batcher
    assert second is not first and first.handles == [] and all(p.batcher is second for _, p in first.members)
    second.remove()
    assert all(p.batcher is None for _, p in second.members)
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_a_member_detached_from_the_batcher_computes_its_own_weight() -> None:
    per_layer, net = _pair()
    head = net.head.parametrizations.weight[0]
    head.batcher = None
    assert all(item.parametrization is not head for item in net.weight_batcher._eligible())
    net.train()
    per_layer.train()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    assert torch.allclose(net(x), per_layer(x), rtol=1e-10, atol=1e-12)


def test_only_bjorck_parametrizations_first_on_their_weight_are_batched() -> None:
    conv = BCOPConv2d(3, 4, 3)
    net = nn.Sequential(bjorck(nn.Linear(3, 4)), nn.Linear(4, 4), BjorckLinear(4, 2), conv)
    batch_weights(net)
    assert [type(p).__name__ for _, p in net.weight_batcher.members] == ["BjorckOrthonormal"] * 3
    # BCOP's frames: the first of the weight's two parametrizations, the kernel built from its output
    assert net.weight_batcher.members[2][1] is conv.parametrizations.weight[0]
    # a parametrization chained after another one receives that one's output, not the raw weight
    chained = nn.Linear(3, 4)
    torch.nn.utils.parametrize.register_parametrization(chained, "weight", nn.Identity())
    bjorck(chained)
    assert batch_weights(nn.Sequential(chained)).weight_batcher.members == []


def test_buckets_group_equal_sides_and_bound_the_padding() -> None:
    assert buckets([4, 8, 4, 2], [1, 1, 1, 1], 1.0) == [[1], [0, 2], [3]]
    # 128 with a 64: padded 2 * 128^3 <= 2 * (128^3 + 64^3)
    assert buckets([64, 128], [1, 1], 2.0) == [[1, 0]]
    assert buckets([64, 128], [1, 1], 1.5) == [[1], [0]]
    # counts weigh both sides: 3 matrices of side 64 with one of 128
    assert buckets([128, 64], [1, 3], 2.0) == [[0], [1]]
    sides = [10, 27, 32, 64, 64, 128]
    for limit in (1.0, 2.0, 16.0, 1e9):
        flat = sorted(i for bucket in buckets(sides, [1] * 6, limit) for i in bucket)
        assert flat == list(range(6))
    assert len(buckets(sides, [1] * 6, 1e9)) == 1
    with pytest.raises(ValueError, match="max_padding"):
        buckets([1], [1], 0.5)


def test_zero_weight_has_finite_gradients() -> None:
    for net in (_pair()[0], _pair()[1]):
        with torch.no_grad():
            net.head.parametrizations.weight.original.zero_()
        net(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        assert net.head.weight.abs().max() == 0


@pytest.mark.parametrize("conv", ["bjorck", "bcop", "aol"])
def test_weights_stay_float32_under_bf16_autocast(conv: str) -> None:
    # the orthogonalisation / rescaling runs outside autocast: the weight a layer uses in an autocast
    # forward is the float32 weight of a float32 forward, batched or not
    torch.manual_seed(0)
    model = batch_weights(create("small_cnn", width=4, input_size=8, conv=conv))
    x = torch.rand(2, 3, 8, 8)
    layers = [m for m in model.modules() if hasattr(m, "parametrizations")]
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}
    for m in layers:
        m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(mod.weight.detach().clone()))
    model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    for m in layers:
        full, under_autocast = seen[id(m)]
        assert under_autocast.dtype == torch.float32
        assert torch.equal(under_autocast, full)


def _settings_pair(order: int, iterations: int, bound_steps: int) -> tuple[nn.Module, nn.Module]:
    """Wide, tall, square and rank-deficient Björck layers with the given settings, per layer and batched."""
    torch.manual_seed(1)
    layers = [nn.Linear(7, 3), nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 4)]
    with torch.no_grad():
        layers[3].weight[1] = layers[3].weight[0]  # equal rows: a rank-deficient Gram matrix
    for layer in layers:
        settings = {"order": order, "train_iterations": iterations, "bound_steps": bound_steps}
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", BjorckOrthonormal(**settings))
    per_layer = nn.Sequential(*layers).double()
    return per_layer, batch_weights(copy.deepcopy(per_layer), max_padding=1e9)


@pytest.mark.parametrize(("order", "iterations", "steps"), [(1, 1, 0), (1, 4, 1), (2, 3, 2), (3, 2, 3)])
def test_hand_written_backward_is_autograds_for_every_setting(
    order: int, iterations: int, steps: int
) -> None:
    # the batched node differentiates by hand (reverse pass of the polynomial steps, closed-form derivative
    # of the Gram-iteration bound); the per-layer path is autograd through the same function (its
    # near-square matrices iterate on W itself: the same iterates in exact arithmetic), so in float64 they
    # agree to a few hundred ulps of the O(1) weights and gradients
    per_layer, batched = _settings_pair(order, iterations, steps)
    _assert_same_outputs_and_gradients(
        per_layer, batched, torch.randn(5, 7, dtype=torch.float64), lambda out: out.sin().sum()
    )


def test_batched_float32_weights_are_as_accurate_as_the_per_layer_ones() -> None:
    # Both float32 paths round the same exact weights; the batched one sums in another order (padded Gram
    # matrices, a different bmm order), not more steps. So its error against the float64 weights is bounded
    # by the per-layer path's error up to a small factor, plus a few ulps (u = 2^-24) of the O(1) entries.
    per_layer, batched = _pair(dtype=torch.float32)
    exact = copy.deepcopy(per_layer).double()
    x = torch.randn(2, 2, 4, 4)
    weights: list[dict[str, torch.Tensor]] = []
    for net, dtype in ((per_layer, torch.float32), (batched, torch.float32), (exact, torch.float64)):
        seen: dict[str, torch.Tensor] = {}
        names = {m: name for name, m in net.named_modules() if hasattr(m, "parametrizations")}

        def keep(
            module: nn.Module, args: object, out: dict[str, torch.Tensor] = seen, key: dict = names
        ) -> None:
            out.setdefault(key[module], module.weight)  # the first use (a layer applied twice reuses it)

        for m in names:
            m.register_forward_pre_hook(keep)
        net(x.to(dtype))
        weights.append(seen)
    u = 2.0**-24
    assert len(weights[2]) == 4
    for name, w_exact in weights[2].items():
        err_per_layer = (weights[0][name].double() - w_exact).abs().max().item()
        err_batched = (weights[1][name].double() - w_exact).abs().max().item()
        assert err_batched <= 4 * err_per_layer + 16 * u, (name, err_batched, err_per_layer)


class _SameColumns(nn.Module):
    """Wide one-group layers with 12 input columns (rows 3, 5, 5 and 12) and a grouped one, so that units
    stack equal shapes, pad rows, and keep a grouped layer alone; ``skip`` leaves one layer unused."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = BjorckLinear(12, 3), BjorckLinear(12, 5), BjorckLinear(12, 5)
        self.d = BjorckConv2d(12, 12, 1)
        self.e = BjorckConv2d(12, 6, 1, groups=3)
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.e(self.d(x[:, :, None, None]))[:, :, 0, 0]
        out = self.a(x).sum(1) + self.b(x).sum(1) + h.sum(1)
        return out if self.skip else out + self.c(x).sum(1)


@pytest.mark.parametrize("skip", [False, True])
def test_units_pad_rows_and_stack_equal_shapes(skip: bool) -> None:
    torch.manual_seed(2)
    per_layer = _SameColumns().double()
    with torch.no_grad():
        for p in per_layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batched = batch_weights(copy.deepcopy(per_layer), max_padding=1e9)
    per_layer.skip = batched.skip = skip
    items = batched.weight_batcher._eligible()  # the grouping itself: a, b, c and d share one unit
    assert sorted(map(sorted, _units(items, 1e9))) == [[0, 1, 2, 3], [4]]
    assert sorted(map(sorted, _units(items, 1.0))) == [[0], [1, 2], [3], [4]]
    x = torch.randn(4, 12, dtype=torch.float64)
    out_ref, out = per_layer(x), batched(x)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=0)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p), q in zip(per_layer.named_parameters(), batched.parameters(), strict=True):
        assert (q.grad is None) == (p.grad is None) == (skip and name.startswith("c.")), name
        if p.grad is None:
            continue
        torch.testing.assert_close(q.grad, p.grad, atol=1e-11, rtol=0, msg=name)
    names = [n for n, _ in batched.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in batched.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(batched, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)
