"""BoundedTranslation, BoundedZoom, SoftGlimpse: sampling lemmas, sound bounds, projection, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention_common import TOL, grads_flow, measured_lipschitz, sharpen
from torch import Tensor

from certify.exact import dense_operator_norm, jacobian_spectral_norm
from lipnet.attention import BoundedTranslation, BoundedZoom, SoftGlimpse
from lipnet.attention.spatial import _sample, sampling_column_sum

SHAPE = (1, 4, 4)


def test_sampling_matches_grid_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64)
    shift = 2 * torch.randn(3, 2, generator=gen, dtype=torch.float64)
    scale = 0.4 + 0.6 * torch.rand(3, generator=gen, dtype=torch.float64)
    ys = (2 * torch.arange(5, dtype=torch.float64) + 1) / 5 - 1
    xs = (2 * torch.arange(7, dtype=torch.float64) + 1) / 7 - 1
    by, bx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([bx, by], -1) * scale[:, None, None, None]
    grid = grid + (shift * torch.tensor([2 / 7, 2 / 5], dtype=torch.float64))[:, None, None, :]
    ref = F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(_sample(u, shift, scale), ref, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.9, 0.6, 0.5, 0.37])
def test_sampling_norm_within_phi(scale: float) -> None:
    phi = sampling_column_sum(scale)
    worst = 0.0
    for c in torch.linspace(-1.5, 1.5, 7).tolist():
        shift = torch.tensor([[c, 0.3 * c]], dtype=torch.float64)
        s = torch.tensor([scale], dtype=torch.float64)
        worst = max(worst, dense_operator_norm(lambda u, shift=shift, s=s: _sample(u, shift, s), (1, 8, 8)))
    assert worst <= phi * (1 + TOL)
    assert worst >= 0.75 * phi  # Phi is the true column sum, nearly attained
    assert sampling_column_sum(1.0) == pytest.approx(1.0) and sampling_column_sum(0.5) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: BoundedTranslation(1, 4, hidden=4, max_shift=1.5, radius=2.0, normalize=n),
        lambda n: BoundedZoom(1, 4, hidden=4, max_shift=1.5, min_scale=0.5, radius=2.0, normalize=n),
        lambda n: SoftGlimpse(1, 2, stride=1, radius=2.0, normalize=n),
        lambda n: BoundedTranslation(1, 4, hidden=4, radius=2.0, normalize=n, transform_bound=2.0),
        lambda n: BoundedZoom(1, 4, hidden=4, min_scale=0.6, radius=2.0, normalize=n, transform_bound=2.0),
        lambda n: SoftGlimpse(1, 2, stride=1, radius=2.0, normalize=n, attention_bound=2.0),
    ],
)
def test_bound_dominates_measured_and_normalized_is_one(make) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    module = sharpen(make(False), 2.0).double()
    bound = module.lipschitz_bound(SHAPE)
    assert measured_lipschitz(module, SHAPE, (0.1, 1.0, 10.0)) <= bound * (1 + TOL)
    module.normalize = True
    assert module.lipschitz_bound(SHAPE) <= 1 + 1e-15
    assert measured_lipschitz(module, SHAPE, (0.3, 3.0)) <= 1 + TOL


def test_zoom_at_scale_one_is_the_translation_bound() -> None:
    torch.manual_seed(1)
    zoom = BoundedZoom(1, 4, hidden=4, min_scale=1.0, radius=2.0, normalize=False)
    shift = BoundedTranslation(1, 4, hidden=4, radius=2.0, normalize=False)
    with torch.no_grad():
        shift.loc1.load_state_dict(zoom.loc1.state_dict())
        shift.loc2.weight.copy_(zoom.loc2.weight[:2])
        zoom.loc2.weight[2:] = 0.0
    assert zoom.lipschitz_bound() == pytest.approx(shift.lipschitz_bound(), rel=1e-8)
    assert BoundedZoom(1, 4, min_scale=0.5).loc2.out_features == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: BoundedTranslation(1, 4, hidden=4, max_shift=1.5, radius=2.0, transform_bound=0.7),
        lambda: BoundedZoom(1, 4, hidden=4, max_shift=1.5, min_scale=0.5, radius=2.0, transform_bound=0.7),
    ],
)
def test_transform_bound_fixes_the_localisation_price(make) -> None:  # noqa: ANN001
    torch.manual_seed(5)
    module = make().double()
    module.normalize = False
    bound = module.lipschitz_bound(SHAPE)
    assert bound == pytest.approx(sampling_column_sum(getattr(module, "min_scale", 1.0)) + 0.7, rel=1e-6)
    x = 2.0 * torch.randn(3, *SHAPE, dtype=torch.float64)
    before = module(x)
    with torch.no_grad():  # what Adam does to free weights: only their directions are used now
        module.loc1.weight.mul_(50.0)
        module.loc2.weight.mul_(50.0)
    assert module.lipschitz_bound(SHAPE) == pytest.approx(bound, rel=1e-9)
    assert torch.allclose(module(x), before, atol=1e-12)
    module.transform_bound = None  # the same weights, used as they are
    assert module.lipschitz_bound(SHAPE) > 10 * bound


def test_glimpse_bound_pays_the_values_once() -> None:
    # Uniform weights make the glimpse the mean of the K crops: a convex combination of
    # coordinate restrictions, so norm <= 1 (the bound), although each pixel is in m = 4 windows.
    module = SoftGlimpse(1, 2, stride=1, radius=5.0, normalize=False).double()
    with torch.no_grad():
        module.score.weight.zero_()
    assert module.lipschitz_bound(SHAPE) == pytest.approx(1.0, rel=1e-8)
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert 0.5 < jacobian_spectral_norm(module, x) <= module.lipschitz_bound(SHAPE) * (1 + TOL)


def test_glimpse_peak_weight_refinement_is_sound() -> None:
    # Scores within [-R ||w||, R ||w||] keep every weight near 1 / K: the bound then uses
    # sqrt(max q) < 1 / sqrt 2; ascend the Jacobian where that matters.
    torch.manual_seed(7)
    module = SoftGlimpse(1, 2, stride=1, radius=2.0, normalize=False).double()
    with torch.no_grad():
        module.score.weight.mul_(0.3 / module.score.weight.norm())
    w = module.score.weight.norm().item()
    bound = module.lipschitz_bound(SHAPE)
    peak = 1.0 / math.sqrt(1.0 + 8.0 * math.exp(-2.0 * 2.0 * w))  # K = 9 windows, m = 4, R = 2
    assert peak < 0.6 and bound == pytest.approx(1 + 2 * 2.0 * w * peak, rel=1e-6)
    assert module.lipschitz_bound() == pytest.approx(1 + 2 * 2.0 * w / math.sqrt(2), rel=1e-6)
    assert measured_lipschitz(module, SHAPE, (0.3, 1.0, 10.0)) <= bound * (1 + TOL)


def test_glimpse_attention_bound_holds_for_every_size() -> None:
    torch.manual_seed(8)
    module = SoftGlimpse(1, 2, stride=1, radius=2.0, normalize=False, attention_bound=0.6).double()
    assert module.lipschitz_bound() == pytest.approx(1.6, rel=1e-6)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    before = module(x)
    with torch.no_grad():
        module.score.weight.mul_(40.0)
    assert torch.allclose(module(x), before, atol=1e-12)
    for shape in ((1, 4, 4), (1, 3, 6), (1, 5, 5)):
        bound = module.lipschitz_bound(shape)
        assert bound <= module.lipschitz_bound() * (1 + 1e-12)
        assert measured_lipschitz(module, shape, (0.5, 5.0)) <= bound * (1 + TOL)


@pytest.mark.parametrize("kind", ["translation", "glimpse"])
def test_projection_is_active(kind: str) -> None:
    # Without the ball projection the sampled image gradient (translation) or the spread of the
    # glimpse values (softmax over locations) multiplies the localisation's sensitivity, so the
    # Jacobian grows with the image. On a large ramp image the localisation is kept unsaturated:
    # biases put the shift at a non-integer point of the steep part of tanh (the bound ignores
    # biases), and glimpse score weights summing to 0 give all windows of a ramp equal scores.
    torch.manual_seed(2)
    ramp = torch.arange(16, dtype=torch.float64).reshape(SHAPE) * 1e3
    if kind == "translation":
        module = BoundedTranslation(1, 4, hidden=4, radius=1.0, normalize=False).double()
        with torch.no_grad():
            module.loc1.bias.copy_(1.0 - module.loc1.weight @ ramp.flatten())
            hidden = module.loc1(ramp.flatten()).relu()
            module.loc2.bias.copy_(0.3 - module.loc2.weight @ hidden)

        def raw(x: Tensor) -> Tensor:
            return _sample(x, module.shift(x), None)

    else:
        module = SoftGlimpse(1, 2, radius=1.0, normalize=False).double()
        with torch.no_grad():
            module.score.weight.copy_(torch.tensor([[1.0, -1.0, -1.0, 1.0]]))

        def raw(x: Tensor) -> Tensor:
            g = F.unfold(x, 2).transpose(1, 2)
            return (module.score(g).squeeze(-1).softmax(-1).unsqueeze(-1) * g).sum(1)

    bound = module.lipschitz_bound(SHAPE)
    gen = torch.Generator().manual_seed(0)
    points = [ramp + 0.01 * torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert max(jacobian_spectral_norm(raw, p) for p in points) > 3 * bound
    assert max(jacobian_spectral_norm(module, p) for p in points) <= bound * (1 + TOL)


def test_gradients_flow_and_bad_arguments() -> None:
    torch.manual_seed(3)
    for module in (BoundedTranslation(1, 4), BoundedZoom(1, 4), SoftGlimpse(1, 2)):
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(5.0)  # shifts away from 0 so that every parameter moves the output
        grads_flow(module, 3 * torch.randn(4, *SHAPE))
    with pytest.raises(ValueError):
        BoundedZoom(1, 4, min_scale=1.5)
    with pytest.raises(ValueError):
        BoundedTranslation(1, 4, max_shift=0.0)
    with pytest.raises(ValueError):
        BoundedTranslation(1, (4, 4, 4))
    with pytest.raises(ValueError):
        SoftGlimpse(1, 0)
    with pytest.raises(ValueError, match="expects"):
        BoundedTranslation(1, 4)(torch.randn(1, 1, 5, 5))
    with pytest.raises(ValueError, match="built for"):
        BoundedZoom(1, 4).lipschitz_bound((1, 5, 5))
    with pytest.raises(ValueError, match="expects"):
        SoftGlimpse(1, 3)(torch.randn(1, 1, 2, 2))
