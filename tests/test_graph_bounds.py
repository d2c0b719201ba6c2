"""Graph bounds (certify.graph): sound along residual DAGs, concatenations, BatchNorm folding, functional
operations, third-party layers; and one error that lists every unsupported operation.

Soundness is checked against lower bounds that any sound bound must exceed: the exact operator norm of
affine models (dense float64 matrix) and the empirical Lipschitz lower bound (Jacobian power iteration
plus gradient ascent on difference quotients) of nonlinear ones, in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.audit import empirical_lipschitz_lower, jacobian_norm_lower
from certify.bounds import lipschitz_bound, module_bound
from certify.contract import UnboundableModuleError
from certify.exact import dense_operator_norm
from certify.graph import UnsupportedOperationsError, analyze
from certify.rules.activations import gelu_lipschitz, silu_lipschitz
from certify.rules.folding import Normalize, folded_bound

TOL = 1e-6


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model


def _lower(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((3, *shape), generator=gen, dtype=torch.float64)
    return empirical_lipschitz_lower(model, x, iterations=30, steps=40, seed=seed)


class BasicBlock(nn.Module):
    """torchvision-style residual block: in-place ReLU, ``out += identity``, optional 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_residual_block_bound_is_the_path_sum() -> None:
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 3, 3, padding=1)
            self.c2 = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(self.c2(torch.relu(self.c1(x)))) + x

    model = nn.Sequential(Res(), Res()).double().eval()
    shape = (3, 5, 5)
    result = analyze(model, shape)
    expected = 1.0
    for block in model:
        expected *= 1.0 + module_bound(block.c2, shape) * module_bound(block.c1, shape)
    assert result.bound == pytest.approx(expected, rel=1e-12)
    assert _lower(model, shape) <= result.bound * (1 + TOL)


def test_resnet_with_batchnorm_is_sound_and_folds_every_pair() -> None:
    torch.manual_seed(1)
    model = _randomise_bn(TinyResNet()).double().eval()
    shape = (2, 8, 8)
    result = analyze(model, shape)
    unfolded = analyze(model, shape, fold_batchnorm=False)
    lower = _lower(model, shape)
    assert lower <= result.bound * (1 + TOL)
    assert result.bound <= unfolded.bound * (1 + 1e-9)
    folded = [row for row in result.layers if "folded" in row.kind]
    assert len(folded) == 6  # stem, 2 per block, and the downsample shortcut
    assert result.head_path == "fc" and result.body_bound is not None
    assert result.bound == pytest.approx(result.body_bound * module_bound(model.fc), rel=1e-12)
    # the user's model is left as it was (modes, no tracing leftovers)
    assert not any(name.startswith("_tensor_constant") for name in vars(model))


def test_linear_residual_and_concatenation_against_exact_norms() -> None:
    torch.manual_seed(2)

    class LinearDag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 2, 3, padding=1)
            self.b = nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            y = 0.5 * x + 0.5 * self.a(x)
            return torch.cat([self.b(y), 2.0 * y], dim=1)

    model = LinearDag().double().eval()
    shape = (2, 4, 4)
    result = analyze(model, shape)
    la, lb = module_bound(model.a, shape), module_bound(model.b, shape)
    residual = 0.5 + 0.5 * la
    assert result.bound == pytest.approx(math.sqrt(lb**2 + 4.0) * residual, rel=1e-12)
    exact = dense_operator_norm(model, shape)
    assert exact <= result.bound * (1 + TOL)


def test_batchnorm_folding_is_tight_and_above_the_exact_norm() -> None:
    torch.manual_seed(3)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))).double().eval()
    shape = (2, 5, 5)
    folded = analyze(model, shape).bound
    unfolded = analyze(model, shape, fold_batchnorm=False).bound
    exact = dense_operator_norm(model, shape)
    assert exact <= folded * (1 + TOL)
    assert folded <= unfolded
    assert folded == pytest.approx(folded_bound(model[0], model[1], shape), rel=1e-12)
    assert folded < 0.95 * unfolded  # random per-channel scales: folding is much tighter here


