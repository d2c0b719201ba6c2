"""The model families behind ``lipnet.models.create``: build, train a step, bound, certify, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from certify.bounds import lipschitz_bound
from certify.radius import split_head
from lipnet import models
from lipnet.layers.kinds import list_layer_kinds
from lipnet.models.lipconvnet import ChannelPad, FirstChannels, LipConvNet
from lipnet.models.sequential import LipschitzSequential
from lipnet.models.vgg import BethuneVGG
from lipnet.training.build import build_model
from lipnet.training.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"
KINDS = [k for k in list_layer_kinds() if k != "aoc"]  # aoc wraps the optional orthogonium

# name -> (tiny keyword arguments, per-sample input shape)
TINY: dict[str, tuple[dict[str, object], tuple[int, int, int]]] = {
    "bethune_vgg": (
        dict(in_channels=1, num_classes=3, input_size=4, widths=(2, 4), depths=(1, 2), hidden=6),
        (1, 4, 4),
    ),
    "lipconvnet_xs": (dict(in_channels=3, num_classes=3, input_size=4, depth=1), (3, 4, 4)),
    "liresnet": (dict(in_channels=2, num_classes=3, input_size=8, width=4, depth=2, hidden=6), (2, 8, 8)),
}
SLL_TINY = (dict(in_channels=3, num_classes=3, input_size=4), (3, 4, 4))


def _train_step(model: nn.Module, shape: tuple[int, ...]) -> None:
    """One Adam step on a random batch; the loss must be finite and some weight must change."""
    model.train()
    x = torch.randn((8, *shape))
    y = torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    model.eval()


def _head_rounding(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """How far ``head(features)`` and the model's own float32 logits may be apart, per entry.

    A split head may compute only the logit rows of the model's head (LipConvNet), another product
    whose float32 rounding differs. Each float32 ``w_i . g + b_i`` is within ``gamma_(n+1) (|W| |g| +
    |b|)_i`` of the exact value (Higham 2002, section 3.1, any summation order; ``n`` features,
    ``gamma_k = k u / (1 - k u)``, ``u = 2^-24``), plus under ``2^-126`` per operation if subnormals
    flush, so the two differ by at most twice that (here in float64, ``1 + 1e-9`` for its rounding).
    """
    n, u = head.in_features + 1, 2.0**-24
    gamma = n * u / (1 - n * u)
    bias = 0.0 if head.bias is None else head.bias.detach().double().abs()
    magnitude = features.detach().double().abs() @ head.weight.detach().double().abs().T + bias
    return 2 * (gamma * magnitude + 2 * n * torch.finfo(torch.float32).tiny) * (1 + 1e-9)


def _check_bound(model: nn.Module, shape: tuple[int, ...]) -> None:
    own = model.lipschitz_bound(shape)
    composed = lipschitz_bound(model, shape)
    assert own <= 1 + 1e-6, f"{type(model).__name__} claims 1-Lipschitz, bound {own}"
    assert own == pytest.approx(composed, rel=0.01)
    x = torch.randn((2, *shape))
    body, head = split_head(model)  # type: ignore[misc]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        features = body(x)
        assert bool(((head(features) - model(x)).double().abs() <= _head_rounding(head, features)).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TINY))
def test_family_trains_and_is_bounded(name: str, kind: str) -> None:
    torch.manual_seed(0)
    kwargs, shape = TINY[name]
    model = models.create(name, conv=kind, **kwargs)
    _train_step(model, shape)
    _check_bound(model, shape)


@pytest.mark.parametrize("name", ["sll_small", "sll_medium", "sll_large", "sll_xlarge"])
def test_sll_family_is_registered_with_its_sizes(name: str) -> None:
    widths = {"sll_small": 45, "sll_medium": 60, "sll_large": 90, "sll_xlarge": 120}
    assert name in models.list_models("sll_")
    if name == "sll_small":  # one full-size build (41 M parameters) is enough to check the layout
        model = models.create(name)
        assert model[0].channels == widths[name]
        assert sum(p.numel() for p in model.parameters()) == 41_385_862


def test_sll_tiny_trains_and_is_bounded() -> None:
    from lipnet.models.sll import SLLNet

    torch.manual_seed(0)
    kwargs, shape = SLL_TINY
    model = SLLNet(**kwargs, width=4, n_conv=2, n_dense=2, dense_inner=8)  # type: ignore[arg-type]
    _train_step(model, shape)
    _check_bound(model, shape)


def test_bethune_vgg_has_the_papers_weight_count() -> None:
    model = models.create("bethune_vgg")
    assert isinstance(model, BethuneVGG)
    weights = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias"))
    assert weights == 488_544  # "about 0.49 M weights"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lipconvnet_layout_matches_the_paper() -> None:
    # At 32x32 (the authors' simplified_conv_net.py): ChannelPad, 1x1 layer, 5 stages of 5 layers
    # (3x3, the last stage 1x1), channels doubled at each of the 5 downsamplings, then the square
    # head dense(32 width, 32 width) and its first num_classes outputs.
    model = models.create("lipconvnet_xs", conv="aol")
    assert isinstance(model, LipConvNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] == [16] + [16] * 5 + [32] * 5 + [64] * 5 + [128] * 5 + [256] * 5
    assert [c.kernel_size[0] for c in convs] == [1] + [3] * 20 + [1] * 5
    head = model[-2]
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (512, 512)
    assert isinstance(model[-1], FirstChannels) and model[-1].channels == 10
    assert sum(isinstance(m, FirstChannels) for m in model) == 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


#: The paper's parameter counts ("about 1.6 / 6.3 / 25 / 100 M", Prach et al. CVPR 2024) and the exact
#: count of the authors' layout with plain convolutions and biases (what AOL and Björck parametrise):
#: w^2 + w + 5 sum_i (k_i^2 c_i^2 + c_i) + F^2 + F, c_i = w 2^i, k = 3 3 3 3 1, F = 32 w.
LIPCONVNET_PAPER_PARAMS = {"xs": 1.6e6, "s": 6.3e6, "m": 25e6, "l": 100e6}


def _paper_layout_count(w: int) -> int:
    stages = sum(5 * (k * k * (w * 2**i) ** 2 + w * 2**i) for i, k in enumerate((3, 3, 3, 3, 1)))
    return w * w + w + stages + (32 * w) ** 2 + 32 * w


@pytest.mark.parametrize(("size", "width"), [("xs", 16), ("s", 32), ("m", 64), ("l", 128)])
def test_lipconvnet_parameter_counts_match_the_paper(size: str, width: int) -> None:
    # built on the meta device: the count needs shapes, not 400 MB of weights for size L
    with torch.device("meta"):
        counts = {
            k: sum(p.numel() for p in models.create(f"lipconvnet_{size}", conv=k).parameters())
            for k in ("aol", "bjorck")
        }
    assert counts["aol"] == counts["bjorck"] == _paper_layout_count(width)
    if size == "xs":  # the formula evaluated by hand
        assert counts["aol"] == 1_572_288
    # the paper rounds to two significant figures (1.57 M is "about 1.6 M")
    assert counts["aol"] == pytest.approx(LIPCONVNET_PAPER_PARAMS[size], rel=0.02)


@pytest.mark.parametrize("kind", ["aol", "sll"])
def test_lipconvnet_split_head_gives_the_logits(kind: str) -> None:
    torch.manual_seed(0)
    model = models.create("lipconvnet_xs", conv=kind, num_classes=5, input_size=4, depth=1).eval()
    x = torch.randn(3, 3, 4, 4)
    body, head = split_head(model)  # type: ignore[misc]
    assert isinstance(head, nn.Linear) and head.out_features == 5 and head.in_features == model.features
    with torch.no_grad():
        features = body(x)
        assert bool(((head(features) - model(x)).double().abs() <= _head_rounding(head, features)).all())
        if kind == "aol":  # the rows of the square head that produce the logits, and its bias
            assert len(body) == len(model) - 2
            assert torch.equal(head.weight, model[-2].weight[:5])
            assert torch.equal(head.bias, model[-2].bias[:5])
        else:  # a residual head stays in the body; the projection onto the first 5 features is [I 0]
            assert len(body) == len(model) - 1 and head.bias is None
            assert torch.equal(head.weight, torch.eye(5, model.features))
    # the last-layer certificate bounds the body, which is 1-Lipschitz as a whole
    assert lipschitz_bound(body, (3, 4, 4)) <= 1 + 1e-6


def test_lipconvnet_takes_a_layer_kind_object() -> None:
    from lipnet.layers import BjorckLinear, SLLConv2d
    from lipnet.layers.kinds import LayerKind, get_layer_kind

    aol = get_layer_kind("aol")
    mixed = LayerKind("mixed", lambda c, k: SLLConv2d(c, kernel_size=k), aol.conv, BjorckLinear, "test kind")
    model = LipConvNet(3, 4, input_size=4, conv=mixed, width=4, depth=1)
    assert all(isinstance(model[i], SLLConv2d) for i in (1, 3, 7))
    assert isinstance(model[-2], BjorckLinear) and (model[-2].in_features, model[-2].out_features) == (16, 16)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown layer kind"):
        LipConvNet(conv="mixed")


def test_lipconvnet_width_comes_from_the_name() -> None:
    assert models.create("lipconvnet_s", input_size=4, depth=1)[1].in_channels == 32
    with pytest.raises(TypeError):
        models.create("lipconvnet_m", width=8)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("bethune_vgg", dict(input_size=6)),
        ("bethune_vgg", dict(widths=(3, 4, 4))),
        ("bethune_vgg", dict(num_classes=1)),
        ("bethune_vgg", dict(conv="nope")),
        ("lipconvnet_xs", dict(input_size=24)),
        ("lipconvnet_xs", dict(in_channels=17)),
        ("lipconvnet_xs", dict(input_size=2, depth=1, num_classes=33)),
        ("liresnet", dict(input_size=12)),
        ("sll_small", dict(input_size=6)),
    ],
)
def test_bad_arguments_raise(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        models.create(name, **kwargs)


def test_residual_kind_cannot_make_a_square_head() -> None:
    with pytest.raises(ValueError, match="nn.Linear"):
        models.create(
            "bethune_vgg", conv="sll", input_size=4, widths=(2, 2), depths=(1, 1), hidden=4, num_classes=4
        )


def test_lipschitz_sequential_slices_and_multiplies() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 4), nn.Linear(4, 2)
    with torch.no_grad():
        a.weight.mul_(3.0)
    seq = LipschitzSequential(a, nn.ReLU(), b)
    expected = torch.linalg.matrix_norm(a.weight.detach().double(), 2) * torch.linalg.matrix_norm(
        b.weight.detach().double(), 2
    )
    assert seq.lipschitz_bound() == pytest.approx(float(expected), rel=1e-8)
    body = seq[:-1]
    assert type(body) is nn.Sequential and len(body) == 2
    vgg = models.create("bethune_vgg", in_channels=1, input_size=4, widths=(2, 2), depths=(1, 1), hidden=4)
    assert type(vgg[:-1]) is nn.Sequential and isinstance(vgg[-1], nn.Linear)


def test_channel_pad_and_first_channels() -> None:
    x = torch.randn(2, 3, 4, 4)
    padded = ChannelPad(5)(x)
    assert padded.shape == (2, 5, 4, 4) and torch.equal(padded[:, :3], x) and not padded[:, 3:].any()
    assert torch.equal(FirstChannels(2)(x), x[:, :2])
    with pytest.raises(ValueError):
        ChannelPad(2)(x)
    with pytest.raises(ValueError):
        FirstChannels(4)(x)


# config -> overrides that keep the build cheap (the key names must still be the constructor's)
CONFIG_BUILDS = {
    "cifar10_bethune_vgg": [],
    "cifar10_lipconvnet_m_cpl": ["model.input_size=4", "model.depth=1"],
    "cifar10_large": ["model.width=4", "model.depth=1", "model.hidden=4"],
}


@pytest.mark.parametrize("name", sorted(CONFIG_BUILDS))
def test_cifar10_configs_load_and_build(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", CONFIG_BUILDS[name])
    assert cfg.data.name == "cifar10"
    model = build_model(cfg.model)
    assert isinstance(model, LipschitzSequential)
    _, head = split_head(model)  # type: ignore[misc]
    assert isinstance(head, nn.Linear) and head.out_features == 10


# --- the registry -------------------------------------------------------------------------


def test_registry_lookups() -> None:
    names = models.list_models()
    assert names == sorted(names) and "small_cnn" in names
    # shell wildcards match the whole name; a plain pattern is a substring, as it always was
    assert models.list_models("lipconvnet_*") == [f"lipconvnet_{s}" for s in ("l", "m", "s", "xs")]
    sized = [f"{f}_{s}" for f in ("fmnist_convnet", "lipconvnet") for s in "ms"]
    assert models.list_models("*_[sm]") == sized
    assert models.list_models("convnet") == [n for n in names if "convnet" in n]
    assert models.list_models("sll_?") == [] and models.list_models("nothing*") == []
    for name in names:
        assert models.is_model(name)
        entry = models.model_entrypoint(name)
        assert entry.__name__ == name
    assert not models.is_model("lipconvnet") and not models.is_model("lipconvnet_*")
    with pytest.raises(ValueError, match="unknown model 'resnet50'; available: bethune_vgg"):
        models.model_entrypoint("resnet50")
    with pytest.raises(ValueError, match="unknown model"):
        models.create("resnet50")


def test_default_cfg_is_what_create_builds() -> None:
    assert models.default_cfg("fmnist_convnet_s") == models.ModelDefaults((1, 28, 28), 10, "bcop")
    assert models.default_cfg("lipconvnet_m") == models.ModelDefaults((3, 32, 32), 10, "aol")
    # the SLL networks take no layer kind
    assert models.default_cfg("sll_small").conv is None
    for name in ("small_cnn", "fmnist_convnet_s", "lipconvnet_xs", "bethune_vgg"):
        cfg = models.default_cfg(name)
        model = models.create(name)
        assert model.input_shape == cfg.input_shape
        with torch.no_grad():
            assert model.eval()(torch.zeros((1, *cfg.input_shape))).shape == (1, cfg.num_classes)


def test_fmnist_householder_activation_is_one_per_activation_site_and_checked() -> None:
    from lipnet.activations import GroupSort, HouseholderActivation

    model = models.create("fmnist_convnet_s", blocks=1, hidden=32, activation="householder")
    acts = [m for m in model if isinstance(m, HouseholderActivation)]
    # conv(16) block(16) conv(32) block(32) dense(32): each as wide as the layer before it
    assert [a.num_channels for a in acts] == [16, 16, 32, 32, 32]
    assert not any(isinstance(m, GroupSort) for m in model)
    assert len(list(models.create("fmnist_convnet_s").parameters())) + 5 == len(list(model.parameters()))
    assert 1.0 <= model.lipschitz_bound() <= 1.0 + 1e-4  # orthogonal layers, exactly 1-Lipschitz activations
    with pytest.raises(ValueError, match="activation must be one of groupsort, householder"):
        models.create("fmnist_convnet_s", activation="relu")
