"""CAMHead, OnlineAttentionAccumulator and IntegralAttention (OAA+): bounds, fixed-kappa maps,
accumulation rules, state, and per-pixel certificates under attack."""

from __future__ import annotations

import pytest
import torch
from test_attention_common import TOL, measured_lipschitz, sharpen
from torch import Tensor, nn

from certify.exact import dense_operator_norm
from lipnet.activations import MaxMin
from lipnet.attention import CAMHead, IntegralAttention, OnlineAttentionAccumulator
from lipnet.layers import BjorckConv2d
from lipnet.losses import OAAHybrid

SHAPE = (4, 5, 5)


class _Select(nn.Module):
    """``fn(x)[:, index]`` as a module (one class map, one pixel, ...) for the measuring helpers."""

    def __init__(self, fn, index: tuple) -> None:  # noqa: ANN001
        super().__init__()
        self.fn, self.index = fn, index

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)[(slice(None), *self.index)].reshape(x.shape[0], -1)


def _frozen(module: nn.Module) -> nn.Module:
    return module.double().eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# CAMHead


def test_cam_bounds_are_exact_norms() -> None:
    torch.manual_seed(0)
    head = _frozen(CAMHead(4, 3, normalize=False))
    bound = head.lipschitz_bound(SHAPE)
    exact = dense_operator_norm(head, SHAPE)  # the logits are affine in the features
    assert exact <= bound * (1 + TOL)
    assert exact >= bound * (1 - 1e-6)  # sqrt(HW)-scaled GAP keeps ||W||: tight
    maps_bounds = head.map_lipschitz_bounds()
    for c in range(3):
        exact_c = dense_operator_norm(_Select(head.maps, (c,)), SHAPE)
        assert exact_c <= float(maps_bounds[c]) * (1 + TOL)
        assert exact_c >= float(maps_bounds[c]) * (1 - 1e-6)
        pixel = dense_operator_norm(_Select(head.maps, (c, 2, 3)), SHAPE)
        assert pixel <= float(maps_bounds[c]) * (1 + TOL)
    assert float(maps_bounds.max()) <= bound * (1 + 1e-12)


def test_cam_normalized_and_attention_bounds() -> None:
    torch.manual_seed(1)
    head = _frozen(sharpen(CAMHead(4, 3), 5.0))
    assert head.lipschitz_bound(SHAPE) <= 1 + 1e-9
    assert dense_operator_norm(head, SHAPE) <= 1 + TOL
    assert (head.map_lipschitz_bounds() <= 1 + 1e-9).all()
    with torch.no_grad():
        head.kappa.copy_(torch.tensor([0.5, 0.2, 2.0], dtype=torch.float64))
    bounds = head.attention_lipschitz_bounds()
    torch.testing.assert_close(bounds, head.map_lipschitz_bounds() / head.kappa, rtol=1e-8, atol=0)
    for c in range(3):
        # small inputs keep pixels inside (0, kappa): there the Jacobian is w_c / kappa_c, the bound
        measured = measured_lipschitz(_Select(head.attention, (c,)), SHAPE, (0.05,), seed=c)
        assert measured <= float(bounds[c]) * (1 + TOL)
        assert measured >= float(bounds[c]) * (1 - 1e-6)


