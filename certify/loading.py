"""Loading the model to audit from a specification, without ever unpickling arbitrary code.

A model specification is one of

* an ``nn.Module`` (through the API): used as it is;
* a folder, through the ``run_loader`` the caller passes (``lipnet audit`` passes lipnet's, which
  reads a run folder's ``final`` checkpoint: safetensors weights and a JSON sidecar, nothing
  pickled); certify itself reads files only and never imports lipnet;
* a TorchScript file (``torch.jit.save``): ``torch.jit.load`` (TorchScript is a restricted language,
  not Python; its graph is run into an fx graph for analysis by :mod:`certify.graph.torchscript`);
* a ``torch.export`` program (``.pt2``, ``torch.export.save``): ``torch.export.load``, after checking
  that every pickle in the archive loads with torch's weights-only reader (``torch.export.load``
  itself falls back to full unpickling), as a plain ``fx.GraphModule`` of aten operations;
* an ONNX file (``.onnx``; the ``onnx`` extra): converted op by op into an fx graph of torch
  operations and checked against onnxruntime (:func:`certify.onnx.onnx_to_graph`), for the input
  shape the file declares;
* a ``.safetensors`` file, or a ``torch.save`` checkpoint (``.pt``/``.pth``) read with
  ``torch.load(..., weights_only=True)``, holding a state_dict (possibly under a ``state_dict``,
  ``model_state_dict`` or ``model`` key), together with an architecture ``package.module:function``
  that builds the model (called with no arguments, or with keyword arguments), imported from the
  current folder or the import path (``sys.path``, which includes ``PYTHONPATH``).

A checkpoint that only loads by running arbitrary code (a pickled ``nn.Module`` or any other Python
object) is refused with :class:`CheckpointError`, which says how to save it instead. Truncated or
corrupted files, checkpoints that do not fit the architecture and unknown architectures raise
:class:`CheckpointError` (a ``ValueError``) too; a missing file raises ``FileNotFoundError``.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from certify.io import CheckpointError
from certify.onnx import onnx_input_shape, onnx_to_graph

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "RunLoader",
    "build_architecture",
    "load_model",
    "load_state_dict_file",
]

#: Keys under which training scripts commonly nest the weights of a checkpoint.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")

_SAVE_HINT = (
    "save the weights only, e.g. torch.save(model.state_dict(), 'model.pt') or "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'), and pass the architecture "
    "with --arch package.module:function"
)


@dataclass
class LoadedModel:
    """A loaded model in eval mode, where it came from, and what the source says about its input.

    ``input_shape`` is known when a run loader says it (lipnet's: the model's ``input_shape``
    attribute); otherwise None (the audit takes it from the data).
    """

    model: nn.Module
    source: str
    kind: str
    input_shape: tuple[int, ...] | None = None


#: Loads the model of a folder (a training run): ``run_loader(folder, device) -> LoadedModel``. It
#: raises :class:`CheckpointError` for a folder it cannot load and ``FileNotFoundError`` for missing files.
RunLoader = Callable[[Path, str | torch.device], LoadedModel]


def build_architecture(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:function`` and call it (with ``arch_kwargs``) to build the model."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"--arch must look like package.module:function, got {arch!r}")
    module = _import_architecture(module_name)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise CheckpointError(f"module {module_name!r} has no attribute {attr!r} (from --arch {arch!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise CheckpointError(f"{arch!r} is not callable")
    try:
        model = fn(**dict(arch_kwargs or {}))
    except TypeError as err:
        raise CheckpointError(
            f"calling {arch!r} with arguments {dict(arch_kwargs or {})} failed: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_architecture(module_name: str) -> Any:
    """Import ``module_name`` from the current folder or ``sys.path`` (the ``lipnet`` console script does
    not put the current folder on its path, ``python -m`` does); the error names the places searched."""
    here = os.getcwd()
    added = here not in [os.path.abspath(p or ".") for p in sys.path]
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        places = [here] + [p for p in sys.path if p and os.path.abspath(p) != here]
        shown = ", ".join(places[:4]) + (f" and {len(places) - 4} more" if len(places) > 4 else "")
        raise CheckpointError(
            f"cannot import the architecture module {module_name!r} ({err}); looked in the current folder "
            f"and on the import path (PYTHONPATH and site-packages): {shown}"
        ) from None
    finally:
        if added:
            sys.path.remove(here)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _tensor_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state_dict (found {type(obj).__name__}): {_SAVE_HINT}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state_dict: entries {bad[:5]} are not tensors "
            "(nest the weights under 'state_dict')"
        )
    return {str(k): v for k, v in obj.items()}


def load_state_dict_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file, safely.

    ``torch.load`` runs with ``weights_only=True``: a file that needs arbitrary unpickling (a whole
    pickled model, custom classes) is refused with an explanation instead of being executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{path} is not a valid safetensors file (truncated or corrupted?): {err}"
            ) from None
    try:
        with warnings.catch_warnings():
            # torch warns about any pickle protocol above 2 and asks the user to file an issue; the
            # refusal below already explains what is wrong and what to do.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} can only be loaded by unpickling arbitrary Python objects, which could run any code "
            f"({_unpickling_reason(err)}); certify refuses to do that: {_SAVE_HINT}"
        ) from None
    except Exception as err:  # whatever a damaged file makes the reader raise: it is not a checkpoint
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not a checkpoint?): "
            f"{' '.join(str(err).split())[:300]}"
        ) from None
    if isinstance(obj, nn.Module):
        # weights_only=True never returns a module; kept as a guard should the loader change.
        raise CheckpointError(f"{path} holds a pickled model, not weights: {_SAVE_HINT}")
    return _tensor_dict(obj, path)


def _is_pt2(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("archive_format") for n in archive.namelist())


def _check_pt2_pickles(archive: zipfile.ZipFile, path: Path) -> None:
    """Refuse a ``.pt2`` archive holding a pickle that torch's weights-only reader would not load.

    ``torch.export.load`` unpickles pickled weights, constants and sample inputs with
    ``weights_only=False`` when the safe reader fails, which can run any code. Every member is
    checked here except the raw tensor payloads its configuration lists as not pickled: each that
    is a pickle (protocol 2 or higher) or a ``torch.save`` archive must name no global beyond
    torch's weights-only allowlist.
    """
    raw: set[str] = set()
    for name in archive.namelist():
        if name.endswith("_config.json"):
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise CheckpointError(
                    f"{path} is not a readable torch.export program: {name} is not JSON"
                ) from None
            folder = name.rpartition("/")[0]
            raw |= {f"{folder}/{m['path_name']}" for m in config.values() if not m.get("use_pickle", True)}
    for name in archive.namelist():
        if name in raw:
            continue
        data = archive.read(name)
        if not (data[:2] == b"PK" or data[:1] == b"\x80"):
            continue
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        except Exception as err:  # not a torch.save archive: a plain pickle
            unsafe = [f"a plain pickle ({' '.join(str(err).split())[:80]})"]
        if unsafe:
            raise CheckpointError(
                f"{path} holds a pickle ({name}) that only loads by unpickling arbitrary Python objects "
                f"({', '.join(unsafe[:3])}); certify refuses to do that"
            )


def _load_pt2(path: Path, device: str | torch.device) -> LoadedModel:
    try:
        with zipfile.ZipFile(path) as archive:
            _check_pt2_pickles(archive, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except CheckpointError:
        raise
    except Exception as err:  # whatever a damaged archive makes the reader raise
        raise CheckpointError(
            f"{path} is not a loadable torch.export program (truncated or corrupted?): "
            f"{' '.join(str(err).split())[:300]}"
        ) from None
    module = program.module()
    graph = fx.GraphModule(module, module.graph)  # the program's own module refuses .eval()
    example = next((n.meta.get("val") for n in graph.graph.nodes if n.op == "placeholder"), None)
    if isinstance(example, torch.Tensor) and example.ndim and isinstance(example.shape[0], int):
        raise CheckpointError(
            f"{path} was exported for batches of exactly {example.shape[0]} inputs: certify runs the model "
            "on batches of other sizes; export it with a dynamic batch dimension (dynamic_shapes="
            "({0: torch.export.Dim('batch')},), as lipnet export does)"
        )
    shape = tuple(int(s) for s in example.shape[1:]) if isinstance(example, torch.Tensor) else None
    return LoadedModel(graph.to(device).eval(), str(path), "pt2", shape)


def _load_onnx(path: Path, device: str | torch.device) -> LoadedModel:
    shape = onnx_input_shape(path)
    if shape is None:
        raise CheckpointError(
            f"{path} does not declare the size of its input (a symbolic axis besides the batch): certify "
            "bounds a graph for one input size; export it with a fixed input size"
        )
    graph = onnx_to_graph(path, torch.rand((1, *shape), generator=torch.Generator().manual_seed(0)))
    return LoadedModel(graph.to(device).eval(), str(path), "onnx", shape)


def _unpickling_reason(err: BaseException) -> str:
    """What torch's weights_only unpickler refused, in our words: the Python global the file names, or
    the pickle opcode it cannot run (e.g. FRAME, 149, in a ``pickle.dump`` file of protocol 4 or 5);
    torch's advice around it (re-run with ``weights_only=False``, file an issue) is dropped."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())
    detail = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if found:
        return f"it names the Python global {found.group(1)}"
    found = re.search(r"Unsupported operand (\d+)", detail)
    if found:
        return (
            f"it uses pickle opcode {found.group(1)}, which torch's weights-only reader does not run; "
            "pickle.dump writes such files, torch.save does not by default"
        )
    return (detail or text)[:300]


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(
            f"the checkpoint {source} does not fit the architecture {arch}: {detail[:600]}"
        ) from None


