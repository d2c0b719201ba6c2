"""The training loop: one process or torchrun/DDP, checkpoints every epoch, exact resume, certification.

``train(cfg)`` trains ``cfg.model`` on ``cfg.data`` with ``cfg.loss`` and writes the run folder
``cfg.out`` (see :mod:`lipnet.runs`): the config, one metrics row per epoch (with the sound
Lipschitz bound of the model at that epoch), a ``last`` checkpoint after every epoch, and at the end
a ``final`` checkpoint, the per-sample radii, ``summary.md``, ``curves.png`` and, last, the
certification of the final model on the test set (``results.json``, the mark of a finished run).

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

On CUDA the forward and backward passes run under bf16 autocast (``amp``), optionally in
channels-last layout and under ``torch.compile``; certification always runs a float32 forward pass
on the uncompiled model and float64 bounds. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is
wrapped in ``DistributedDataParallel``, each rank reads its shard of every epoch, metrics are
all-reduced, and only rank 0 evaluates, logs and writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipnet.config import RESUME_IGNORES, Config, ConfigError, ModelConfig, config_diff
from lipnet.plots import plot_history
from lipnet.runs import RunError, RunFolder, certification_table

__all__ = [
    "TrainResult",
    "TrainingDivergedError",
    "build_loss",
    "build_model",
    "build_optimizer",
    "certify_on_test",
    "load_run_model",
    "load_split",
    "lr_at",
    "resolve_device",
    "train",
]


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or Inf; the last checkpoint is left as it was."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``results`` only on rank 0 of a finished run)."""

    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    finished: bool
    results: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------