def test_cam_fixed_kappa_normalisation() -> None:
    torch.manual_seed(2)
    head = CAMHead(4, 3, momentum=0.25, kappa_min=0.01, normalize=False)
    maps = torch.zeros(3, 3, 2, 2)
    maps[0, 0, 0, 0], maps[1, 0, 1, 1], maps[2, 0, 0, 1] = 2.0, 4.0, 100.0
    maps[0, 1] = -1.0  # a positive image whose map is negative everywhere: floored at kappa_min
    maps[2, 2, 1, 0] = 7.0
    target = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    head.update_kappa(maps, target)
    # first update sets kappa: class 0 -> mean of the positive images' peaks (2, 4), not the negative's 100
    torch.testing.assert_close(head.kappa, torch.tensor([3.0, 0.01, 7.0]))
    head.update_kappa(maps[:1] * 3.0, target[:1])  # class 2 has no positive here: unchanged
    torch.testing.assert_close(head.kappa, torch.tensor([0.75 * 3.0 + 0.25 * 6.0, 0.01, 7.0]))
    # A = clamp(M / kappa, 0, 1), one fixed kappa per class for every image
    x = torch.randn(2, *SHAPE)
    expected = (head.maps(x) / head.kappa[None, :, None, None]).clamp(0, 1)
    torch.testing.assert_close(head.attention(x), expected)
    torch.testing.assert_close(head.logits_from_maps(head.maps(x)), head(x))
    # kappa is state, not a parameter: restored by state_dict, untouched by forward and backward
    restored = CAMHead(4, 3, normalize=False)
    restored.load_state_dict(head.state_dict())
    torch.testing.assert_close(restored.kappa, head.kappa)
    assert bool(restored.kappa_seen[0]) and not any(p is head.kappa for p in head.parameters())
    before = head.kappa.clone()
    head(x).sum().backward()
    torch.testing.assert_close(head.kappa, before)


def _pixel_attack(
    fn, x: Tensor, pixel: tuple[int, int, int], sign: float, eps: float, threshold: float
) -> float:  # noqa: ANN001
    """Smallest ``sign * (fn(x')[pixel] - threshold)`` found by L2 PGD in the ball of radius ``eps``."""
    c, i, j = pixel

    def margin(z: Tensor) -> Tensor:
        return sign * (fn(z.unsqueeze(0))[0, c, i, j] - threshold)

    delta = torch.zeros_like(x)
    best = float(margin(x))
    for step in range(25):
        delta.requires_grad_(True)
        grad = torch.autograd.grad(margin(x + delta), delta)[0]
        with torch.no_grad():
            delta = delta - (eps if step == 0 else eps / 4) * grad / grad.norm().clamp_min(1e-300)
            delta = delta * (eps / delta.norm()).clamp(max=1.0)
            best = min(best, float(margin(x + delta)))
    return best


def test_cam_certified_pixels_survive_attacks() -> None:
    torch.manual_seed(3)
    backbone = _frozen(nn.Sequential(BjorckConv2d(2, 4, 3, padding=1), MaxMin()))
    head = _frozen(CAMHead(4, 2))
    shape = (2, 5, 5)
    lip_f = backbone[0].lipschitz_bound(shape)
    x = torch.randn(shape, dtype=torch.float64)
    features = backbone(x.unsqueeze(0))
    with torch.no_grad():
        head.kappa.copy_(head.maps(features).amax(dim=(0, 2, 3)).double())
    theta = 0.4
    # the network's input is the image x: its norm is the scale of the forward pass's rounding
    foreground, radius = head.pixel_certificates(
        features, backbone_lipschitz=lip_f, input_norms=x.norm(), theta=theta
    )
    assert foreground.shape == radius.shape == (1, 2, 5, 5) and radius.dtype == torch.float64
    eps = float(radius.flatten().median())
    certified = (radius[0] > eps).nonzero().tolist()
    assert certified
    # the weakest certified pixels: an attack at exactly eps must not flip them
    certified.sort(key=lambda p: float(radius[0][tuple(p)]))

    def model(z: Tensor) -> Tensor:
        return head.maps(backbone(z))

    for c, i, j in certified[:4]:
        sign = 1.0 if foreground[0, c, i, j] else -1.0
        threshold = theta * float(head.kappa[c])
        assert _pixel_attack(model, x, (c, i, j), sign, eps, threshold) > 0
    # the same attack flips an uncertified decision once eps passes its (attack-measured) distance
    c, i, j = min((radius[0] <= eps).nonzero().tolist(), key=lambda p: float(radius[0][tuple(p)]))
    sign = 1.0 if foreground[0, c, i, j] else -1.0
    far = 20 * eps + 1.0
    assert _pixel_attack(model, x, (c, i, j), sign, far, theta * float(head.kappa[c])) < 0