def load_model(
    spec: str | Path | nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    run_loader: RunLoader | None = None,
) -> LoadedModel:
    """Load the model described by ``spec`` (see the module docstring) onto ``device``, in eval mode.

    A folder is loaded by ``run_loader``; without one it is refused with :class:`CheckpointError`.
    """
    if isinstance(spec, nn.Module):
        return LoadedModel(spec.to(device).eval(), type(spec).__qualname__, "module")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir():
        if arch is not None:
            raise CheckpointError("--arch is for weight files; a run folder already names its model")
        if run_loader is None:
            raise CheckpointError(
                f"{path} is a folder: certify loads model files (TorchScript, safetensors, torch.save "
                "weights); a training run folder is loaded by its library's loader (lipnet audit does this)"
            )
        return run_loader(path, device)
    if path.suffix == ".onnx" or (path.suffix == ".pt2" and not zipfile.is_zipfile(path)) or _is_pt2(path):
        if arch is not None:
            raise CheckpointError(f"{path} is an exported model, which carries its architecture: drop --arch")
        return _load_onnx(path, device) if path.suffix == ".onnx" else _load_pt2(path, device)
    if path.suffix != ".safetensors" and _is_torchscript(path):
        if arch is not None:
            raise CheckpointError(
                f"{path} is a TorchScript model, which carries its architecture: drop --arch"
            )
        try:
            model = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a loadable TorchScript model: {err}") from None
        return LoadedModel(model.eval(), str(path), "torchscript")
    state = load_state_dict_file(path, device)
    if arch is None:
        raise CheckpointError(
            f"{path} holds weights only: give the architecture that builds the model with "
            "--arch package.module:function (and --arch-kwargs JSON if it takes arguments)"
        )
    model = build_architecture(arch, arch_kwargs)
    _load_into(model, state, str(path), arch)
    kind = "safetensors" if path.suffix == ".safetensors" else "state_dict"
    return LoadedModel(model.to(device).eval(), f"{path} ({arch})", kind)