def test_batchnorm_is_not_folded_when_the_layer_output_is_reused() -> None:
    torch.manual_seed(4)

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomise_bn(Reuse()).double().eval()
    shape = (2, 4, 4)
    result = analyze(model, shape)
    conv = module_bound(model.conv, shape)
    assert not any("folded" in row.kind for row in result.layers)
    assert result.bound == pytest.approx(conv * module_bound(model.bn, shape) + conv, rel=1e-12)
    assert dense_operator_norm(model, shape) <= result.bound * (1 + TOL)


def test_module_called_twice_is_bounded_per_call() -> None:
    torch.manual_seed(5)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(F.avg_pool2d(self.conv(x), 2))

    model = Twice().double().eval()
    result = analyze(model, (2, 8, 8))
    calls = [row for row in result.layers if row.path == "conv"]
    assert [row.input_shape for row in calls] == [(2, 8, 8), (2, 4, 4)]
    assert _lower(model, (2, 8, 8)) <= result.bound * (1 + TOL)


def test_functional_operations_are_sound() -> None:
    torch.manual_seed(6)

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.randn(4, 2, 3, 3, dtype=torch.float64))
            self.register_buffer("lin", torch.randn(3, 4 * 4, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight)
            y = F.gelu(y) - y.mean(dim=(2, 3), keepdim=True)
            y = torch.cat([y[:, :2], F.silu(y[:, 2:])], dim=1).permute(0, 2, 3, 1)
            y = F.max_pool2d(y.permute(0, 3, 1, 2).contiguous(), 2)
            z = y.reshape(y.shape[0], -1)[:, :16] / 3.0
            out = F.linear(torch.tanh(z), self.lin) + torch.sigmoid(z).sum(dim=1, keepdim=True)
            return out - z.max(dim=1, keepdim=True).values

    model = Functional().eval()
    shape = (2, 8, 8)
    result = analyze(model, shape)
    assert math.isfinite(result.bound)
    assert _lower(model, shape) <= result.bound * (1 + TOL)


def test_mean_and_reshape_factors() -> None:
    class Mean(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.flatten(1).mean(dim=1, keepdim=True)

    bound = analyze(Mean(), (4, 4, 4)).bound
    assert bound == pytest.approx(1 / 8)  # mean of 64 entries: 1/sqrt(64)
    assert dense_operator_norm(Mean().double(), (4, 4, 4)) == pytest.approx(bound, rel=1e-6)


def test_every_unsupported_operation_is_listed_in_one_error() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.k = nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
            return scores @ x

    class Branchy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if x.sum() > 0 else -x

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()
            self.branchy = Branchy()
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            y = self.branchy(x) + x * x + self.attn(x) + self.norm(x)
            return self.head(y.mean(dim=1))

    with pytest.raises(UnsupportedOperationsError) as info:
        lipschitz_bound(Model().eval(), (4, 8))
    problems = info.value.problems
    reasons = {(p.node, p.path): p.reason for p in problems}
    assert ("mul", "") in reasons and "product of two input-dependent" in reasons[("mul", "")]
    assert ("matmul", "attn") in reasons and ("matmul_1", "attn") in reasons
    assert any(p.path == "norm" and "layer" in p.reason for p in problems)
    assert any(p.path == "branchy" and "control flow" in p.reason for p in problems)
    message = str(info.value)
    assert "register_bound" in message and "never guesses" in message
    assert all(p.node in message for p in problems)


def test_untraceable_model_says_so() -> None:
    class Branchy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(UnboundableModuleError, match="control flow"):
        lipschitz_bound(Branchy(), (3,))


def test_refused_operations() -> None:
    class Noisy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.dropout(x, 0.5, training=True)

    class Clobber(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = x.relu_()
            return y + x

    class Argmax(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x[:, x[0].argmax()]

    for model, reason in (
        (Noisy(), "random"),
        (Clobber(), "in place"),
        (Argmax(), "input-dependent indices"),
    ):
        with pytest.raises(UnsupportedOperationsError, match=reason):
            analyze(model, (6,))


def test_subclass_that_changes_forward_does_not_inherit_the_bound() -> None:
    class Tripled(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            return 3.0 * super().forward(x)

    torch.manual_seed(7)
    conv = Tripled(2, 2, 3, padding=1).double().eval()
    plain = nn.Conv2d(2, 2, 3, padding=1).double()
    plain.load_state_dict(conv.state_dict())
    assert lipschitz_bound(conv, (2, 4, 4)) == pytest.approx(
        3.0 * lipschitz_bound(plain, (2, 4, 4)), rel=1e-12
    )


def test_activation_slopes_cover_the_derivative() -> None:
    x = torch.linspace(-8, 8, 200001, dtype=torch.float64, requires_grad=True)
    for fn, bound in ((F.gelu, gelu_lipschitz()), (F.silu, silu_lipschitz())):
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        top = grad.abs().max().item()
        assert top <= bound <= top + 2e-4
    assert gelu_lipschitz() == pytest.approx(1.1289, abs=1e-4)
    assert silu_lipschitz() == pytest.approx(1.0998, abs=2e-4)
    tanh_x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.gelu(tanh_x, approximate="tanh").sum(), tanh_x)
    assert grad.abs().max().item() <= gelu_lipschitz("tanh")


def test_normalization_module_multiplies_by_one_over_min_std() -> None:
    torch.manual_seed(8)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5)).eval()
    norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    assert norm.lipschitz_bound() == pytest.approx(5.0)
    plain = analyze(body, (3, 4, 4)).bound
    wrapped = analyze(nn.Sequential(norm, body), (3, 4, 4)).bound
    assert wrapped == pytest.approx(5.0 * plain, rel=1e-6)  # std is stored in float32

    class Inline(nn.Module):
        """A common third-party pattern: mean/std buffers and the arithmetic in forward."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1))
            self.body = body

        def forward(self, x: Tensor) -> Tensor:
            return self.body((x - self.mean) / self.std)

    assert analyze(Inline().eval(), (3, 4, 4)).bound == pytest.approx(5.0 * plain, rel=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_model_is_bounded_like_the_eager_one() -> None:
    torch.manual_seed(9)
    model = _randomise_bn(TinyResNet()).eval()
    scripted = torch.jit.script(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = analyze(model, (2, 8, 8))
        script = analyze(scripted, (2, 8, 8))
    assert script.bound == pytest.approx(eager.bound, rel=1e-9)
    assert script.body_bound == pytest.approx(eager.body_bound, rel=1e-9)


# -- third-party layers -----------------------------------------------------------------------


def test_deel_reflect_padding_trap_is_found() -> None:
    """deel's SpectralConv2d claims 1-Lipschitz, but with reflect padding its norm is 4/3.

    With a single input channel and 9 output channels the normalised reshaped kernel is orthogonal,
    so ``||y||^2 = (1/9) sum_k ||S_k x||^2`` over the nine reflect-padded shifts ``S_k``; the second
    row and column are read 4 times per axis, hence the norm ``sqrt(16 / 9) = 4/3``.
    """
    from deel import torchlip

    torch.manual_seed(10)
    conv = torchlip.SpectralConv2d(1, 9, 3, padding=1, padding_mode="reflect").eval()
    bound = lipschitz_bound(conv, (1, 8, 8))
    lower = jacobian_norm_lower(conv, torch.rand(1, 1, 8, 8), iterations=100)
    # lower is a float32 Jacobian estimate, bound a float64 norm: compare up to float32 rounding
    assert 4 / 3 - 1e-4 <= lower <= bound * (1 + TOL) and bound <= 4 / 3 * (1 + 1e-4)
    zeros = torchlip.SpectralConv2d(1, 9, 3, padding=1).eval()
    assert lipschitz_bound(zeros, (1, 8, 8)) <= 1 + 1e-4
    # deel's own "symmetric" padding (edge-including mirror, applied before a valid convolution)
    symmetric = torchlip.SpectralConv2d(1, 25, 5, padding=2, padding_mode="symmetric").eval()
    bound = lipschitz_bound(symmetric, (1, 8, 8))
    lower = jacobian_norm_lower(symmetric, torch.rand(1, 1, 8, 8), iterations=100)
    # an edge-including mirror reads every pixel exactly k times per axis: norm 1, found exactly
    assert 1 - 1e-4 <= lower <= bound * (1 + TOL) and bound <= 1 + 1e-6


def test_transposed_convolution_against_its_exact_norm() -> None:
    torch.manual_seed(13)
    up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1).double().eval()
    exact = dense_operator_norm(up, (2, 3, 3))
    bound = lipschitz_bound(up, (2, 3, 3))
    assert exact <= bound * (1 + TOL) and bound <= exact * 1.01
    assert exact <= lipschitz_bound(up) * (1 + TOL)  # the bound for every input size


def _deel_model() -> nn.Module:
    from deel import torchlip

    return torchlip.Sequential(
        torchlip.SpectralConv2d(2, 4, 3, padding=1),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(2),
        torchlip.SpectralConv2d(4, 4, 3, padding=1, padding_mode="symmetric"),
        torchlip.MaxMin(),
        torchlip.ScaledAvgPool2d(2),
        nn.Flatten(),
        torchlip.SpectralLinear(8 * 2 * 2, 5),
    )


def test_deel_model_and_its_vanilla_export_have_the_same_sound_bound() -> None:
    torch.manual_seed(11)
    model = _deel_model().eval()
    shape = (2, 8, 8)
    result = analyze(model, shape)
    exported = analyze(model.vanilla_export().eval(), shape)
    assert exported.bound == pytest.approx(result.bound, rel=1e-9)
    assert result.head_path == "7"
    x = torch.rand(3, *shape)
    assert empirical_lipschitz_lower(model, x, steps=20) <= result.bound * (1 + 1e-4)


def test_orthogonium_layers() -> None:
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzDense, SDPBasedLipschitzResBlock

    torch.manual_seed(12)
    model = nn.Sequential(
        AdaptiveOrthoConv2d(2, 4, 3, padding="same", padding_mode="zeros"),
        MaxMin(),
        SDPBasedLipschitzResBlock(4, 2, kernel_size=3),
        nn.Flatten(),
        SDPBasedLipschitzDense(4 * 36, 4 * 36, 16),
        nn.Linear(4 * 36, 3),
    ).eval()
    shape = (2, 6, 6)
    result = analyze(model, shape)
    rows = {row.path: row.bound for row in result.layers}
    assert rows["0"] <= 1 + 1e-3  # orthogonal kernel, zero padding: at most 1
    assert rows["1"] == 1.0
    assert rows["2"] == pytest.approx(1.0) and rows["4"] == pytest.approx(
        1.0
    )  # SLL: max(1, 2a^2 - 1), a <= 1
    x = torch.rand(3, *shape)
    assert empirical_lipschitz_lower(model, x, steps=20) <= result.bound * (1 + 1e-4)


def test_extra_forward_arguments_are_fixed_to_their_defaults() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor, scale: float = 2.0, mask: Tensor | None = None) -> Tensor:
            y = self.fc(x) * scale
            return y if mask is None else y + mask

    model = Scaled().eval()
    assert analyze(model, (4,)).bound == pytest.approx(2.0 * module_bound(model.fc), rel=1e-12)

    class TwoInputs(nn.Module):
        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return x + y

    with pytest.raises(UnboundableModuleError, match="several inputs"):
        analyze(TwoInputs(), (4,))