def test_cam_pixel_certificates_cover_maps_that_cancel_their_products() -> None:
    """The per-pixel counterexample: a float32 CAMHead reading the image (3072 channels, 2 x 2 pixels),
    rows of random signs +-1/sqrt(3072), each pixel's channel vector moved so that both maps equal the
    threshold theta kappa_c (~1e-6) up to +-2e-6 (3 pixels in 4) or +-0.02. The float32 maps round with
    the error of products of size ~28 (measured up to 1e-6), far above the former allowance
    2e-5 max(max|M|, |theta kappa|) (~4e-7 at most), which certifies beyond the exact radius
    |M_cj(x) - theta kappa_c| / ||w_c|| of the decision; with the image's norm (~64) in the scale, no
    radius does, and the worst perturbation of the certified norm leaves the exact decision unchanged."""
    c_in, k, n = 3072, 2, 32
    theta = 0.5
    g = torch.Generator().manual_seed(0)
    head = CAMHead(c_in, k, normalize=False).eval()
    w = ((torch.randint(0, 2, (k, c_in), generator=g).double() * 2 - 1) / c_in**0.5).float().double()
    with torch.no_grad():
        head.fc.weight.copy_(w)
        head.kappa.copy_(torch.tensor([2e-6, 4e-6]))
    t = theta * head.kappa.double()[None, :, None, None]  # the exact thresholds (float32 kappa, theta 1/2)
    size = torch.where(torch.rand(n, k, 2, 2, generator=g) < 0.75, 2e-6, 0.02).double()
    goal = t + (torch.randint(0, 2, (n, k, 2, 2), generator=g).double() * 2 - 1) * size
    # per pixel, x - W^T (W W^T)^-1 (W x - goal): maps at the goal up to the float32 rounding of x
    pixels = torch.rand(n, c_in, 2, 2, generator=g).double().permute(0, 2, 3, 1)
    excess = pixels @ w.T - goal.permute(0, 2, 3, 1)
    x = (pixels - excess @ torch.linalg.solve(w @ w.T, w)).permute(0, 3, 1, 2).float().contiguous()
    exact = torch.einsum("kc,nchw->nkhw", w, x.double())  # float32 products are exact in float64
    norms = x.flatten(1).double().norm(dim=1)
    foreground, radius = head.pixel_certificates(x, backbone_lipschitz=1.0, input_norms=norms, theta=theta)
    with torch.no_grad():
        maps = head.maps(x).double()
    assert torch.equal(foreground, maps >= t)
    sign = foreground.double() * 2 - 1
    row = w.norm(dim=1)[None, :, None, None]
    true = (sign * (exact - t)).clamp_min(0.0) / row  # 0 where the exact decision differs
    assert bool((radius <= true).all())
    assert int((radius > 0).sum()) >= 16  # the +-0.02 pixels are certified: the test is not vacuous
    # the former allowance (relative to the maps and the threshold alone) certified beyond the exact radius
    scale = torch.maximum(maps.abs().amax(dim=(2, 3), keepdim=True), t.abs())
    lip = head.map_lipschitz_bounds()[None, :, None, None] * (1 + 1e-9)  # times backbone 1, times SLACK
    former = ((maps - t).abs() - 2e-5 * scale).clamp_min(0.0) / lip
    assert int((former > true).sum()) > 0
    # the worst perturbation of each certified pixel: its channel vector moved by r against w_c
    for i, c, h, v in (radius > 0).nonzero().tolist():
        moved = x[i, :, h, v].double() - sign[i, c, h, v] * radius[i, c, h, v] * w[c] / row[0, c, 0, 0]
        assert float(sign[i, c, h, v] * (w[c] @ moved - t[0, c, 0, 0])) > 0


# ---------------------------------------------------------------------------------------------
# OnlineAttentionAccumulator


