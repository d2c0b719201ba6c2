"""Config parsing and validation, the run folder, atomic checkpoints, and exact resume."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from certify.io import CheckpointError
from lipnet.training.config import Config, ConfigError, apply_overrides, config_diff, dump_config, load_config
from lipnet.training.loop import lr_at
from lipnet.training.run import TrainResult, load_run_model, train
from lipnet.training.runs import RunError, RunFolder, join_state, split_state

# ---------------------------------------------------------------------------------------------
# config


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {name: small_cnn, width: 16}\n"
        "loss: {name: hkr, alpha: 0.9, margin: 0.1}\n"
        "optim: {lr: 1e-3, epochs: 4}\n"
        "certify: {eps: [36/255, 0.5]}\n",
        encoding="utf-8",
    )
    cfg = load_config(path, ["loss.alpha=0.99", "optim.epochs=3", "model.width=8", "optim.weight_decay=5e-4"])
    assert cfg.model.kwargs == {"width": 8}
    assert cfg.loss.name == "hkr" and cfg.loss.kwargs == {"alpha": 0.99, "margin": 0.1}
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.optim.epochs == 3
    assert cfg.certify.eps == [36 / 255, 0.5]
    again = load_config(None, ["certify.eps=36/255,72/255"])
    assert again.certify.eps == [36 / 255, 72 / 255]


def test_dump_round_trip(tmp_path: Path, tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("runs/x", "loss.offset=0.2", "optim.schedule=onecycle")
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    back = load_config(path)
    assert back == cfg
    assert config_diff(back, cfg) == []
    changed = apply_overrides(cfg, ["loss.tau=3", "out=elsewhere"])
    assert config_diff(cfg, changed) == ["loss.tau", "out"]
    assert config_diff(cfg, changed, ignore=("out",)) == ["loss.tau"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optimizer.lr=0.1", "unknown config key 'optimizer'"),
        ("optim.learning_rate=0.1", "unknown config key 'optim.learning_rate'"),
        ("seed.value=1", "not a section"),
        ("optim.epochs=two", "optim.epochs: expected an integer"),
        ("optim.epochs=0", "optim.epochs must be an integer >= 1"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=.nan", "optim.lr must be finite"),
        ("optim.name=rmsprop", "optim.name must be one of"),
        ("optim.schedule=step", "optim.schedule must be one of"),
        ("loss.tau=0", "loss.tau must be > 0"),
        ("loss.tau=-2", "loss.tau must be > 0"),
        ("loss.margin=-0.1", "loss.margin must be >= 0"),
        ("loss.alpha=1.5", "loss.alpha must lie in [0, 1]"),
        ("certify.eps=[72/255, 36/255]", "strictly increasing"),
        ("certify.eps=[36/255, 36/255]", "strictly increasing"),
        ("certify.eps=[abc]", "certify.eps"),
        ("certify.eps=[]", "at least one"),
        ("data.n_train=0", "data.n_train must be an integer >= 1"),
        ("device=gpu", "device must be"),
        ("amp=maybe", "amp: expected true or false"),
        ("sweep.attack=fgsm", "sweep.attack must be one of"),
        ("noequals", "must look like section.key=value"),
        ("optim.warmup=1", r"optim.warmup is a fraction of the training steps in [0, 1)"),
        ("optim.warmup=-0.1", "optim.warmup is a fraction"),
        ("optim.warmup=.nan", "optim.warmup must be finite"),
        ("optim.ema=1", "optim.ema must be null or a decay in (0, 1)"),
        ("optim.ema=0", "optim.ema must be null or a decay in (0, 1)"),
        ("optim.ema=yes", "optim.ema: expected a number"),
        ("optim.clip_grad_norm=0", "optim.clip_grad_norm must be null or a number > 0"),
        ("optim.clip_grad_norm=.inf", "optim.clip_grad_norm must be null or a number > 0"),
        ("optim.lr_scaling=quadratic", "optim.lr_scaling must be one of none, linear, sqrt"),
        ("optim.reference_batch_size=0", "optim.reference_batch_size must be an integer >= 1"),
        ("data.flip=sometimes", "data.flip: expected true or false"),
        ("data.difficulty=1.5", "data.difficulty must be in [0, 1]"),
        ("data.difficulty=-0.1", "data.difficulty must be in [0, 1]"),
        ("data.difficulty=.nan", "data.difficulty must be finite"),
        ("data.difficulty=hard", "data.difficulty: expected a number"),
    ],
)
def test_bad_values_are_config_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_difficulty_is_shapes10_only() -> None:
    """data.difficulty: null by default, a number in [0, 1] for shapes10, refused for other datasets."""
    assert load_config(None, []).data.difficulty is None
    assert load_config(None, ["data.difficulty=0.5"]).data.difficulty == 0.5
    assert load_config(None, ["data.difficulty=0"]).data.difficulty == 0
    with pytest.raises(ConfigError, match="dataset 'mnist' has no difficulty setting"):
        load_config(None, ["data.name=mnist", "data.difficulty=0.5"])
    with pytest.raises(ConfigError, match="data.name: unknown dataset 'nope'"):
        load_config(None, ["data.name=nope", "data.difficulty=0.5"])


def test_onecycle_refuses_a_warmup() -> None:
    with pytest.raises(ConfigError, match="onecycle schedule has its own warm-up"):
        load_config(None, ["optim.schedule=onecycle", "optim.warmup=0.1"])
    assert load_config(None, ["optim.schedule=onecycle"]).optim.warmup == 0.0


def test_lr_scaling_relative_to_the_reference_batch() -> None:
    cfg = load_config(None, ["optim.lr=1e-3", "optim.batch_size=512", "optim.reference_batch_size=128"])
    assert cfg.optim.scaled_lr() == 1e-3
    assert apply_overrides(cfg, ["optim.lr_scaling=linear"]).optim.scaled_lr() == 4e-3
    assert apply_overrides(cfg, ["optim.lr_scaling=sqrt"]).optim.scaled_lr() == 2e-3
    with pytest.raises(ConfigError, match="after optim.lr_scaling"):
        load_config(None, ["optim.lr=1e37", "optim.batch_size=1024", "optim.lr_scaling=linear"])


def test_flips_default_to_what_the_dataset_allows() -> None:
    """data.flip: null flips CIFAR-10 and shapes10, never digits or Fashion-MNIST; true or false wins."""
    expected = {"cifar10": True, "shapes10": True, "fashion_mnist": False, "mnist": False}
    for name, flips in expected.items():
        assert load_config(None, [f"data.name={name}"]).data.flips() is flips, name
        assert load_config(None, [f"data.name={name}", "data.flip=true"]).data.flips() is True
        assert load_config(None, [f"data.name={name}", "data.flip=false"]).data.flips() is False
    assert load_config(None).data.flip is None


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: {lr: 0.1, momentun: 0.9}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="momentun"):
        load_config(unknown)


def test_lr_schedules() -> None:
    total = 100
    cosine = [lr_at(s, total, 0.1, "cosine") for s in range(total)]
    assert cosine[0] == 0.1 and all(b <= a for a, b in zip(cosine, cosine[1:], strict=False))
    assert cosine[-1] < 1e-3
    one = [lr_at(s, total, 0.1, "onecycle") for s in range(total)]
    assert one[0] == pytest.approx(0.1 / 25)
    assert max(one) == pytest.approx(0.1) and one.index(max(one)) == 30
    assert one[-1] < 1e-3
    assert {lr_at(s, total, 0.1, "none") for s in range(total)} == {0.1}


# ---------------------------------------------------------------------------------------------
# checkpoint state encoding


def test_split_join_round_trip() -> None:
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.8, 0.99))
    p.grad = torch.ones_like(p)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "odd": {1.5: "x", "__tensor__": (1, None)},
        "rng": torch.get_rng_state(),
    }
    skeleton, tensors = split_state(state)
    json.dumps(skeleton)  # everything but the tensors is plain JSON
    back = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["odd"] == {1.5: "x", "__tensor__": (1, None)}
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0}
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][key], value)
    assert torch.equal(back["rng"], state["rng"])
    with pytest.raises(TypeError, match="no pickling"):
        split_state({"f": object()})


# ---------------------------------------------------------------------------------------------
# training runs (one uninterrupted run shared by the tests below)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_config: Callable[..., Config]) -> TrainResult:
    return train(tiny_config(tmp_path_factory.mktemp("finished") / "run"), progress=False)


def test_run_folder_contents(finished: TrainResult, tiny_config: Callable[..., Config]) -> None:
    run = RunFolder(finished.run_dir)
    for path in (
        run.config_path,
        run.metrics_jsonl,
        run.metrics_csv,
        run.results_path,
        run.summary_path,
        run.curves_path,
    ):
        assert path.is_file(), path
    assert load_config(run.config_path) == tiny_config(finished.run_dir)
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"loss", "train_acc", "test_acc", "lr", "time", "lipschitz"}
        assert math.isfinite(r["loss"]) and 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        # small_cnn is 1-Lipschitz by construction; the sound bound may be smaller, never larger
        assert 0 < r["lipschitz"] <= 1 + 1e-6
    csv_lines = run.metrics_csv.read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].split(",")[:3] == ["epoch", "step", "loss"] and len(csv_lines) == 3
    results = json.loads(run.results_path.read_text(encoding="utf-8"))
    cert = results["certify"]
    assert cert["eps"] == [36 / 255, 72 / 255] and len(cert["certified_accuracy"]) == 2
    assert cert["n"] == 32 and cert["rule"] in ("last-layer", "global")
    assert cert["certified_accuracy"][0] >= cert["certified_accuracy"][1]
    assert cert["certified_accuracy"][0] <= cert["clean_accuracy"]
    per_sample = run.read_radii()
    assert per_sample["radii"].dtype == torch.float64 and per_sample["radii"].shape == (32,)
    assert float((per_sample["radii"] > 36 / 255).double().mean()) == cert["certified_accuracy"][0]
    assert (
        float((per_sample["predictions"] == per_sample["labels"]).double().mean()) == cert["clean_accuracy"]
    )
    summary = run.summary_path.read_text(encoding="utf-8")
    assert "| n | clean |" in summary and "cert. ε=36/255" in summary
    names = sorted(p.name for p in run.checkpoint_dir.iterdir())
    assert names == ["final.json", "last-e0002-s4.safetensors", "last.json"]
    assert not any(p.name.endswith(".tmp") for p in run.path.rglob("*"))
    final = run.load_checkpoint("final")
    assert final.epoch == 2 and final.step == 4
    for key, value in finished.model.state_dict().items():
        assert torch.equal(final.model[key], value), key
    model, cfg = load_run_model(run.path)
    assert cfg.loss.kwargs == {"tau": 10}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), finished.model.eval()(x))


def test_resume_reaches_the_same_weights(
    finished: TrainResult, tmp_path: Path, tiny_config: Callable[..., Config]
) -> None:
    cfg = tiny_config(tmp_path / "run")
    first = train(cfg, progress=False, stop_after_epoch=1)
    run = RunFolder(first.run_dir)
    assert not first.finished and not run.has_results() and not run.has_checkpoint("final")
    assert run.load_checkpoint("last").epoch == 1 and len(run.read_metrics()) == 1
    second = train(cfg, resume=True, progress=False)
    assert second.finished
    reference = finished.model.state_dict()
    resumed = second.model.state_dict()
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    ref_rows, rows = RunFolder(finished.run_dir).read_metrics(), run.read_metrics()
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref_rows]
    assert run.read_results()["certify"] == RunFolder(finished.run_dir).read_results()["certify"]


def test_resume_of_a_finished_run_trains_nothing(
    finished: TrainResult, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.stat().st_mtime_ns for p in finished.run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr("lipnet.training.run.build_optimizer", _fail)
    result = train(tiny_config(finished.run_dir), resume=True, progress=False)
    assert result.finished and result.results == RunFolder(finished.run_dir).read_results()
    assert {p: p.stat().st_mtime_ns for p in finished.run_dir.rglob("*") if p.is_file()} == before


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("a finished run must not build an optimiser")


def test_resume_with_another_config_is_refused(
    finished: TrainResult, tiny_config: Callable[..., Config]
) -> None:
    before = {p: p.read_bytes() for p in finished.run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RunError, match=r"loss\.tau"):
        train(tiny_config(finished.run_dir, "loss.tau=3"), resume=True, progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        train(tiny_config(finished.run_dir), progress=False)
    assert {p: p.read_bytes() for p in finished.run_dir.rglob("*") if p.is_file()} == before


def test_nothing_is_written_for_bad_input(tmp_path: Path, tiny_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="unknown model 'no_such_net'"):
        train(tiny_config(tmp_path / "a", "model.name=no_such_net"), progress=False)
    with pytest.raises(ConfigError, match="loss"):
        train(tiny_config(tmp_path / "b", "loss.margin=0.1"), progress=False)
    with pytest.raises(ConfigError, match="num_classes"):
        train(tiny_config(tmp_path / "c", "model.num_classes=3"), progress=False)
    with pytest.raises(RunError, match="no config.yaml"):
        train(tiny_config(tmp_path / "d"), resume=True, progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_failing_checkpoint_write_keeps_the_old_one(
    finished: TrainResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(finished.run_dir, run.path)
    old = run.load_checkpoint("last")
    new_state = {k: torch.zeros_like(v) for k, v in old.model.items()}

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    # the tensor file write fails
    monkeypatch.setattr("lipnet.training.runs.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        run.save_checkpoint("last", epoch=3, step=6, model_state=new_state, state=old.state, meta=old.meta)
    monkeypatch.undo()
    # the tensor file is written but the sidecar (the commit point) fails
    real_write = __import__("lipnet.training.runs", fromlist=["atomic_write_json"]).atomic_write_json

    def failing_json(path: str | os.PathLike[str], obj: object) -> None:
        if str(path).endswith("last.json"):
            raise OSError(5, "I/O error")
        real_write(path, obj)

    monkeypatch.setattr("lipnet.training.runs.atomic_write_json", failing_json)
    with pytest.raises(OSError, match="I/O error"):
        run.save_checkpoint("last", epoch=3, step=6, model_state=new_state, state=old.state, meta=old.meta)
    monkeypatch.undo()

    again = run.load_checkpoint("last")
    assert again.epoch == 2 and again.step == 4
    for key, value in old.model.items():
        assert torch.equal(again.model[key], value)
    assert not any(p.name.endswith(".tmp") for p in run.checkpoint_dir.iterdir())
    # the next successful save removes the orphaned tensor file of the failed one
    run.save_checkpoint("last", epoch=3, step=6, model_state=new_state, state=old.state, meta=old.meta)
    names = sorted(p.name for p in run.checkpoint_dir.iterdir())
    assert names == ["final.json", "last-e0002-s4.safetensors", "last-e0003-s6.safetensors", "last.json"]
    assert run.load_checkpoint("final").epoch == 2


def test_corrupted_checkpoint_is_detected(finished: TrainResult, tmp_path: Path) -> None:
    import shutil

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(finished.run_dir, run.path)
    tensors = run.checkpoint_dir / "last-e0002-s4.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        run.load_checkpoint("last")
    (run.checkpoint_dir / "final.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="corrupted"):
        run.load_checkpoint("final")
    tensors.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        run.load_checkpoint("last")


# ---------------------------------------------------------------------------------------------
# the recipe's elements in a run


def test_a_run_with_the_recipe_options(
    tmp_path: Path, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up, gradient clipping, label smoothing and a row-normalised head in one tiny run: the learning
    rates are the warmed-up schedule, augmentation touches the training batches only (never the per-epoch
    evaluation or the certification), and summary.md names the recipe."""
    from lipnet import data
    from lipnet.layers import RowNormLinear

    augmented: list[int] = []
    original = data.Augment.__call__

    def counting(
        self: data.Augment, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        augmented.append(len(images))
        return original(self, images, generator)

    monkeypatch.setattr(data.Augment, "__call__", counting)
    cfg = tiny_config(
        tmp_path / "run",
        "optim.warmup=0.5",
        "optim.clip_grad_norm=0.5",
        "loss.label_smoothing=0.1",
        "model.head=rownorm",
    )
    result = train(cfg, progress=False)
    assert isinstance(result.model[-1], RowNormLinear)
    run = RunFolder(result.run_dir)
    rows = run.read_metrics()
    # 2 epochs of 2 steps: the first 2 steps warm up, the last of each epoch is logged
    assert [r["lr"] for r in rows] == [lr_at(s, 4, 1e-2, "cosine", 0.5) for s in (1, 3)]
    assert rows[0]["lr"] == 1e-2
    # every augmented batch is a training batch: 4 steps of 32 images, nothing at evaluation
    assert augmented == [32] * 4
    summary = run.summary_path.read_text(encoding="utf-8")
    recipe = next(line for line in summary.splitlines() if line.startswith("- recipe: "))
    for part in (
        "batch 32",
        "adam lr 0.01",
        "linear warm-up over 50% of the steps, then cosine decay to 0",
        "gradients clipped to norm 0.5",
        "augmentation: shifts up to 4 px and horizontal flips",
        "label smoothing 0.1",
    ):
        assert part in recipe, part
    assert "EMA" not in recipe


def test_kind_for_tau_splits_the_range() -> None:
    from lipnet.layers import AUTO_TAU_SPLIT, kind_for_tau

    assert [kind_for_tau(t) for t in (None, 0.1, 1.0, 5.0, AUTO_TAU_SPLIT, 100.0)] == [
        "bcop",
        "bcop",
        "bcop",
        "bcop",
        "rko_bcop",
        "rko_bcop",
    ]
    cfg = load_config(None, ["model.name=fmnist_convnet_s", "model.conv=bjorck", "loss.tau=10"])
    assert cfg.model.for_loss(cfg.loss) is cfg.model  # only 'auto' is resolved
    cfg = load_config(None, ["model.name=fmnist_convnet_s", "model.conv=auto", "loss.name=hinge"])
    assert cfg.loss.tau is None and cfg.model.for_loss(cfg.loss).kwargs["conv"] == "bcop"  # no tau
    assert load_config(None, ["loss.tau=3"]).loss.tau == 3.0  # an int from YAML, read as a float


@pytest.mark.parametrize(("tau", "kind"), [(0.5, "bcop"), (10.0, "rko_bcop")])
def test_conv_auto_builds_checkpoints_and_reports_the_kind_for_tau(
    tmp_path: Path, tiny_config: Callable[..., Config], tau: float, kind: str
) -> None:
    from lipnet.layers import BCOPConv2d, BjorckConv2d

    cfg = tiny_config(tmp_path / "run", "model.conv=auto", f"loss.tau={tau}", "optim.epochs=1")
    lines: list[str] = []
    result = train(cfg, progress=False, log=lines.append)
    assert f"model.conv: auto -> {kind} (loss.tau = {tau})" in lines
    run = RunFolder(result.run_dir)
    assert run.read_config().model.kwargs["conv"] == "auto"  # the config as given
    assert run.load_checkpoint("final").meta["model"]["kwargs"]["conv"] == kind
    model, _ = load_run_model(result.run_dir)
    # small_cnn on 3-channel images, width 4: rko_bcop's convolutions are all RKO (4 < 3 * 9)
    expected = BCOPConv2d if kind == "bcop" else BjorckConv2d
    convs = [m for m in model.modules() if isinstance(m, (BCOPConv2d, BjorckConv2d))]
    assert convs and all(isinstance(m, expected) for m in convs)
    summary = run.summary_path.read_text(encoding="utf-8")
    assert f"conv={kind}" in summary and "conv: auto, the network for loss.tau" in summary


def test_conv_auto_gives_fashion_networks_householder_activations_up_to_the_split() -> None:
    from lipnet.activations import GroupSort, HouseholderActivation
    from lipnet.layers import AUTO_TAU_SPLIT
    from lipnet.models.fmnist import HOUSEHOLDER_TAU, activation_for_tau
    from lipnet.training.build import build_model

    assert [activation_for_tau(t) for t in (None, 0.5, HOUSEHOLDER_TAU, 5.0, AUTO_TAU_SPLIT)] == [
        "groupsort",
        "groupsort",
        "householder",
        "householder",
        "groupsort",
    ]
    base = ["model.name=fmnist_convnet_s", "model.conv=auto"]
    spec = load_config(None, [*base, "loss.tau=5"])
    resolved = spec.model.for_loss(spec.loss)
    assert resolved.kwargs == {"conv": "bcop", "activation": "householder"}
    assert resolved.label() == "bcop+householder"
    model = build_model(resolved)
    assert any(isinstance(m, HouseholderActivation) for m in model.modules())
    assert not any(isinstance(m, GroupSort) for m in model.modules())
    for tau, kind in ((0.5, "bcop"), (10.0, "rko_bcop")):  # GroupSort, the model's default, left implicit
        spec = load_config(None, [*base, f"loss.tau={tau}"])
        assert spec.model.for_loss(spec.loss).kwargs == {"conv": kind}
    spec = load_config(None, [*base, "model.activation=groupsort", "loss.tau=5"])  # the config's own wins
    assert spec.model.for_loss(spec.loss).kwargs == {"conv": "bcop", "activation": "groupsort"}
    spec = load_config(None, ["model.name=small_cnn", "model.conv=auto", "loss.tau=5"])  # no such argument
    assert spec.model.for_loss(spec.loss).kwargs == {"conv": "bcop"}


def test_conv_auto_gives_fashion_networks_a_row_normalised_head_at_the_accurate_end() -> None:
    from lipnet.layers import RowNormLinear
    from lipnet.models.fmnist import ROWNORM_TAU, head_for_tau
    from lipnet.training.build import build_model

    assert [head_for_tau(t) for t in (None, 0.5, 10.0, ROWNORM_TAU, 100.0)] == [
        "kind", "kind", "kind", "rownorm", "rownorm",
    ]  # fmt: skip
    base = ["model.name=fmnist_convnet_s", "model.conv=auto"]
    spec = load_config(None, [*base, f"loss.tau={ROWNORM_TAU}"])
    resolved = spec.model.for_loss(spec.loss)
    assert resolved.kwargs == {"conv": "rko_bcop", "head": "rownorm"}
    assert resolved.label() == "rko_bcop+rownorm"
    assert isinstance(build_model(resolved)[-1], RowNormLinear)
    spec = load_config(None, [*base, "model.head=kind", "loss.tau=100"])  # the config's own wins
    resolved = spec.model.for_loss(spec.loss)
    assert resolved.kwargs == {"conv": "rko_bcop", "head": "kind"} and resolved.label() == "rko_bcop"
    assert not isinstance(build_model(resolved)[-1], RowNormLinear)
    # small_cnn takes a head too, but the rule was measured on the Fashion-MNIST networks alone
    spec = load_config(None, ["model.name=small_cnn", "model.conv=auto", "loss.tau=100"])
    assert spec.model.for_loss(spec.loss).kwargs == {"conv": "rko_bcop"}


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parent.parent / "experiments" / "configs").glob("*.yaml")),
    ids=str,
)
def test_every_experiment_config_loads_and_names_a_buildable_model(path: Path) -> None:
    cfg = load_config(path)
    cfg.model.check()
    if cfg.data.name == "fashion_mnist":  # the issue-13 recipe: warm-up; flips stay off
        assert cfg.optim.warmup > 0 and not cfg.data.flips()
    if cfg.model.name == "fmnist_convnet_s":  # the anchor layout
        assert cfg.model.kwargs["blocks"] == 0


def test_a_resumed_auto_run_keeps_the_network_it_started_with(
    tmp_path: Path, tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """conv: auto is resolved when a run starts; a resume after the rule changed (another split) builds the
    network the checkpoint recorded, not the one the new rule picks."""
    from lipnet.layers import BCOPConv2d

    cfg = tiny_config(tmp_path / "run", "model.conv=auto", "loss.tau=5", "optim.epochs=2")
    first = train(cfg, progress=False, stop_after_epoch=1)
    assert not first.finished
    assert RunFolder(first.run_dir).load_checkpoint("last").meta["model"]["kwargs"]["conv"] == "bcop"
    monkeypatch.setattr("lipnet.training.config.kind_for_tau", lambda tau: "rko_bcop")  # a changed rule
    assert cfg.model.for_loss(cfg.loss).kwargs["conv"] == "rko_bcop"
    lines: list[str] = []
    second = train(cfg, resume=True, progress=False, log=lines.append)
    assert second.finished and "model.conv: auto -> bcop (loss.tau = 5)" in lines
    assert any(isinstance(m, BCOPConv2d) for m in second.model.modules())
    assert RunFolder(second.run_dir).load_checkpoint("final").meta["model"]["kwargs"]["conv"] == "bcop"
