"""A training run: one process or torchrun/DDP, checkpoints every epoch, exact resume, certification.

``train(cfg)`` trains ``cfg.model`` on ``cfg.data`` with ``cfg.loss`` through the one fit loop
(:func:`lipnet.training.loop.fit`) and writes the run folder ``cfg.out`` (see
:mod:`lipnet.training.runs`): the config, one metrics row per epoch (with the sound Lipschitz bound
of the model at that epoch), a ``last`` checkpoint after every epoch, and at the end a ``final``
checkpoint, the per-sample radii, ``summary.md``, ``curves.png`` and, last, the certification of the
final model on the test set (``results.json``, the mark of a finished run). With ``log.tensorboard``,
TensorBoard event files go to ``tensorboard/`` (:mod:`lipnet.training.tensorboard`).

The folder is locked for the whole call (a second ``train`` into it raises :class:`RunError`), and
a run killed at any moment resumes to the same folder as an uninterrupted run: resume deletes the
killed writes' leftovers, rewrites the metrics files from the checkpoint's history when they lag
behind it, and redoes the end-of-run certification and files when ``results.json`` is missing.

Everything that can be wrong with the input (config, model or loss arguments, dataset, run folder)
is checked before the first file is written (only the lock file, ``train.lock``, is there during
the checks, and it goes when the call ends). ``train(cfg, resume=True)`` continues from the
``last`` checkpoint and ends with the same weights as an uninterrupted run (bitwise on CPU): the
checkpoint holds the model, the optimiser state, the step counter (the learning rate is a function
of it) and every RNG state.

With ``optim.ema`` the run keeps a moving average of the weights
(:class:`~lipnet.training.ema.ExponentialMovingAverage`) and everything after training sees the averaged
model: the per-epoch test accuracy and bound, the checkpoints' model weights (the ``last`` checkpoint
also holds the trained weights and the optimiser state, to resume from), the ``final`` checkpoint, the
certification, :func:`load_run_model` and what ``lipnet.export`` exports from it.

Progress: tqdm bars only when stderr is a terminal (:func:`~lipnet.training.loop.show_bars`); the
per-epoch lines go to ``log`` either way (``lipnet train`` prints them, one line per epoch, also with
``--quiet``, which turns the bars off).

On CUDA the forward and backward passes run under bf16 autocast (``amp``), optionally in
channels-last layout and under ``torch.compile`` (``compile_mode: reduce-overhead`` also captures the compiled
forward and backward in CUDA graphs); the Björck weights of each training forward are computed in
batched calls (:func:`~lipnet.layers.batching.batch_weights`, the same weights) and, under autocast, in
float32; certification always runs a float32 forward pass
on the uncompiled model and float64 bounds (:func:`certify.certify`, the one certification path,
also behind ``lipnet certify``: :func:`certify_run`). Under ``torchrun`` (``WORLD_SIZE`` > 1) the
model is wrapped in ``DistributedDataParallel``, each rank reads its shard of every epoch, metrics
are all-reduced, and only rank 0 evaluates, logs and writes files.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import certify
from certify.bounds import lipschitz_bound
from certify.io import atomic_write_json
from certify.radius import CertificationResult, certification_table
from lipnet import data
from lipnet.layers.batching import batch_weights
from lipnet.layers.kinds import AUTO
from lipnet.training.build import build_loss, build_model, build_optimizer, check_model_fits
from lipnet.training.config import DATA_ARGS, RESUME_IGNORES, Config, ConfigError, ModelConfig, config_diff
from lipnet.training.devices import Distributed, resolve_device
from lipnet.training.ema import ExponentialMovingAverage
from lipnet.training.loop import Callback, EpochResult, GradientClipping, classification_step, fit, show_bars
from lipnet.training.plots import plot_history
from lipnet.training.runs import RunError, RunFolder
from lipnet.training.tensorboard import TensorBoardLogger, require_tensorboard

__all__ = [
    "TrainResult",
    "certification_summary",
    "certify_on_test",
    "certify_run",
    "describe_recipe",
    "load_run_model",
    "load_split",
    "summary_table",
    "train",
    "train_unless_finished",
]


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``results`` only on rank 0 of a finished run)."""

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    finished: bool
    results: dict[str, Any] | None


