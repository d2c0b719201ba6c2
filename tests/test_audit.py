"""The audit pipeline (certify.audit) and ``lipnet audit`` (lipnet.cli.audit), end to end on small data.

Architectures used through ``--arch test_audit:<name>`` are defined here.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import certify.report
from certify.audit import BOUND_TOLERANCE, audit, empirical_lipschitz_lower
from lipnet.cli import audit as audit_command


def plain_bn_cnn(width: int = 4, in_channels: int = 3) -> nn.Module:
    """A plain CNN with BatchNorm for 32x32 inputs (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 4, 10),
    )


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class SmallResNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = _Block(width)
        self.block2 = _Block(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(F.relu(self.bn(self.stem(F.avg_pool2d(x, 2))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_resnet(width: int = 4) -> nn.Module:
    return SmallResNet(width)


class Underclaiming(nn.Module):
    """Multiplies by 8 but claims ``lipschitz_bound() = 0.08``: an injected wrong bound (100x too small)."""

    def forward(self, x: Tensor) -> Tensor:
        return 8.0 * x

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        return 0.08


def lying_cnn() -> nn.Module:
    model = plain_bn_cnn()
    return nn.Sequential(*model[:3], Underclaiming(), *model[3:])


class NaNWhenBright(nn.Module):
    """The identity, except all NaN for every sample whose first pixel is above 0.3 (claims bound 1)."""

    def forward(self, x: Tensor) -> Tensor:
        bright = x.flatten(1)[:, 0] > 0.3
        return torch.where(bright.view(-1, *([1] * (x.ndim - 1))), torch.full_like(x, math.nan), x)

    def lipschitz_bound(self, input_shape: tuple[int, ...] | None = None) -> float:
        return 1.0


def nan_when_bright() -> nn.Module:
    """A model whose logits are NaN on some inputs (an architecture for ``--arch``)."""
    return nn.Sequential(NaNWhenBright(), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lipnet")
    audit_command.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["audit", *argv])


def _cli(tmp_path: Path, model: str, *extra: str, out: str = "out") -> tuple[int, Path]:
    return audit_command.run(_parse(_audit_argv(tmp_path, model, *extra, out=out))), tmp_path / out


def _audit_argv(tmp_path: Path, model: str, *extra: str, out: str = "out") -> list[str]:
    """Arguments of ``lipnet audit`` (after the command name) on 64 shapes10 images, PGD, CPU."""
    return [
        *("--model", model, "--data", "shapes10", "--data-dir", str(tmp_path / "data")),
        *("--n", "64", "--n-attack", "12", "--attack", "pgd", "--pgd-steps", "10"),
        *("--eps", "36/255,72/255", "--device", "cpu", "--quiet", "--out", str(tmp_path / out)),
        *extra,
    ]


def _trained_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def _self_labelled(
    model: nn.Module, n: int, shape: tuple[int, ...], seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Random inputs labelled with the model's own predictions: all correct, most certified."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=gen)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def deel_cnn() -> nn.Module:
    """A deel-torchlip network (an architecture for ``--arch test_audit:deel_cnn``)."""
    from deel import torchlip

    return torchlip.Sequential(
        torchlip.SpectralConv2d(3, 8, 3, padding=1),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(4),
        torchlip.SpectralConv2d(8, 8, 3, padding=1),
        torchlip.FullSort(),
        torchlip.ScaledAvgPool2d(4),
        nn.Flatten(),
        torchlip.SpectralLinear(8 * 2 * 2, 10),
    ).eval()


def test_deel_model_and_its_vanilla_export_are_audited_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = deel_cnn()
    loader = _self_labelled(model, 32, (3, 32, 32))
    report = audit(
        model,
        loader,
        eps=["36/255"],
        attack="pgd",
        n_attack=8,
        pgd_steps=10,
        out_dir=tmp_path / "deel",
        progress=False,
    )
    assert report.passed and not report.violations and not report.bound_violations
    assert report.rule == "last-layer" and report.head == "7"
    assert report.cross_checked > 0 and report.clean_accuracy == 1.0
    for row in report.layers:  # every lower estimate is below its bound
        assert row.lower is not None and row.lower <= row.bound * (1 + 1e-4)
    exported = audit(
        model.vanilla_export().eval(),
        loader,
        eps=["36/255"],
        attack="pgd",
        n_attack=8,
        pgd_steps=10,
        progress=False,
    )
    assert exported.passed
    assert exported.lipschitz == pytest.approx(report.lipschitz, rel=1e-9)
    assert torch.allclose(exported.radii, report.radii)
    data = json.loads((tmp_path / "deel" / "audit.json").read_text())
    assert data["passed"] is True and len(data["layers"]) == len(report.layers)
    markdown = (tmp_path / "deel" / "audit.md").read_text()
    assert "| `0` | ParametrizedSpectralConv2d" in markdown and "bound / lower" in markdown
    assert (tmp_path / "deel" / "radii.png").stat().st_size > 1000


def test_injected_wrong_bound_fails_the_audit() -> None:
    torch.manual_seed(1)
    model = _trained_bn_stats(lying_cnn())
    loader = _self_labelled(model, 32, (3, 32, 32))
    report = audit(model, loader, eps=["36/255"], attack="pgd", n_attack=16, pgd_steps=20, progress=False)
    assert not report.passed
    assert any("layer '3'" in b and "bound is wrong" in b for b in report.bound_violations)
    # the certificates built on the wrong bound are broken by the attacks, and the samples named
    assert report.violations
    for v in report.violations:
        assert v.distance < v.radius and v.predicted != v.label
    assert "VIOLATION: sample" in report.summary()


def test_eps_attacks_reuse_smaller_balls_and_are_witnessed() -> None:
    from certify.attacks import empirical_robust_accuracy

    torch.manual_seed(3)
    model = _trained_bn_stats(plain_bn_cnn())
    loader = _self_labelled(model, 48, (3, 32, 32), seed=3)
    eps = [0.02, 0.1, 0.5]
    report = audit(
        model, loader, eps=eps, attack="pgd", n_attack=48, pgd_steps=10, pgd_restarts=1, progress=False
    )
    accs = [report.empirical_accuracy[e] for e in report.eps]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] > accs[-1]
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    for e, acc in zip(eps, accs, strict=True):
        # every eps attacks at least the samples a direct attack would, starting from smaller balls' finds
        direct = empirical_robust_accuracy(model, x, y, e, attack="pgd", steps=10, restarts=1)
        assert acc <= direct + 1 / len(y)


def test_cli_plain_batchnorm_cnn_from_a_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(2)
    weights = tmp_path / "cnn.safetensors"
    from safetensors.torch import save_file

    save_file(_trained_bn_stats(plain_bn_cnn(width=6)).state_dict(), str(weights))
    code, out = _cli(
        tmp_path, str(weights), "--arch", "test_audit:plain_bn_cnn", "--arch-kwargs", '{"width": 6}'
    )
    assert code == 0
    data = json.loads((out / "audit.json").read_text())
    assert data["passed"] is True and data["n"] == 64 and data["certificate"] == "last-layer"
    kinds = [row["kind"] for row in data["layers"]]
    assert kinds.count("Conv2d+BatchNorm2d (folded)") == 2
    assert set(data["certified_accuracy"]) == {"36/255", "72/255"}
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "audit.md", "radii.png"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_deel_torchlip_model_from_a_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(5)
    weights = tmp_path / "deel.pt"
    torch.save(deel_cnn().state_dict(), weights)
    code, out = _cli(tmp_path, str(weights), "--arch", "test_audit:deel_cnn")
    assert code == 0
    data = json.loads((out / "audit.json").read_text())
    assert data["passed"] is True and data["certificate"] == "last-layer"
    # Spectral layers and norm-preserving pools: at most 1, and above the empirical lower bound.
    assert data["network_lower_bound"] <= data["lipschitz_bound"] <= 1 + 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_small_resnet_torchscript_with_autoattack(tmp_path: Path) -> None:
    torch.manual_seed(3)
    path = tmp_path / "resnet.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_trained_bn_stats(small_resnet())), str(path))
    code, out = _cli(tmp_path, str(path), "--attack", "autoattack", "--attacks", "apgd-ce", "--n-attack", "4")
    assert code == 0
    data = json.loads((out / "audit.json").read_text())
    assert data["attack"] == "autoattack" and data["attack_subset"] == ["apgd-ce"]
    assert data["passed"] is True and data["n_attack"] == 4


def test_cli_exits_1_on_an_injected_wrong_bound(tmp_path: Path) -> None:
    torch.manual_seed(4)
    weights = tmp_path / "liar.pt"
    torch.save(_trained_bn_stats(lying_cnn()).state_dict(), weights)
    code, out = _cli(tmp_path, str(weights), "--arch", "test_audit:lying_cnn", "--attack", "none")
    assert code == 1
    data = json.loads((out / "audit.json").read_text())
    assert data["passed"] is False and data["bound_violations"]


def test_cli_bad_inputs_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.pt"
    torch.save(plain_bn_cnn().state_dict(), good)
    pickled = tmp_path / "pickled.pt"
    torch.save(plain_bn_cnn(), pickled)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    one_channel = tmp_path / "gray.pt"
    torch.save(plain_bn_cnn(in_channels=1).state_dict(), one_channel)
    cases = [
        ([str(pickled), "--arch", "test_audit:plain_bn_cnn"], "unpickling"),
        ([str(truncated), "--arch", "test_audit:plain_bn_cnn"], "truncated"),
        ([str(good), "--arch", "test_audit:plain_bn_cnn", "--arch-kwargs", '{"width": 8}'], "does not fit"),
        (
            [str(one_channel), "--arch", "test_audit:plain_bn_cnn", "--arch-kwargs", '{"in_channels": 1}'],
            "shape",
        ),
        ([str(good)], "--arch"),
        ([str(tmp_path / "missing.pt"), "--arch", "test_audit:plain_bn_cnn"], "not found"),
    ]
    for i, (spec, message) in enumerate(cases):
        code, out = _cli(tmp_path, spec[0], *spec[1:], out=f"bad{i}")
        err = capsys.readouterr().err
        assert code == 2, (spec, err)
        assert message in err and err.startswith("lipnet audit: error:") and err.count("\n") == 1
        assert not out.exists()

    from lipnet import data

    real_load = data.load

    def nan_load(*args: object, **kwargs: object) -> object:
        dataset = real_load(*args, **kwargs)
        images = dataset.images.clone()
        images[3, 0, 0, 0] = float("nan")
        return type(
            "Fake", (), {"images": images, "labels": dataset.labels, "input_shape": dataset.input_shape}
        )

    monkeypatch.setattr(data, "load", nan_load)
    code, out = _cli(tmp_path, str(good), "--arch", "test_audit:plain_bn_cnn", out="nan")
    assert code == 2 and "NaN" in capsys.readouterr().err and not out.exists()


def test_interrupted_report_leaves_no_half_written_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(5)
    model = _trained_bn_stats(plain_bn_cnn())
    loader = _self_labelled(model, 16, (3, 32, 32))

    def broken_plot(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(certify.report, "_plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        audit(model, loader, eps=[0.1], attack="none", out_dir=tmp_path / "report", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_normalisation_and_input_checks() -> None:
    torch.manual_seed(6)
    model = _trained_bn_stats(plain_bn_cnn())
    loader = _self_labelled(model, 16, (3, 32, 32))
    plain = audit(model, loader, eps=[0.1], attack="none", progress=False)
    normalised = audit(
        model, loader, eps=[0.1], attack="none", mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 0.5], progress=False
    )
    assert plain.passed and normalised.passed
    assert normalised.lipschitz == pytest.approx(4.0 * plain.lipschitz, rel=1e-5)
    assert normalised.normalization == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.5]}
    x, y = loader[0]
    with pytest.raises(ValueError, match=r"raw pixels in \[0, 1\]"):
        audit(model, [(2 * x - 1, y)], eps=[0.1], attack="none", progress=False)
    with pytest.raises(ValueError, match="both mean and std"):
        audit(model, loader, eps=[0.1], mean=[0.5], progress=False)
    with pytest.raises(ValueError, match="unknown attack"):
        audit(model, loader, eps=[0.1], attack="fgsm", progress=False)


def test_cli_refuses_a_model_with_nan_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: NaN logits made the graph check's tolerance NaN (a traceback, exit 1 = "broken")."""
    from lipnet import data
    from lipnet.cli import main

    weights = tmp_path / "nan.pt"
    torch.save(nan_when_bright().state_dict(), weights)
    argv = _audit_argv(tmp_path, str(weights), "--arch", "test_audit:nan_when_bright")
    code = main(["audit", *argv])
    err = capsys.readouterr().err
    images = data.load("shapes10", "test", data_dir=tmp_path / "data", n=64).images
    bright = int((images.flatten(1)[:, 0] > 0.3).sum())
    # NaN on some inputs, not all, and on the first one: the graph check (run on it) sees a NaN too
    assert 0 < bright < 64 and images[0].flatten()[0] > 0.3
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"lipnet audit: error: the model's outputs contain NaN on {bright} inputs (of 64")
    assert not (tmp_path / "out").exists()


def test_audit_counts_inputs_with_infinite_outputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[1].weight.fill_(1e38)  # float32 overflow when the pixels sum above about 3.4
    x = torch.tensor([[0.9] * 4, [0.1] * 4, [1.0] * 4]).view(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"contain Inf on 2 inputs \(of 3 audited\)"):
        audit(model, [(x, torch.zeros(3, dtype=torch.long))], eps=[0.1], attack="none", progress=False)


def test_difference_quotient_is_not_fooled_by_rounding() -> None:
    """Regression: ``x + 1e4`` (1-Lipschitz) measured 3.8 in float32 and would fail a correct bound."""

    class Offset(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.flatten(1) + 1e4

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lower = empirical_lipschitz_lower(Offset(), x, iterations=5, steps=25)
    assert 0.99 < lower <= 1.0 + BOUND_TOLERANCE