# devices and processes


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the process's CUDA device when CUDA is available, else CPU; others as named."""
    if request == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(request)
    except RuntimeError:
        raise ConfigError(f"unknown device {request!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {request!r} asked for, but CUDA is not available here (use device=auto)"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {request!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for, but MPS is not available here")
    return device


@dataclass
class _Dist:
    """The torchrun environment of this process (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    def start(self, device: torch.device) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False


# ---------------------------------------------------------------------------------------------
# building blocks from the config


def build_model(spec: ModelConfig) -> nn.Module:
    """``lipnet.models.create(spec.name, **spec.kwargs)``; a bad name or argument -> ConfigError."""
    from lipnet import models

    try:
        return models.create(spec.name, **spec.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model {spec.name!r}: {err}") from None


def build_loss(cfg: Config) -> nn.Module:
    """``lipnet.losses.create(cfg.loss.name, **cfg.loss.kwargs)``; bad input -> ConfigError."""
    from lipnet import losses

    try:
        return losses.create(cfg.loss.name, **cfg.loss.kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"loss: {err}") from None


def build_optimizer(params: Iterable[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum, optionally Nesterov) from ``cfg.optim``."""
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )


def lr_at(step: int, total: int, base: float, schedule: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total``; see :class:`OptimConfig`."""
    if schedule == "none":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "onecycle":
        start, end = base / 25.0, base / 25.0 / 1e4
        warm = max(1, round(0.3 * total))
        if step < warm:
            return start + (base - start) * 0.5 * (1.0 - math.cos(math.pi * step / warm))
        t = min(1.0, (step - warm) / max(1, total - warm))
        return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")


def load_split(cfg: Config, split: str, *, data_dir: str | None = None) -> Any:
    """The ``train`` or ``test`` split of ``cfg.data`` (``data_dir`` overrides the config's folder)."""
    from lipnet import data

    d = cfg.data
    return data.load(
        d.name,
        split,
        data_dir=data_dir if data_dir is not None else d.data_dir,
        download=d.download,
        n=d.n_train if split == "train" else d.n_test,
        seed=d.seed,
    )


def _check_model_fits(model: nn.Module, train_ds: Any, cfg: Config) -> tuple[int, ...]:
    """One forward pass on two training images: the output must be (2, num_classes), and bounded."""
    from certify.bounds import UnboundableModuleError, lipschitz_bound

    shape = tuple(int(s) for s in train_ds.images.shape[1:])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(train_ds.images[:2].to(next(model.parameters()).device))
        lipschitz_bound(model, shape)
    except UnboundableModuleError as err:
        raise ConfigError(f"model {cfg.model.name!r} cannot be certified: {err}") from None
    except RuntimeError as err:
        raise ConfigError(
            f"model {cfg.model.name!r} does not accept {cfg.data.name} images of shape {shape}: {err}. "
            "Set model.in_channels / model.input_size to match the dataset."
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != train_ds.num_classes:
        raise ConfigError(
            f"model {cfg.model.name!r} outputs shape {tuple(out.shape)} for 2 images, "
            f"but {cfg.data.name} has "
            f"{train_ds.num_classes} classes: set model.num_classes={train_ds.num_classes}"
        )
    return shape


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


def _accuracy(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast: Any) -> float:
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
    """Certify ``model`` on the first ``n`` test samples; float32 forward, float64 bound.

    Returns a JSON-ready dict (n, eps, clean_accuracy, certified_accuracy with one entry per eps in
    the same order, mean_radius, lipschitz: the sound bound used, rule: ``last-layer`` or ``global``)
    and the per-sample tensors (radii float64, predictions, labels) in test-set order.
    """
    import certify
    from lipnet.data import DeviceLoader

    loader = DeviceLoader(test_ds, batch_size, device=device)
    result = certify.certify(model, _take(loader, n), eps=eps, progress=progress)
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


# ---------------------------------------------------------------------------------------------
# the loop


def _open_run(
    cfg: Config, resume: bool, dist: _Dist, device: torch.device, held: contextlib.ExitStack
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


def _summary(cfg: Config, results: dict[str, Any]) -> str:
    cert = results["certify"]
    loss_args = ", ".join(f"{k}={v}" for k, v in cfg.loss.kwargs.items())
    model_args = ", ".join(f"{k}={v}" for k, v in cfg.model.kwargs.items())
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
        f"- final epoch: loss {last['loss']:.4f}, train accuracy {100 * last['train_acc']:.2f}%, "
        f"test accuracy {100 * last['test_acc']:.2f}%",
        f"- sound Lipschitz bound {cert['lipschitz']:.6f} "
        f"({cert['rule']} rule; float32 forward, float64 bound)",
        "",
        certification_table(cert),
        "",
    ]
    return "\n".join(lines)


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
    naming the tensors).
    """
    from tqdm.auto import tqdm

    from lipnet.data import Augment, DeviceLoader

    cfg.validate()
    dist = _Dist.from_env()
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
    show = progress and dist.main
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
        # in_channels / input_size / num_classes from the data where the config leaves them out
        model_spec = cfg.model.for_data(train_ds.input_shape, train_ds.num_classes)
        model = build_model(model_spec).to(device)
        loss_fn = build_loss(cfg)
        input_shape = _check_model_fits(model, train_ds, cfg)
        optimizer = build_optimizer(model.parameters(), cfg)

        history = []
        start_epoch, step, train_time = 0, 0, 0.0
        if resume and run.has_checkpoint("last"):
            ckpt = run.load_checkpoint("last")
            _load_weights(
                model,
                ckpt.model,
                f"cannot resume {run.path}: its 'last' checkpoint does not fit model {cfg.model.name!r} "
                "as config.yaml describes it",
            )
            optimizer.load_state_dict(ckpt.state["optimizer"])
            _set_rng_state(ckpt.state["rng"])
            history = list(ckpt.meta["history"])
            start_epoch, step, train_time = ckpt.epoch, ckpt.step, float(ckpt.meta["train_time"])
            log(f"resuming {run.path} after epoch {start_epoch} (step {step})")
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
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]

        use_amp = cfg.amp and device.type == "cuda"

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

        augment = (
            Augment(crop_padding=cfg.data.crop_padding, flip=cfg.data.flip) if cfg.data.augment else None
        )
        loader = DeviceLoader(
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
        test_loader = DeviceLoader(test_ds, cfg.certify.batch_size, device=device)
        epochs = cfg.optim.epochs
        total_steps = epochs * len(loader)
        if total_steps == 0:
            raise ConfigError(
                f"no training batches: {len(train_ds)} images for a batch of {cfg.optim.batch_size} "
                f"over {dist.world_size} process(es)"
            )
        from certify.bounds import lipschitz_bound

        for epoch in range(start_epoch, epochs):
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                return TrainResult(run.path, model, history, False, None)
            loader.set_epoch(epoch)
            train_model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            lr = cfg.optim.lr
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show)
            for i, (x, y) in enumerate(bar):
                lr = lr_at(step, total_steps, cfg.optim.lr, cfg.optim.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    logits = train_model(x)
                if logits.device.type == "cpu" and not bool(torch.isfinite(logits).all()):
                    # The loss would refuse these logits as bad input (ValueError, exit 2); mid-training
                    # they mean the weights diverged. Checked on the host only, where it costs no device
                    # sync; on an accelerator the NaN reaches the epoch loss, checked below.
                    kept = f"keeps its last checkpoint (epoch {epoch})" if epoch else "has no checkpoint yet"
                    raise TrainingDivergedError(
                        f"the logits became NaN or Inf at step {step + 1} (epoch {epoch + 1}): lower "
                        f"optim.lr; {run.path} {kept}"
                    )
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += len(y)
                if show and i % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lr:.2e}")
            bar.close()
            loss_total, correct_total, seen_total = dist.sum(
                [loss_sum.item(), float(correct.item()), float(seen)], device
            )
            epoch_loss = loss_total / seen_total
            if not math.isfinite(epoch_loss):
                raise TrainingDivergedError(
                    f"the training loss became {epoch_loss} in epoch {epoch + 1}: lower optim.lr; the last "
                    f"checkpoint (epoch {epoch}) of {run.path} is unchanged"
                )
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            if dist.main:
                model.eval()
                with torch.no_grad():
                    bound = lipschitz_bound(model, input_shape)
                row = {
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": epoch_loss,
                    "train_acc": correct_total / seen_total,
                    "test_acc": _accuracy(model, test_loader, autocast),
                    "lr": lr,
                    "time": elapsed,
                    "lipschitz": bound,
                }
                history.append(row)
                run.save_checkpoint(
                    "last",
                    epoch=epoch + 1,
                    step=step,
                    model_state=model.state_dict(),
                    state={"optimizer": optimizer.state_dict(), "rng": _rng_state()},
                    meta={
                        "model": {"name": cfg.model.name, "kwargs": model_spec.kwargs},
                        "input_shape": list(input_shape),
                        "num_classes": train_ds.num_classes,
                        "history": history,
                        "train_time": train_time,
                    },
                )
                run.write_metrics(history)
                log(
                    f"epoch {epoch + 1}/{epochs}  loss {epoch_loss:.4f}  "
                    f"train {100 * row['train_acc']:.2f}%  "
                    f"test {100 * row['test_acc']:.2f}%  lr {lr:.2e}  Lip<= {bound:.6f}  {elapsed:.1f}s"
                )
            dist.barrier()

        results: dict[str, Any] | None = None
        if dist.main:
            run.promote("last", "final")
            cert, per_sample = certify_on_test(
                model,
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
                "epochs": epochs,
                "steps": step,
                "train_time": train_time,
                "final_epoch": history[-1],
                "certify": cert,
            }
            run.write_summary(_summary(cfg, results))
            plot_history(history, run.curves_path)
            # last: results.json marks the run finished, so every other file is there before it
            run.write_results(results)
            log(certification_table(cert))
        dist.barrier()
        return TrainResult(run.path, model.eval(), history, True, results)
    finally:
        held.close()
        dist.close()


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