def load_split(cfg: Config, split: str, *, data_dir: str | None = None) -> Any:
    """The ``train`` or ``test`` split of ``cfg.data`` (``data_dir`` overrides the config's folder)."""
    d = cfg.data
    return data.load(
        d.name,
        split,
        data_dir=data_dir if data_dir is not None else d.data_dir,
        download=d.download,
        n=d.n_train if split == "train" else d.n_test,
        seed=d.seed,
        difficulty=d.difficulty,
    )


# ---------------------------------------------------------------------------------------------
# RNG state (checkpointed so that a resumed run draws the same random numbers)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------
# evaluation and certification


def _take(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` samples of a loader (all of them when ``n`` is None)."""
    left = n
    for x, y in loader:
        if left is not None:
            if left <= 0:
                return
            x, y = x[:left], y[:left]
            left -= len(y)
        yield x, y


def _accuracy(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast: Callable[[], Any]
) -> float:
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            for x, y in loader:
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return correct / max(1, total)


def certify_on_test(
    model: nn.Module,
    test_ds: Any,
    eps: list[float],
    *,
    n: int | None,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Certify ``model`` on the first ``n`` test samples with :func:`certify.certify`; float32 forward,
    float64 bound.

    ``progress``: a tqdm bar when stderr is a terminal (:func:`~lipnet.training.loop.show_bars`).
    Returns a JSON-ready dict (n, eps, clean_accuracy, certified_accuracy with one entry per eps in
    the same order, mean_radius, lipschitz: the sound bound used, rule: ``last-layer`` or ``global``)
    and the per-sample tensors (radii float64, predictions, labels) in test-set order.
    """
    loader = data.DeviceLoader(test_ds, batch_size, device=device)
    result = certify.certify(model, _take(loader, n), eps=eps, progress=show_bars(progress))
    summary = {
        "n": result.n,
        "eps": list(eps),
        "clean_accuracy": result.clean_accuracy,
        "certified_accuracy": [result.certified_accuracy[e] for e in eps],
        "mean_radius": result.mean_radius,
        "lipschitz": result.lipschitz,
        "rule": result.rule,
    }
    return summary, {"radii": result.radii, "predictions": result.predictions, "labels": result.labels}


def certification_summary(cert: Mapping[str, Any]) -> CertificationResult:
    """The :class:`certify.radius.CertificationResult` of a saved certification dict (``results.json``'s
    ``certify``, ``certify.json``), without per-sample tensors: what its tables are made from."""
    return CertificationResult(
        n=int(cert["n"]),
        clean_accuracy=float(cert["clean_accuracy"]),
        certified_accuracy={
            float(e): float(a) for e, a in zip(cert["eps"], cert["certified_accuracy"], strict=True)
        },
        mean_radius=float(cert["mean_radius"]),
        lipschitz=float(cert["lipschitz"]),
        rule=str(cert["rule"]),
    )


def summary_table(cert: Mapping[str, Any]) -> str:
    """The Markdown table of a saved certification dict (n, clean, certified at each eps, mean radius,
    bound): :func:`certify.radius.certification_table`."""
    return certification_table([certification_summary(cert)], lipschitz=True)


def certify_run(
    run_dir: str | Path,
    *,
    eps: list[float] | None = None,
    n: int | None = None,
    checkpoint: str = "final",
    batch_size: int | None = None,
    data_dir: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Certify checkpoint ``checkpoint`` of the run ``run_dir`` on its test set (``lipnet certify``).

    ``eps``, ``n`` and ``batch_size`` default to the run's config, ``data_dir`` and ``device`` too.
    Writes and returns the certification dict (``checkpoint`` and the keys of :func:`certify_on_test`)
    as the run's ``certify.json``, and that file's path.
    """
    run = RunFolder(run_dir)
    model, cfg = load_run_model(run.path, checkpoint, device)
    test_ds = load_split(cfg, "test", data_dir=data_dir)
    cert, _ = certify_on_test(
        model,
        test_ds,
        list(eps) if eps is not None else list(cfg.certify.eps),
        n=n if n is not None else cfg.certify.n,
        batch_size=batch_size if batch_size is not None else cfg.certify.batch_size,
        device=next(model.parameters()).device,
        progress=progress,
    )
    cert = {"checkpoint": checkpoint, **cert}
    atomic_write_json(run.certify_path, cert)
    return cert, run.certify_path


# ---------------------------------------------------------------------------------------------
# the run


def _open_run(
    cfg: Config, resume: bool, dist: Distributed, device: torch.device, held: contextlib.ExitStack
) -> RunFolder:
    """The run folder ``cfg.out``, locked and checked; what a killed run left behind is deleted.

    Rank 0 takes the folder's lock into ``held`` (released when the ``train`` call ends) and every
    rank learns whether it could, so that all of them raise together. The folder is checked under
    the lock, so two runs started at once cannot both find it empty.
    """
    if cfg.out is None:
        raise ConfigError("out: no run folder given (set out in the config or pass --out)")
    run = RunFolder(cfg.out)
    refused: RunError | None = None
    if dist.main:
        try:
            held.enter_context(run.lock())
        except RunError as err:
            refused = err
    if dist.sum([float(refused is not None)], device)[0]:
        raise refused or RunError(f"{run.path} is in use by another lipnet train (rank 0 could not lock it)")
    if resume:
        saved = run.read_config()
        diff = config_diff(saved, cfg, ignore=RESUME_IGNORES)
        if diff:
            raise RunError(
                f"cannot resume {run.path}: the given config differs from the run's config.yaml in "
                f"{', '.join(diff)} (resume with the same config, or start a new run)"
            )
    elif run.is_started():
        raise RunError(
            f"{run.path} already holds a run: continue it with --resume {run.path}, or choose another --out"
        )
    if dist.main:
        run.remove_leftovers()
    return run


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` (strict); weights that do not fit -> a one-line :class:`RunError`.

    The message starts with ``what`` and names the tensors that differ (missing from the checkpoint,
    not in the model, or of another shape), the first three when there are more:
    ``12 tensors differ, first 3: ...``.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        own = model.state_dict()
        diffs = []
        for key, tensor in own.items():
            if key not in state:
                diffs.append(f"{key} missing from the checkpoint")
            elif tuple(state[key].shape) != tuple(tensor.shape):
                diffs.append(
                    f"{key} has shape {tuple(state[key].shape)} in the checkpoint, {tuple(tensor.shape)} "
                    "in the model"
                )
        diffs += [f"{key} is not in the model" for key in state if key not in own]
        if len(diffs) == 1:
            detail = f"1 tensor differs: {diffs[0]}"
        elif len(diffs) <= 3:
            detail = f"{len(diffs)} tensors differ: " + "; ".join(diffs)
        elif diffs:
            detail = f"{len(diffs)} tensors differ, first 3: " + "; ".join(diffs[:3])
        else:  # names and shapes agree: torch refused for another reason, say which
            detail = " ".join(str(err).split())
        raise RunError(f"{what}: {detail}") from None


def describe_recipe(cfg: Config) -> str:
    """The training recipe of ``cfg`` in one line: batch, learning rate (and its scaling), schedule and
    warm-up, weight decay, gradient clipping, weight averaging, augmentation, label smoothing."""
    o, d = cfg.optim, cfg.data
    parts = [f"batch {o.batch_size}"]
    lr = f"{o.name} lr {o.scaled_lr():g}"
    if o.lr_scaling != "none":
        lr += f" (lr {o.lr:g} x {o.lr_scaling} batch / {o.reference_batch_size})"
    parts.append(lr)
    schedule = {"cosine": "cosine decay to 0", "onecycle": "one-cycle", "none": "constant"}[o.schedule]
    if o.warmup:
        schedule = f"linear warm-up over {100 * o.warmup:g}% of the steps, then {schedule}"
    parts.append(schedule)
    if o.weight_decay:
        parts.append(f"weight decay {o.weight_decay:g}")
    if o.clip_grad_norm is not None:
        parts.append(f"gradients clipped to norm {o.clip_grad_norm:g}")
    if o.ema is not None:
        parts.append(f"EMA of the weights (decay {o.ema:g}), evaluated and certified")
    if d.augment:
        flip = " and horizontal flips" if d.flips() else ""
        parts.append(f"augmentation: shifts up to {d.crop_padding} px{flip}")
    smoothing = cfg.loss.kwargs.get("label_smoothing")
    if smoothing:
        parts.append(f"label smoothing {smoothing:g}")
    return "; ".join(parts)


def _summary(cfg: Config, results: dict[str, Any]) -> str:
    cert = results["certify"]
    loss_args = ", ".join(f"{k}={v}" for k, v in cfg.loss.kwargs.items())
    # the network the run built (conv: auto resolved), without the data arguments the config left out
    built = results["model"]["kwargs"]
    shown = {k: v for k, v in built.items() if k in cfg.model.kwargs or k not in DATA_ARGS}
    model_args = ", ".join(f"{k}={v}" for k, v in shown.items())
    if cfg.model.kwargs.get("conv") == AUTO:
        model_args += "; conv: auto, the network for loss.tau"
    last = results["final_epoch"]
    lines = [
        f"# Run `{Path(results['run']).name}`",
        "",
        f"- model: `{cfg.model.name}`({model_args})",
        f"- loss: `{cfg.loss.name}`({loss_args})"
        + (" — τ multiplies the logits" if "tau" in cfg.loss.kwargs else ""),
        f"- data: `{cfg.data.name}`, {results['data']['n_train']} training / "
        f"{cert['n']} certified test images",
        f"- training: {results['epochs']} epochs, {results['steps']} steps, "
        f"{cfg.optim.name} lr={cfg.optim.lr:g}, "
        f"{results['train_time']:.1f} s",
        f"- recipe: {describe_recipe(cfg)}",
        f"- final epoch: loss {last['loss']:.4f}, train accuracy {100 * last['train_acc']:.2f}%, "
        f"test accuracy {100 * last['test_acc']:.2f}%",
        f"- sound Lipschitz bound {cert['lipschitz']:.6f} "
        f"({cert['rule']} rule; float32 forward, float64 bound)",
        "",
        summary_table(cert),
        "",
    ]
    return "\n".join(lines)


class _EpochRecorder(Callback):
    """After each epoch, on rank 0: the test accuracy and the model's sound bound, the ``last``
    checkpoint (with the history and every RNG state), then the metrics files and the log line; a
    barrier on every rank, so that no rank runs ahead of the files.

    ``model`` is the evaluated model (the moving average with ``optim.ema``), whose weights the
    checkpoint stores as its model; ``trained``, when it is another module, is the one the optimiser
    updates, whose weights go in the checkpoint's state (``training_model``) to resume from.
    """

    def __init__(
        self,
        *,
        run: RunFolder,
        cfg: Config,
        model: nn.Module,
        model_spec: ModelConfig,
        optimizer: torch.optim.Optimizer,
        test_loader: data.DeviceLoader,
        input_shape: tuple[int, ...],
        num_classes: int,
        autocast: Callable[[], Any],
        dist: Distributed,
        history: list[dict[str, Any]],
        train_time: float,
        log: Callable[[str], None],
        trained: nn.Module | None = None,
    ) -> None:
        self.run, self.cfg, self.model, self.model_spec = run, cfg, model, model_spec
        self.trained = trained
        self.optimizer, self.test_loader, self.autocast = optimizer, test_loader, autocast
        self.input_shape, self.num_classes, self.dist = input_shape, num_classes, dist
        self.history, self.train_time, self.log = history, train_time, log

    def on_epoch_end(self, result: EpochResult) -> None:
        self.train_time += result.seconds
        if self.dist.main:
            model = self.model
            model.eval()
            with torch.no_grad():
                bound = lipschitz_bound(model, self.input_shape)
            row = {
                "epoch": result.epoch,
                "step": result.step,
                "loss": result.loss,
                "train_acc": result.stats["correct"] / result.samples,
                "test_acc": _accuracy(model, self.test_loader, self.autocast),
                "lr": result.lr,
                "time": result.seconds,
                "lipschitz": bound,
            }
            self.history.append(row)
            self.run.save_checkpoint(
                "last",
                epoch=result.epoch,
                step=result.step,
                model_state=model.state_dict(),
                state={
                    "optimizer": self.optimizer.state_dict(),
                    "rng": _rng_state(),
                    **({"training_model": self.trained.state_dict()} if self.trained is not None else {}),
                },
                meta={
                    "model": {"name": self.cfg.model.name, "kwargs": self.model_spec.kwargs},
                    "input_shape": list(self.input_shape),
                    "num_classes": self.num_classes,
                    "history": self.history,
                    "train_time": self.train_time,
                },
            )
            self.run.write_metrics(self.history)
            self.log(
                f"epoch {result.epoch}/{self.cfg.optim.epochs}  loss {result.loss:.4f}  "
                f"train {100 * row['train_acc']:.2f}%  "
                f"test {100 * row['test_acc']:.2f}%  lr {result.lr:.2e}  Lip<= {bound:.6f}  "
                f"{result.seconds:.1f}s"
            )
        self.dist.barrier()


def train(
    cfg: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or continue, with ``resume``) the run ``cfg.out``; see the module docstring.

    ``stop_after_epoch`` ends this call after that epoch, as if the process had been stopped there
    (the run stays resumable). ``log`` receives one line per epoch (rank 0; default: tqdm.write
    when ``progress`` is on). Bad input raises :class:`ConfigError`, :class:`RunError` or the data
    module's errors before anything is written; so does a folder that another ``train`` holds
    (:class:`RunError`), and a checkpoint that does not fit the configured model (:class:`RunError`
    naming the tensors). Divergence raises :class:`~lipnet.training.loop.TrainingDivergedError`.
    """
    cfg.validate()
    if cfg.log.tensorboard:
        require_tensorboard()  # before anything is written, on every rank
    dist = Distributed.from_env()
    device = resolve_device(cfg.device, dist.local_rank)
    if cfg.optim.batch_size % dist.world_size:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} is the global batch: it must be divisible by the "
            f"{dist.world_size} processes"
        )
    if log is None:
        log = tqdm.write if progress else (lambda _line: None)
    if not dist.main:
        log = lambda _line: None  # noqa: E731
    show = show_bars(progress) and dist.main
    dist.start(device)
    held = contextlib.ExitStack()
    try:
        run = _open_run(cfg, resume, dist, device, held)
        if resume and run.is_finished():
            model, _ = load_run_model(run.path, "final", device)
            log(f"{run.path} has already finished; nothing to do")
            history = run.read_metrics()
            return TrainResult(run.path, model, history, True, run.read_results() if dist.main else None)
        train_ds, test_ds = load_split(cfg, "train"), load_split(cfg, "test")
        torch.manual_seed(cfg.seed)
        # the layer kind from the loss's tau where the config says conv: auto (for_loss returns the config
        # itself otherwise, as _summary tests), and in_channels / input_size / num_classes from the data
        # where the config leaves them out
        ckpt = run.load_checkpoint("last") if resume and run.has_checkpoint("last") else None
        model_spec = cfg.model.for_loss(cfg.loss)
        if model_spec is not cfg.model and ckpt is not None:
            # a resumed run keeps the network it started with, recorded in its checkpoint, even if the
            # rule behind conv: auto has changed since (kind_for_tau's split, fmnist.auto_options)
            trained = ckpt.meta.get("model", {}).get("kwargs")
            if trained is not None:
                model_spec = ModelConfig(cfg.model.name, dict(trained))
        if model_spec is not cfg.model:
            log(f"model.conv: auto -> {model_spec.label()} (loss.tau = {cfg.loss.kwargs.get('tau')})")
        model_spec = model_spec.for_data(train_ds.input_shape, train_ds.num_classes)
        model = batch_weights(build_model(model_spec).to(device))
        loss_fn = build_loss(cfg)
        input_shape = check_model_fits(model, train_ds, cfg)
        optimizer = build_optimizer(model.parameters(), cfg)

        history: list[dict[str, Any]] = []
        start_epoch, step, train_time = 0, 0, 0.0
        misfit = (
            f"cannot resume {run.path}: its 'last' checkpoint does not fit model {cfg.model.name!r} "
            "as config.yaml describes it"
        )
        average_state: Mapping[str, torch.Tensor] | None = None  # the checkpoint's moving average
        if ckpt is not None:
            if cfg.optim.ema is not None:
                # the checkpoint's model is the average; the trained weights are in its state
                if "training_model" not in ckpt.state:
                    raise RunError(
                        f"cannot resume {run.path}: its 'last' checkpoint holds no trained weights"
                    )
                _load_weights(model, ckpt.state["training_model"], misfit)
                average_state = ckpt.model
            else:
                _load_weights(model, ckpt.model, misfit)
            optimizer.load_state_dict(ckpt.state["optimizer"])
            _set_rng_state(ckpt.state["rng"])
            history = list(ckpt.meta["history"])
            start_epoch, step, train_time = ckpt.epoch, ckpt.step, float(ckpt.meta["train_time"])
            log(f"resuming {run.path} after epoch {start_epoch} (step {step})")
        ema: ExponentialMovingAverage | None = None
        if cfg.optim.ema is not None:
            ema = ExponentialMovingAverage(model, cfg.optim.ema)
            if average_state is not None:
                _load_weights(ema.average, average_state, misfit)
        # what is evaluated, bounded, checkpointed as the model, certified and returned
        evaluated = ema.average if ema is not None else model
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if dist.main and not resume:
            run.write_config(cfg)
        if dist.main and resume and run.sync_metrics(history):
            # killed between a checkpoint and its metrics rows: the checkpoint's history is the truth
            log(f"rewrote {run.metrics_jsonl.name} and {run.metrics_csv.name} from the checkpoint")

        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        train_model: nn.Module = model
        if dist.world_size > 1:
            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:
            train_model = torch.compile(train_model, mode=cfg.compile_mode)  # type: ignore[assignment]

        use_amp = cfg.amp and device.type == "cuda"

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

        augment = (
            data.Augment(crop_padding=cfg.data.crop_padding, flip=cfg.data.flips())
            if cfg.data.augment
            else None
        )
        loader = data.DeviceLoader(
            train_ds,
            cfg.optim.batch_size // dist.world_size,
            shuffle=True,
            augment=augment,
            device=device,
            seed=cfg.seed,
            drop_last=dist.world_size > 1,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        if len(loader) == 0:
            raise ConfigError(
                f"no training batches: {len(train_ds)} images for a batch of {cfg.optim.batch_size} "
                f"over {dist.world_size} process(es)"
            )
        recorder = _EpochRecorder(
            run=run,
            cfg=cfg,
            model=evaluated,
            model_spec=model_spec,
            optimizer=optimizer,
            test_loader=data.DeviceLoader(test_ds, cfg.certify.batch_size, device=device),
            input_shape=input_shape,
            num_classes=train_ds.num_classes,
            autocast=autocast,
            dist=dist,
            history=history,
            train_time=train_time,
            log=log,
            trained=model if ema is not None else None,
        )

        callbacks: list[Callback] = []
        if cfg.optim.clip_grad_norm is not None:
            callbacks.append(GradientClipping(cfg.optim.clip_grad_norm))
        if ema is not None:
            callbacks.append(ema)
        callbacks.append(recorder)
        step_fn = classification_step(loss_fn, autocast=autocast, channels_last=cfg.channels_last)
        if cfg.log.tensorboard and dist.main:
            board = TensorBoardLogger(
                run.path / "tensorboard",
                model=evaluated,
                history=history,
                test_ds=test_ds,
                eps=cfg.certify.eps,
                certify_n=cfg.log.certify_n,
                batch_size=cfg.certify.batch_size,
                device=device,
                start_step=step,
                resume=resume,
            )
            held.callback(board.close)
            step_fn = board.watch(step_fn)
            callbacks.append(board)  # after the recorder, whose metrics row it logs

        def advice(epoch: int) -> str:
            kept = f"keeps its last checkpoint (epoch {epoch})" if epoch else "has no checkpoint yet"
            return f"lower optim.lr; {run.path} {kept}"

        fitted = fit(
            train_model,
            optimizer,
            loader,
            step_fn,
            epochs=cfg.optim.epochs,
            lr=cfg.optim.scaled_lr(),
            schedule=cfg.optim.schedule,
            warmup=cfg.optim.warmup,
            start_epoch=start_epoch,
            start_step=step,
            stop_after_epoch=stop_after_epoch,
            reduce=lambda values: dist.sum(values, device),
            callbacks=callbacks,
            advice=advice,
            progress=show,
        )
        if fitted.stopped is not None:
            return TrainResult(run.path, evaluated, history, False, None)

        results: dict[str, Any] | None = None
        if dist.main:
            run.promote("last", "final")
            cert, per_sample = certify_on_test(
                evaluated,
                test_ds,
                cfg.certify.eps,
                n=cfg.certify.n,
                batch_size=cfg.certify.batch_size,
                device=device,
                progress=show,
            )
            run.write_radii(per_sample)
            results = {
                "run": str(run.path),
                "model": {"name": cfg.model.name, "kwargs": model_spec.kwargs},
                "loss": {"name": cfg.loss.name, "kwargs": cfg.loss.kwargs},
                "data": {"name": cfg.data.name, "n_train": len(train_ds), "n_test": len(test_ds)},
                "epochs": cfg.optim.epochs,
                "steps": fitted.step,
                "train_time": recorder.train_time,
                "final_epoch": history[-1],
                "certify": cert,
            }
            run.write_summary(_summary(cfg, results))
            plot_history(history, run.curves_path)
            # last: results.json marks the run finished, so every other file is there before it
            run.write_results(results)
            log(summary_table(cert))
        dist.barrier()
        return TrainResult(run.path, evaluated.eval(), history, True, results)
    finally:
        held.close()
        dist.close()


def train_unless_finished(
    cfg: Config, label: str = "", *, progress: bool = False, log: Callable[[str], None] = lambda _line: None
) -> RunFolder:
    """The run folder ``cfg.out``, trained first unless it has finished: a run left unfinished is
    resumed, a new one trained (one ``log`` line, headed ``label`` when given, says which). A finished
    run is not opened at all (:func:`train` with ``resume`` would load its model); the sweep and the
    recipe bench read its results from the returned folder."""
    run = RunFolder(cfg.out or "")
    head = f"{label}: " if label else ""
    if run.is_finished():
        log(f"{head}already trained ({run.path})")
    else:
        log(f"{head}{'resuming' if run.is_started() else 'training'} {run.path}")
        train(cfg, resume=run.is_started(), progress=progress, log=log)
    return run


def load_run_model(
    run_dir: str | Path, tag: str = "final", device: str | torch.device | None = None
) -> tuple[nn.Module, Config]:
    """The model of a run's ``final`` (or ``last``) checkpoint in eval mode, and the run's config.

    ``device`` defaults to the device of the run's config (``auto``: CUDA when available).
    """
    run = RunFolder(run_dir)
    cfg = run.read_config()
    ckpt = run.load_checkpoint(tag)
    spec = ckpt.meta.get("model", {})
    model = build_model(
        ModelConfig(name=spec.get("name", cfg.model.name), kwargs=dict(spec.get("kwargs", {})))
    )
    _load_weights(
        model, ckpt.model, f"checkpoint '{tag}' of {run.path} does not fit model {spec.get('name')!r}"
    )
    if device is None:
        device = cfg.device
    if isinstance(device, str):
        device = resolve_device(device)
    return model.to(device).eval(), cfg