def test_accumulation_max_and_top_k_rule() -> None:
    acc = OnlineAttentionAccumulator(num_images=4, num_classes=3, size=(2, 2))
    index = torch.tensor([2, 0])
    first = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    # image 2: positives {0, 2}, top-2 logits {0, 1} -> only class 0 is accumulated
    # image 0: positive {1}, top-1 logit {1} -> class 1 accumulated
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    acc.update(index, first, logits, target)
    expected = torch.zeros(4, 3, 2, 2)
    expected[2, 0], expected[0, 1] = first[0, 0], first[1, 1]
    torch.testing.assert_close(acc.maps, expected)
    second = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    acc.update(index, second, logits, target)
    expected[2, 0], expected[0, 1] = (
        torch.maximum(first[0, 0], second[0, 0]),
        torch.maximum(first[1, 1], second[1, 1]),
    )
    torch.testing.assert_close(acc.maps, expected)
    torch.testing.assert_close(acc.targets(torch.tensor([0, 2])), expected[[0, 2]])
    # a positive class that drops out of the top-|y| predictions is not accumulated
    acc.update(
        torch.tensor([0]), torch.ones(1, 3, 2, 2), torch.tensor([[9.0, 0.0, 1.0]]), torch.tensor([[0, 1, 0]])
    )
    torch.testing.assert_close(acc.maps, expected)
    # a repeated image in one batch is merged by max, whatever the order
    dup = torch.zeros(2, 3, 2, 2)
    dup[0, 1, 0, 0], dup[1, 1, 1, 1] = 1.0, 1.0
    acc.update(torch.tensor([3, 3]), dup, torch.tensor([[0.0, 1.0, 0.0]] * 2), torch.tensor([[0, 1, 0]] * 2))
    torch.testing.assert_close(acc.maps[3, 1], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    acc.reset()
    assert acc.maps.abs().sum() == 0


def test_accumulator_state_and_device_checks() -> None:
    acc = OnlineAttentionAccumulator(num_images=3, num_classes=2, size=(2, 3))
    att = torch.rand(2, 2, 2, 3, generator=torch.Generator().manual_seed(2))
    acc.update(torch.tensor([0, 2]), att, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 2))
    resumed = OnlineAttentionAccumulator(num_images=3, num_classes=2, size=(2, 3))
    resumed.load_state_dict(acc.state_dict())
    torch.testing.assert_close(resumed.maps, acc.maps)
    assert "maps" in acc.state_dict()
    # buffers follow the module; inputs on another device are refused, not silently copied
    meta = OnlineAttentionAccumulator(num_images=3, num_classes=2, size=(2, 3)).to("meta")
    assert meta.maps.device.type == "meta"
    with pytest.raises(ValueError, match="device|meta"):
        meta.update(torch.tensor([0, 2]), att, torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc.update(torch.tensor([0, 1]), att * 2.0, torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="indices"):
        acc.update(torch.tensor([0, 3]), att, torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="int64"):
        acc.update(torch.tensor([0.0, 1.0]), att, torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="attention"):
        acc.update(torch.tensor([0, 1]), att[:, :, :1], torch.zeros(2, 2), torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------
# IntegralAttention (OAA+)


def test_integral_attention_bounds() -> None:
    torch.manual_seed(4)
    model = _frozen(IntegralAttention(4, 2, hidden=4, normalize=False))
    bound = model.lipschitz_bound(SHAPE)
    assert bound <= model.lipschitz_bound() * (1 + 1e-12)
    measured = measured_lipschitz(model, SHAPE, (0.3, 3.0))
    assert bound * 0.3 <= measured <= bound * (1 + TOL)
    pixel_bounds = model.pixel_lipschitz_bounds(SHAPE)
    assert (pixel_bounds <= model.pixel_lipschitz_bounds() * (1 + 1e-12)).all()
    assert float(pixel_bounds.max()) < 0.6 * bound  # a pixel reads a 3x3 patch: about 3x smaller
    for c in range(2):
        one = measured_lipschitz(_Select(model, (c, 2, 2)), SHAPE, (1.0,), seed=c)
        assert 0.5 * float(pixel_bounds[c]) <= one <= float(pixel_bounds[c]) * (1 + TOL)
    model.normalize = True
    assert model.lipschitz_bound(SHAPE) <= 1 + 1e-9 and model.lipschitz_bound() <= 1 + 1e-9
    assert (model.pixel_lipschitz_bounds(SHAPE) <= 1 + 1e-9).all()
    assert measured_lipschitz(model, SHAPE, (1.0,)) <= 1 + TOL


def test_integral_attention_certified_pixels_survive_attacks() -> None:
    torch.manual_seed(5)
    model = _frozen(IntegralAttention(2, 2, hidden=4))
    shape = (2, 5, 5)
    x = 3.0 * torch.randn(shape, dtype=torch.float64)
    foreground, radius = model.pixel_certificates(
        x.unsqueeze(0), backbone_lipschitz=1.0, input_norms=x.norm()
    )
    assert torch.equal(foreground, model(x.unsqueeze(0)) > 0)
    eps = float(radius.flatten().median())
    certified = sorted((radius[0] > eps).nonzero().tolist(), key=lambda p: float(radius[0][tuple(p)]))
    for c, i, j in certified[:4]:
        sign = 1.0 if foreground[0, c, i, j] else -1.0
        assert _pixel_attack(model, x, (c, i, j), sign, eps, 0.0) > 0


def test_oaa_pipeline_step() -> None:
    # CAM -> kappa -> accumulated maps -> OAA+ model trained with the existing hybrid loss
    torch.manual_seed(6)
    head, model = CAMHead(4, 3), IntegralAttention(4, 3, hidden=4)
    acc = OnlineAttentionAccumulator(num_images=6, num_classes=3, size=(5, 5))
    features, target, index = (
        torch.randn(2, *SHAPE),
        torch.tensor([[1, 0, 1], [0, 1, 0]]),
        torch.tensor([4, 1]),
    )
    maps = head.maps(features)
    logits = head.logits_from_maps(maps)
    head.update_kappa(maps, target)
    acc.update(index, head.attention_from_maps(maps).detach(), logits.detach(), target)
    q = acc.targets(index)
    assert q.shape == (2, 3, 5, 5) and q.max() > 0
    loss = OAAHybrid(tau=5.0)(model(features), q)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="momentum"):
        CAMHead(4, 2, momentum=1.5)
    with pytest.raises(ValueError, match="theta"):
        CAMHead(4, 2).pixel_certificates(
            torch.randn(1, 4, 3, 3), backbone_lipschitz=1.0, input_norms=1.0, theta=1.0
        )
    with pytest.raises(ValueError, match="backbone_lipschitz"):
        CAMHead(4, 2).pixel_certificates(torch.randn(1, 4, 3, 3), backbone_lipschitz=0.0, input_norms=1.0)
    # the images' norms are required: they are the scale of the forward pass's rounding
    with pytest.raises(TypeError, match="input_norms"):
        CAMHead(4, 2).pixel_certificates(torch.randn(1, 4, 3, 3), backbone_lipschitz=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="input_norms"):
        IntegralAttention(4, 2, hidden=4).pixel_certificates(  # type: ignore[call-arg]
            torch.randn(1, 4, 3, 3), backbone_lipschitz=1.0
        )
    with pytest.raises(ValueError, match="input_norms"):
        CAMHead(4, 2).pixel_certificates(
            torch.randn(2, 4, 3, 3), backbone_lipschitz=1.0, input_norms=torch.ones(3)
        )
    with pytest.raises(ValueError, match="expects"):
        CAMHead(4, 2)(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="even"):
        IntegralAttention(4, 2, hidden=3)
    with pytest.raises(ValueError, match="odd"):
        IntegralAttention(4, 2, kernel_size=2)
    with pytest.raises(ValueError, match="size"):
        OnlineAttentionAccumulator(3, 2, (2, 2, 2))
    with pytest.raises(ValueError, match="bfloat16|imprecise"):
        CAMHead(4, 2).to(torch.bfloat16).pixel_certificates(
            torch.randn(1, 4, 3, 3, dtype=torch.bfloat16), backbone_lipschitz=1.0, input_norms=1.0
        )
