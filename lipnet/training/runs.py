"""The run folder: config, metrics, checkpoints, results, summary; every file written atomically.

Layout of one run::

    RUN/config.yaml         the resolved config (read back by ``--resume`` and ``lipnet certify``)
    RUN/metrics.jsonl       one JSON object per finished epoch
    RUN/metrics.csv         the same rows as CSV
    RUN/checkpoints/        last.json, final.json (sidecars) and the safetensors files they name
    RUN/results.json        the certification of the final model
    RUN/radii.safetensors   its per-sample certified radii (float64), predictions and labels
    RUN/summary.md          a short Markdown summary with the certification table
    RUN/curves.png          loss and accuracy per epoch (when matplotlib is installed)

A checkpoint is a safetensors file holding every tensor (model weights, optimiser moments, RNG
states) and a JSON sidecar holding everything else (epoch, step, optimiser hyper-parameters, the
metrics history), with the name and SHA-256 of its tensor file. Nothing is pickled. The sidecar is
the commit point: a new tensor file is written under a new name first, then the sidecar is
replaced atomically, so a crash or a failing write at any moment leaves the previous checkpoint
whole. ``final`` is the sidecar of the last epoch's tensors (no second copy of the weights).

Crash safety. ``lipnet train`` commits files in this order: config.yaml; per epoch the checkpoint
(tensors, then ``last.json``), then metrics.jsonl and metrics.csv; at the end ``final.json``,
radii.safetensors, summary.md, curves.png and, last of all, results.json. A run is finished
(:meth:`RunFolder.is_finished`) when results.json, summary.md and the ``final`` checkpoint exist;
since results.json is written last, a run killed at any moment before it is not finished and
``--resume`` redoes what is missing. The metrics files are derived data: resume rewrites them from
the history in the ``last`` checkpoint when they disagree (:meth:`RunFolder.sync_metrics`).

While a run is trained its folder holds ``train.lock``, an advisory lock (``fcntl.flock``; the
kernel releases it when the process dies, so a killed run never blocks the next one). Without
``fcntl`` the lock file is created exclusively and names the holder's pid; a killed holder then
leaves it behind, and the error says which file to delete. Temporary files of the atomic writer
(``.NAME.<16 hex digits>.tmp``) that a kill left behind are deleted when a run is opened under
the lock (:meth:`RunFolder.remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# The one atomic writer (its temporary names, TEMP_NAME, are what remove_leftovers deletes) and the one
# CheckpointError, which every reader of a checkpoint raises.
from certify.io import TEMP_NAME, CheckpointError, atomic_write_bytes, atomic_write_json, atomic_write_text
from lipnet.training.config import Config, ConfigError, dump_config, load_config

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: the lock falls back to an exclusively created pid file
    fcntl = None

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "RunError", "RunFolder", "join_state", "split_state"]

CHECKPOINT_FORMAT = "lipnet.checkpoint/1"
_TAGS = ("last", "final")


class RunError(ValueError):
    """A run folder cannot be used as asked (already holds a run, nothing to resume, wrong config)."""


_SPECIAL = ("__tensor__", "__tuple__", "__items__")


def split_state(obj: Any, prefix: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, scalars) into JSON and tensors.

    Each tensor is replaced by ``{"__tensor__": key}`` and returned under that key; tuples and
    dicts with non-string keys (an optimiser's ``{0: {...}}``) are tagged so that
    :func:`join_state` rebuilds exactly the same structure.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) for k in x) and not any(k in _SPECIAL for k in x):
                return {k: enc(v, f"{path}/{k}") for k, v in x.items()}
            return {
                "__items__": [
                    [enc(k, f"{path}/key{i}"), enc(v, f"{path}/{k}")] for i, (k, v) in enumerate(x.items())
                ]
            }
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} at {path!r} in a checkpoint (no pickling)")

    return enc(obj, prefix), tensors


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        if set(skeleton) == {"__tuple__"}:
            return tuple(join_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__items__"}:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__items__"]}
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


@dataclass
class Checkpoint:
    """What a checkpoint holds once loaded: model weights, the other state, and JSON metadata."""

    tag: str
    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunFolder:
    """One training run's folder; see the module docstring for the layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_jsonl = self.path / "metrics.jsonl"
        self.metrics_csv = self.path / "metrics.csv"
        self.results_path = self.path / "results.json"
        self.summary_path = self.path / "summary.md"
        self.curves_path = self.path / "curves.png"
        self.certify_path = self.path / "certify.json"
        self.radii_path = self.path / "radii.safetensors"
        self.checkpoint_dir = self.path / "checkpoints"
        self.lock_path = self.path / "train.lock"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # config -----------------------------------------------------------------------------------
    def is_started(self) -> bool:
        """Whether a run has already written its config or a checkpoint here."""
        return self.config_path.exists() or self.has_checkpoint("last") or self.results_path.exists()

    def is_finished(self) -> bool:
        """Whether the run has finished: results.json (written last), summary.md and ``final`` exist."""
        return self.results_path.exists() and self.summary_path.exists() and self.has_checkpoint("final")

    # lock and leftovers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's ``train.lock`` for the ``with`` block; :class:`RunError` if another holds it.

        With ``fcntl`` the lock is ``flock(LOCK_EX | LOCK_NB)`` on ``train.lock``: the kernel drops it
        when the holder dies, so a lock file left by a killed run does not block. The holder writes
        its pid into the file (for the error message) and deletes the file before it unlocks.
        Without ``fcntl`` the file is created with ``O_CREAT | O_EXCL``; a killed holder leaves it
        behind and the error names it. The folder is created when missing, and removed again at the
        end when it is still empty (a run refused for bad input leaves nothing behind).
        """
        created = not self.path.exists()
        try:
            fd = self._acquire_flock() if fcntl is not None else self._acquire_pid_file()
        except OSError as err:  # e.g. a read-only folder, or a file system without locks
            raise RunError(f"cannot lock {self.lock_path}: {err}") from None
        try:
            yield
        finally:
            # Delete before unlocking: a process that opened the old file meanwhile finds, once it
            # holds the lock, that the path no longer names its file, and starts over (_acquire_flock).
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):  # not empty (a run was written) or already gone
                    self.path.rmdir()

    def _holder(self) -> str:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            pid = self.lock_path.read_text(encoding="utf-8").strip()
            if pid.isdigit():
                return f"pid {pid}"
        return "pid unknown"

    def _acquire_flock(self) -> int:
        assert fcntl is not None
        # A few rounds cover the holder deleting the file between our open() and flock().
        for _ in range(10):
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the folder was removed under us (an emptied refused run)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    current = os.stat(self.lock_path)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return fd
            except BlockingIOError:
                os.close(fd)
                raise RunError(
                    f"{self.path} is in use by another lipnet train ({self._holder()}, holding "
                    f"{self.lock_path}): wait for it to end, or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file its holder had already deleted: lock the new one
        raise RunError(f"could not lock {self.lock_path}: it keeps being replaced by other processes")

    def _acquire_pid_file(self) -> int:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise RunError(
                f"{self.path} is in use by another lipnet train ({self._holder()}, holding "
                f"{self.lock_path}); if that process is no longer running, delete {self.lock_path}"
            ) from None
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def remove_leftovers(self) -> list[Path]:
        """Delete what a killed run left behind; call it only while holding :meth:`lock`.

        That is: the atomic writer's temporary files (``.NAME.<16 hex digits>.tmp``) in the run
        folder and in ``checkpoints/``, and tensor files that no checkpoint sidecar names. Returns
        the deleted paths. Nothing else is touched.
        """
        removed = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                if TEMP_NAME.fullmatch(p.name) and p.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed.append(p)
        return removed + self._remove_unreferenced()  # checkpoints/: temporaries and orphans

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config_path, dump_config(cfg))

    def read_config(self) -> Config:
        """The run's resolved config; :class:`RunError` if it is missing or unreadable."""
        if not self.config_path.exists():
            raise RunError(f"{self.path} is not a run folder: it has no config.yaml")
        try:
            return load_config(self.config_path)
        except ConfigError as err:
            raise RunError(f"the config of run {self.path} is unreadable: {err}") from None

    # metrics ----------------------------------------------------------------------------------
    def write_metrics(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from the full history (one row per epoch)."""
        jsonl, table = _metrics_text(history)
        atomic_write_text(self.metrics_jsonl, jsonl)
        atomic_write_text(self.metrics_csv, table)

    def sync_metrics(self, history: Iterable[Mapping[str, Any]]) -> bool:
        """Make metrics.jsonl and metrics.csv hold exactly ``history``; True when a file changed.

        ``history`` is a checkpoint's, the source of truth: the metrics files are written after the
        checkpoint of their epoch, so a kill in between leaves them one epoch behind. An empty
        history means no epoch was committed: the metrics files are deleted.
        """
        rows = [dict(r) for r in history]
        if not rows:
            changed = False
            for path in (self.metrics_jsonl, self.metrics_csv):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    changed = True
            return changed
        jsonl, table = _metrics_text(rows)
        if (
            _read_bytes(self.metrics_jsonl) == jsonl.encode()
            and _read_bytes(self.metrics_csv) == table.encode()
        ):
            return False
        self.write_metrics(rows)
        return True

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_jsonl.exists():
            return []
        return [
            json.loads(line) for line in self.metrics_jsonl.read_text(encoding="utf-8").splitlines() if line
        ]

    # results ----------------------------------------------------------------------------------
    def has_results(self) -> bool:
        return self.results_path.exists()

    def write_results(self, results: Mapping[str, Any]) -> None:
        atomic_write_json(self.results_path, dict(results))

    def read_results(self) -> dict[str, Any]:
        try:
            return json.loads(self.results_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"run {self.path} has no results.json: it has not finished") from None
        except json.JSONDecodeError as err:
            raise RunError(f"{self.results_path} is not valid JSON: {err}") from None

    def write_radii(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Per-sample certification tensors (radii, predictions, labels) in test-set order."""
        data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        atomic_write_bytes(self.radii_path, data)

    def read_radii(self) -> dict[str, torch.Tensor]:
        try:
            return st_load(self.radii_path.read_bytes())
        except FileNotFoundError:
            raise RunError(f"run {self.path} has no radii.safetensors: it has not finished") from None
        except Exception as err:  # safetensors raises its own error types for malformed files
            raise RunError(f"{self.radii_path} is unreadable: {err}") from None

    def write_summary(self, text: str) -> None:
        atomic_write_text(self.summary_path, text)

    # checkpoints ------------------------------------------------------------------------------
    def _sidecar(self, tag: str) -> Path:
        if tag not in _TAGS:
            raise ValueError(f"checkpoint tag must be one of {_TAGS}, got {tag!r}")
        return self.checkpoint_dir / f"{tag}.json"

    def has_checkpoint(self, tag: str) -> bool:
        return self._sidecar(tag).exists()

    def save_checkpoint(
        self,
        tag: str,
        *,
        epoch: int,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        meta: Mapping[str, Any],
    ) -> None:
        """Write a checkpoint (tensors first, then the sidecar that commits it), atomically."""
        skeleton, tensors = split_state(dict(state), "state")
        for k, v in model_state.items():
            tensors[f"model/{k}"] = v.detach().to("cpu").contiguous().clone()
        data = st_save(tensors, metadata={"format": CHECKPOINT_FORMAT})
        name = f"{tag}-e{epoch:04d}-s{step}.safetensors"
        atomic_write_bytes(self.checkpoint_dir / name, data)
        sidecar = {
            "format": CHECKPOINT_FORMAT,
            "tag": tag,
            "epoch": epoch,
            "step": step,
            "tensors": name,
            "sha256": _sha256(data),
            "state": skeleton,
            "meta": dict(meta),
        }
        atomic_write_json(self._sidecar(tag), sidecar)
        self._remove_unreferenced()

    def promote(self, src: str, dst: str) -> None:
        """Make checkpoint ``dst`` name the same tensors as ``src`` (e.g. last -> final)."""
        sidecar = self._read_sidecar(src)
        sidecar["tag"] = dst
        atomic_write_json(self._sidecar(dst), sidecar)

    def _read_sidecar(self, tag: str) -> dict[str, Any]:
        path = self._sidecar(tag)
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"run {self.path} has no '{tag}' checkpoint ({path} is missing)") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint sidecar {path} is corrupted: {err}") from None
        if not isinstance(sidecar, dict) or sidecar.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a lipnet checkpoint sidecar ({CHECKPOINT_FORMAT})")
        return sidecar

    def load_checkpoint(self, tag: str = "last") -> Checkpoint:
        """Read and verify a checkpoint; :class:`CheckpointError` if anything does not match."""
        sidecar = self._read_sidecar(tag)
        name = sidecar.get("tensors")
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CheckpointError(f"checkpoint '{tag}' of {self.path} names no valid tensor file")
        path = self.checkpoint_dir / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint '{tag}' of {self.path}: tensor file {path} is missing"
            ) from None
        if _sha256(data) != sidecar.get("sha256"):
            raise CheckpointError(
                f"checkpoint '{tag}' of {self.path}: {path} is corrupted (SHA-256 mismatch)"
            )
        try:
            tensors = st_load(data)
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise CheckpointError(f"checkpoint '{tag}' of {self.path}: cannot read {path}: {err}") from None
        model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        state = join_state(sidecar.get("state", {}), tensors)
        return Checkpoint(
            tag=tag,
            epoch=int(sidecar["epoch"]),
            step=int(sidecar["step"]),
            model=model,
            state=state,
            meta=dict(sidecar.get("meta", {})),
        )

    def _remove_unreferenced(self) -> list[Path]:
        """Delete tensor files (and stale temporaries) that no committed sidecar names; returns them.

        When a sidecar exists but cannot be read, no tensor file is deleted: the one it names cannot
        be told apart from an orphan, and deleting it would destroy what the error is about.
        """
        if not self.checkpoint_dir.is_dir():
            return []
        keep: set[Any] = set()
        readable = True
        for tag in _TAGS:
            if self.has_checkpoint(tag):
                try:
                    keep.add(self._read_sidecar(tag).get("tensors"))
                except CheckpointError:
                    readable = False
        removed = []
        for p in self.checkpoint_dir.iterdir():
            orphan = readable and p.suffix == ".safetensors" and p.name not in keep
            if orphan or TEMP_NAME.fullmatch(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _metrics_text(history: Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """The text of metrics.jsonl and of metrics.csv for ``history`` (one row per epoch)."""
    rows = [dict(r) for r in history]
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return "".join(json.dumps(r) + "\n" for r in rows), buf.getvalue()
